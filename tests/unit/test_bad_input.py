"""Every bad input is one line naming the key and the fix, exit 2, no traceback, under each entry point.

The table runs in-process through the entry functions of `python -m p3d.train`, `p3d train` and
`p3d plan` (they all fail at compose or validation, before any process group); a few cases run
as real subprocesses per entry point, and the failures that only show at run time (a malformed
line deep in a data file, a diverging loss) run as subprocesses of their own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from p3d import cli, train
from tests.conftest import FAST, run_command

ENTRY_POINTS = {
    "python -m p3d.train": lambda args: train.main(args),
    "p3d train": lambda args: cli.main(["train", *args]),
    "p3d plan": lambda args: cli.main(["plan", *args, "--world-size", "1"]),
}


def write_data_files(root: Path) -> None:
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n \n\n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "not_json.jsonl").write_text("text: hello\n")
    (root / "array_line.jsonl").write_text('["a", "b"]\n')
    (root / "fake.parquet").write_text("a,b\n1,2\n")
    (root / "a_file").write_text("")
    (root / "dir_with_empty").mkdir()
    (root / "dir_with_empty" / "a.txt").write_text("some text\n")
    (root / "dir_with_empty" / "b.txt").write_text("")
    (root / "chat_no_messages.jsonl").write_text('{"text": "a plain row"}\n')
    (root / "chat_bad_role.jsonl").write_text('{"messages": [{"role": "bot", "content": "hi"}]}\n')
    (root / "chat_not_list.jsonl").write_text('{"messages": "user: hi"}\n')
    (root / "good.txt").write_text("some text\n")


def unwritable_dir(root: Path) -> str:
    """A directory that refuses new entries: mode 0o555, or for root (whom modes do not stop) /proc."""
    if os.geteuid() == 0:
        return "/proc/p3d-run"
    locked = root / "locked"
    locked.mkdir(mode=0o555)
    return str(locked / "run")


# id: (overrides, text the one line must contain: the key, and the fix where it is a word)
CASES = {
    "tp zero": (["parallel.tp=0"], "parallel.tp=0: must be >= 1"),
    "cp zero": (["parallel.cp=0"], "parallel.cp=0: must be >= 1"),
    "dp zero": (["parallel.dp=0"], "parallel.dp=0: must be -1 or >= 1"),
    "dp replicate zero": (["parallel.dp_replicate=0"], "parallel.dp_replicate=0: must be >= 1"),
    "dp shard zero": (["parallel.dp_shard=0"], "parallel.dp_shard=0: must be -1 or >= 1"),
    "dp is not replicate x shard": (["parallel.dp=1", "parallel.dp_replicate=2", "parallel.dp_shard=1"], "parallel.dp=1 but parallel.dp_replicate*parallel.dp_shard = 2*1 = 2: leave parallel.dp_shard=-1"),
    "dp replicate not dividing dp": (["parallel.dp=3", "parallel.dp_replicate=2", "train.global_batch_size=6"], "parallel.dp_replicate=2 does not divide the data-parallel degree dp=3: choose a parallel.dp_replicate that divides 3"),
    "grad sync unknown": (["parallel.grad_sync=never"], "parallel.grad_sync"),
    "lr nan": (["optim.lr=nan"], "optim.lr=nan: must be a finite number > 0"),
    "lr inf": (["optim.lr=inf"], "optim.lr=inf: must be a finite number > 0"),
    "lr negative": (["optim.lr=-0.1"], "optim.lr=-0.1: must be > 0"),
    "warmup negative": (["optim.warmup_steps=-5"], "optim.warmup_steps=-5: must be >= 0"),
    "grad clip negative": (["optim.grad_clip=-1"], "optim.grad_clip=-1.0: must be >= 0"),
    "beta1 one": (["optim.beta1=1"], "optim.beta1=1.0: must be in [0, 1)"),
    "beta2 negative": (["optim.beta2=-0.5"], "optim.beta2=-0.5: must be in [0, 1)"),
    "eps zero": (["optim.eps=0"], "optim.eps=0.0: must be > 0"),
    "weight decay negative": (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    "min lr ratio above one": (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5: must be in [0, 1]"),
    "momentum with adamw": (["optim.momentum=0.9"], "optim.momentum=0.9 does not apply to optim.name=adamw"),
    "bf16 state with muon": (["optim.name=muon", "train.dtype=bf16", "train.master_dtype=bf16"], "train.master_dtype=bf16 steps bf16 weights with p3d's own AdamW"),
    "eval without held-out data": (["eval.every=5"], "eval.every=5 needs held-out data: set data.eval_path"),
    "eval path missing": (["eval.every=5", "data.eval_path={root}/nope.txt"], "data.eval_path={root}/nope.txt: no such file or directory"),
    "decay ratio without wsd": (["optim.decay_ratio=0.3"], "optim.decay_ratio=0.3 applies to optim.schedule=wsd only, not cosine"),
    "seed negative": (["train.seed=-1"], "train.seed=-1: must be in [0, 4294967295]"),
    "micro batch zero": (["train.micro_batch_size=0"], "train.micro_batch_size=0: must be >= 1"),
    "checkpoint every negative": (["checkpoint.every=-1"], "checkpoint.every=-1: must be >= 0"),
    "peak tflops zero": (["logging.peak_tflops=0"], "logging.peak_tflops=0.0: must be > 0"),
    "timeout zero": (["dist.timeout_s=0"], "dist.timeout_s=0: must be >= 1"),
    "layers zero": (["model.config.num_hidden_layers=0"], "model.config.num_hidden_layers=0: must be a whole number >= 1"),
    "hidden size zero": (["model.config.hidden_size=0"], "model.config.hidden_size=0: must be a whole number >= 1"),
    "kv heads zero": (["model.config.num_key_value_heads=0"], "model.config.num_key_value_heads=0: must be a whole number >= 1"),
    "positions zero": (["model.config.max_position_embeddings=0"], "model.config.max_position_embeddings=0"),
    "hf float nan": (["model.config.rms_norm_eps=nan"], "model.config.rms_norm_eps=nan: must be a finite number"),
    "empty ffn": (["model=tiny_opt", "model.config.ffn_dim=0"], "model.config: "),
    # A backend this build lacks, or one that cannot hold CPU tensors: refused either way.
    "nccl on cpu": (["dist.device=cpu", "dist.backend=nccl"], "dist.backend=nccl: "),
    "unknown backend": (["dist.backend=nope"], "dist.backend=nope: this PyTorch build has no nope backend"),
    "run dir is a file": (["run.dir={root}/a_file"], "run.dir={root}/a_file: is an existing file"),
    "run dir under a file": (["run.dir={root}/a_file/run"], "is a file, not a directory"),
    "run dir not writable": (["run.dir={unwritable}"], "run.dir={unwritable}: cannot write in"),
    "bad interpolation": (["run.dir=runs/${model.nope}"], "run.dir: Interpolation key 'model.nope' not found"),
    "missing env interpolation": (["run.dir=${oc.env:P3D_TEST_NO_SUCH_VARIABLE}"], "run.dir: "),
    "wandb online without key": (["logging.wandb=true", "logging.wandb_mode=online"], "logging.wandb_mode=online: no W&B API key"),
    "unknown key added with plus": (["+train.stepz=3"], "train.stepz: unknown config key; did you mean train.steps?"),
    "unknown section added with plus": (["+trian.steps=3"], "trian: unknown config key"),
    "unknown nested key added with plus": (["+optim.sched.kind=cosine"], "optim.sched: unknown config key"),
    "hydra run dir": (["hydra.run.dir=outputs/x"], "hydra.run.dir=outputs/x: p3d does not apply this Hydra setting; set run.dir"),
    "hydra key added": (["+hydra.job.chdir=true"], "+hydra.job.chdir=true: p3d does not apply this Hydra setting; remove it"),
    "hydra launcher": (["hydra/launcher=joblib"], "hydra/launcher=joblib: p3d does not apply this Hydra setting"),
    "empty data file": (["data.path={root}/empty.txt"], "data.path={root}/empty.txt: the file is empty"),
    "whitespace data file": (["data.path={root}/blank.txt"], "data.path={root}/blank.txt: the file holds only whitespace"),
    "binary text file": (["data.path={root}/binary.txt"], "data.path={root}/binary.txt: the file is not UTF-8 text"),
    "binary jsonl file": (["data.path={root}/binary.jsonl"], "data.path={root}/binary.jsonl: the file is not UTF-8 text"),
    "jsonl not json": (["data.path={root}/not_json.jsonl"], "data.path={root}/not_json.jsonl: the file is not JSON"),
    "jsonl line not an object": (["data.path={root}/array_line.jsonl"], "its first line is a JSON list, not an object"),
    "parquet that is not": (["data.path={root}/fake.parquet"], "data.path={root}/fake.parquet: the file is not a Parquet file"),
    "directory with an empty file": (["data.path={root}/dir_with_empty"], "data.path={root}/dir_with_empty: b.txt is empty"),
    "chat row without messages": (["data=chat", "data.path={root}/chat_no_messages.jsonl"], "data.path={root}/chat_no_messages.jsonl: the file's first line has no 'messages' field (it has: text); set data.messages_field"),
    "chat unknown role": (["data=chat", "data.path={root}/chat_bad_role.jsonl"], "data.path={root}/chat_bad_role.jsonl: the file's first line message 0 has the unknown role 'bot'"),
    "chat messages not a list": (["data=chat", "data.path={root}/chat_not_list.jsonl"], "has a str in 'messages', not a list of messages"),
    "chat from a text file": (["data=chat", "data.path={root}/good.txt"], "data.path={root}/good.txt: the file is a .txt file, which cannot hold conversations"),
    "chat packed as a stream": (["data.format=chat"], "data.format=chat: conversations must not see each other; set data.packing=documents"),
    "mixture weights sum to zero": (["data.sources=[{path: null, weight: 0}]"], "data.sources: the weights sum to 0; give at least one source a positive weight"),
    "mixture weight negative": (["data.sources=[{weight: -1}, {weight: 2}]"], "data.sources[0].weight=-1.0: must be >= 0"),
    "mixture weight below resolution": (["data.sources=[{weight: 1}, {weight: 0.0001}]"], "data.sources[1].weight=0.0001: a share of 0.0001 is below the mixture's resolution"),
    "mixture weight not a number": (["data.sources=[{weight: abc}]"], "data.sources: Value 'abc' of type 'str' could not be converted to Float"),
    "mixture source key misspelt": (["data.sources=[{pth: x}]"], "data.sources: Key 'pth' not in 'SourceConfig'"),
    "mixture source missing": (["data.sources=[{path: {root}/good.txt}, {path: {root}/nope.jsonl}]"], "data.sources[1].path={root}/nope.jsonl: no such file or directory"),
    "mixture and path": (["data.path={root}/good.txt", "data.sources=[{weight: 1}]"], "data.sources: set either data.path={root}/good.txt (one source) or data.sources"),
    "eval path and fraction": (["data.eval_path={root}/good.txt", "data.eval_fraction=0.1"], "data.eval_path={root}/good.txt: set either data.eval_path or data.eval_fraction=0.1"),
    "eval path missing without a pass": (["data.eval_path={root}/nope.txt"], "data.eval_path={root}/nope.txt: no such file or directory"),
    "eval fraction one": (["data.eval_fraction=1"], "data.eval_fraction=1.0: must be in [0, 1)"),
}


@pytest.fixture
def user_env(tmp_path, monkeypatch):
    """A user without W&B credentials, in an empty working directory, with no debug switch set."""
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "RANK", "WORLD_SIZE", "P3D_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    write_data_files(tmp_path)
    monkeypatch.chdir(work)
    return {"root": str(tmp_path), "unwritable": unwritable_dir(tmp_path)}


def filled(texts, places):
    return [text.replace("{root}", places["root"]).replace("{unwritable}", places["unwritable"]) for text in texts]


def assert_one_line(code, stdout: str, stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("p3d: error: "), stderr[-3000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr


@pytest.mark.filterwarnings("error::UserWarning")  # a real process would print it: a second line
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_key(case, entry, user_env, capsys):
    overrides, expected = CASES[case]
    with pytest.raises(SystemExit) as exited:
        ENTRY_POINTS[entry](filled(overrides, user_env))
    out = capsys.readouterr()
    assert_one_line(exited.value.code, out.out, out.err, filled([expected], user_env)[0])
    assert not (Path.cwd() / "runs").exists()  # nothing written before validation passed


# Cases of the table as real processes, one per entry point as a user starts it (each costs an import
# of torch and transformers): what a process adds is its exit code and everything printed.
PROCESSES = {
    "python -m p3d.train": ([sys.executable, "-m", "p3d.train"], "bad interpolation"),
    "p3d train": ([sys.executable, "-m", "p3d.cli", "train"], "tp zero"),
    "p3d plan": ([sys.executable, "-m", "p3d.cli", "plan", "--world-size", "1"], "empty data file"),
}


@pytest.mark.parametrize("entry", list(PROCESSES))
def test_bad_input_as_a_process_is_one_line(entry, tmp_path):
    command, case = PROCESSES[entry]
    write_data_files(tmp_path)
    overrides, expected = CASES[case]
    places = {"root": str(tmp_path), "unwritable": ""}
    done = run_command([*command, *filled(overrides, places)], cwd=tmp_path)
    assert_one_line(done.returncode, done.stdout, done.stderr, filled([expected], places)[0])


DEEP_ROWS = {  # a bad row after 300 good ones: (format overrides, the bad line, what the one line says)
    "text": ([], '{"text": broken}', "data.path=corpus.jsonl: corpus.jsonl line 301 is not valid JSON (Expecting value at column 10); fix or remove that line"),
    "chat": (["data=chat"], '{"text": "no messages"}', "data.messages_field=messages: corpus.jsonl line 301 of data.path=corpus.jsonl has no such field (it has: text)"),
    "chat role": (["data=chat"], '{"messages": [{"role": "robot", "content": "x"}]}', "data.path=corpus.jsonl: corpus.jsonl line 301 message 0 has the unknown role 'robot'"),
}


@pytest.mark.parametrize("case", list(DEEP_ROWS))
def test_a_malformed_row_deep_in_a_data_file_is_one_line_naming_the_key(case, tmp_path):
    """The first lines pass the check before the run; the cache build finds the bad row and names it."""
    overrides, bad, expected = DEEP_ROWS[case]
    good = '{"messages": [{"role": "user", "content": "hi %d"}, {"role": "assistant", "content": "hello"}]}' if overrides else '{"text": "document %d with some words in it"}'
    (tmp_path / "corpus.jsonl").write_text("\n".join([*(good % i for i in range(300)), bad]) + "\n")
    done = run_command([sys.executable, "-m", "p3d.train", *FAST, *overrides, "data.path=corpus.jsonl", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert_one_line(done.returncode, done.stdout, done.stderr, expected)
    assert not list((tmp_path / "runs" / "data-cache").glob("corpus-*/manifest.json"))  # no cache entry from a failed build


def test_a_diverging_loss_is_a_run_error_with_its_own_exit_code(tmp_path):
    overrides = [*FAST, "optim.lr=1e10", "optim.grad_clip=0", "optim.warmup_steps=0", f"run.dir={tmp_path / 'run'}"]
    done = run_command([sys.executable, "-m", "p3d.train", *overrides], cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("p3d: error:")]
    assert done.returncode == 3, done.stderr[-3000:]
    assert len(errors) == 1 and "is not finite; lower optim.lr" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
