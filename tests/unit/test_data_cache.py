"""The token cache under concurrency and failure: one process builds while the others wait, a
half-built cache is never read, a dead builder's lock is taken over, a failed build is reported by
every waiting process; and hub datasets: streamed when online, the network untouched offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import p3d.data.cache as cache
import p3d.data.sources as sources
from p3d.config.schema import DataFormat
from p3d.data import ByteTokenizer, Source, open_cache
from p3d.errors import ConfigError
from tests.conftest import _env

# Run as `python -c BUILDER root corpus ready_dir name`: tokenizing is slowed down so that the other
# process arrives while the build runs; both start building only once both are ready.
BUILDER = """
import json, sys, time
from pathlib import Path
import p3d.data.cache as cache
from p3d.config.schema import DataFormat
from p3d.data import ByteTokenizer, Source

root, corpus, ready, name = sys.argv[1:5]
original, builds = cache.tokenize_unit, []
def slow(*args, **kwargs):
    time.sleep(float(sys.argv[5]))
    return original(*args, **kwargs)
def counted(*args, **kwargs):
    builds.append(1)
    return build(*args, **kwargs)
build, cache.build_entry, cache.tokenize_unit = cache.build_entry, counted, slow
source = Source("data.path", corpus, None, "train", "text", "data.text_field", DataFormat.text)
Path(ready, name).touch()
while len(list(Path(ready).iterdir())) < int(sys.argv[6]):
    time.sleep(0.01)
messages = []
entry = cache.open_cache(source, ByteTokenizer(), Path(root), info=messages.append)
print(json.dumps({"builds": len(builds), "entry": str(entry.directory), "messages": messages, "tokens": int(entry.manifest["parts"]["train"]["tokens"])}))
"""


def text_source(path: Path) -> Source:
    return Source("data.path", str(path), None, "train", "text", "data.text_field", DataFormat.text)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(200)))
    return path


def start_builder(tmp_path: Path, corpus: Path, name: str, delay: float = 1.0, expected: int = 1) -> subprocess.Popen:
    ready = tmp_path / "ready"
    ready.mkdir(exist_ok=True)
    command = [sys.executable, "-c", BUILDER, str(tmp_path / "cache"), str(corpus), str(ready), name, str(delay), str(expected)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def test_two_processes_starting_together_build_the_cache_once(tmp_path, corpus):
    processes = [start_builder(tmp_path, corpus, name, expected=2) for name in ("a", "b")]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(result["builds"] for result in results) == [0, 1]
    assert results[0]["entry"] == results[1]["entry"] and results[0]["tokens"] == results[1]["tokens"] > 0
    waiter = next(result for result in results if result["builds"] == 0)
    assert any(message.startswith("waiting for pid ") for message in waiter["messages"]), waiter["messages"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(results[0]["entry"]).name]  # no lock or temp dir left


def test_a_builder_killed_midway_leaves_nothing_readable_and_its_lock_is_taken_over(tmp_path, corpus):
    builder = start_builder(tmp_path, corpus, "killed", delay=60)
    root = tmp_path / "cache"
    deadline = time.time() + 120
    while not list(root.glob("*.lock")) or not list(root.glob(".*.tmp-*")):
        assert time.time() < deadline and builder.poll() is None, builder.stderr.read() if builder.poll() is not None else "no lock"
        time.sleep(0.05)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert not list(root.glob("*/manifest.json"))  # only the lock and the temporary directory
    messages = []
    entry = open_cache(text_source(corpus), ByteTokenizer(), root, info=messages.append)
    assert messages[0].startswith(f"taking over the token cache build of {entry.directory.name}: its process {builder.pid} is no longer running")
    assert entry.manifest["parts"]["train"]["documents"] == 200
    assert sorted(p.name for p in root.iterdir()) == [entry.directory.name]


def test_a_lock_not_refreshed_for_long_is_taken_over(tmp_path, corpus, monkeypatch):
    """A builder on another node that died: its heartbeat stops."""
    source = text_source(corpus)
    name = cache._entry_name(source, cache.cache_identity(source, ByteTokenizer(), 0.0))
    root = tmp_path / "cache"
    root.mkdir()
    lock = root / f"{name}.lock"
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "started": 0}))
    old = time.time() - cache.STALE_S - 5
    os.utime(lock, (old, old))
    messages = []
    open_cache(source, ByteTokenizer(), root, info=messages.append)
    assert "its lock was not refreshed for" in messages[0] and "pid 1 on another-node" in messages[0]


def test_a_waiting_process_reports_the_builders_error(tmp_path, corpus, monkeypatch):
    source = text_source(corpus)
    name = cache._entry_name(source, cache.cache_identity(source, ByteTokenizer(), 0.0))
    root = tmp_path / "cache"
    root.mkdir()
    lock = root / f"{name}.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": time.time()}))  # alive: this process

    def builder_fails() -> None:
        time.sleep(0.5)
        (root / f"{name}.failed").write_text("data.path=x: corpus.jsonl line 7 is not valid JSON\n")
        lock.unlink()

    thread = threading.Thread(target=builder_fails)
    thread.start()
    with pytest.raises(ConfigError) as error:
        open_cache(source, ByteTokenizer(), root)
    thread.join()
    assert error.value.problems == ["data.path=x: corpus.jsonl line 7 is not valid JSON"]
    # a later run (the data fixed, or retried) builds anew instead of repeating an old failure
    time.sleep(1.1)
    assert open_cache(source, ByteTokenizer(), root, info=print).manifest["parts"]["train"]["documents"] == 200


# --- hub datasets -----------------------------------------------------------------------------------


def hub_source() -> Source:
    return Source("data.path", "someone/corpus", None, "train", "text", "data.text_field", DataFormat.text)


def test_a_hub_dataset_is_streamed_into_the_cache_when_online_and_reused_offline(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append({"path": path, "streaming": streaming})
        rows = [{"text": f"streamed row {i}"} for i in range(50)]
        return datasets.IterableDataset.from_generator(lambda: iter(rows)) if streaming else datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "_hub_revision", lambda path, name: "rev1")
    online = open_cache(hub_source(), ByteTokenizer(), tmp_path / "cache")
    assert calls == [{"path": "someone/corpus", "streaming": True}]
    assert online.manifest["parts"]["train"]["documents"] == 50

    # offline the revision cannot be resolved: the entry built online is found without loading anything
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_hub_revision", lambda path, name: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("offline with a cache: nothing is loaded"))
    assert open_cache(hub_source(), ByteTokenizer(), tmp_path / "cache").directory == online.directory


OFFLINE_RUN = """
import socket, sys
reached = []
connect = socket.socket.connect
def guarded(self, address):
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
        reached.append(address)
        raise OSError("the test blocks the network")
    return connect(self, address)
socket.socket.connect = guarded
import p3d.train
try:
    p3d.train.main(sys.argv[1:])
except SystemExit as stop:
    print("reached", reached, flush=True)
    raise
"""


def test_an_offline_run_never_touches_the_network(tmp_path):
    from tests.conftest import FAST

    run = [sys.executable, "-c", OFFLINE_RUN, *FAST, "data.path=someone/not-downloaded-corpus", f"run.dir={tmp_path / 'run'}"]
    done = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=_env({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("p3d: error: data.path=someone/not-downloaded-corpus: cannot load it (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    assert "reached []" in done.stdout
