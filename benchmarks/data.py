"""The data pipeline at scale: token cache build, start-up, and per-rank memory and throughput in training.

    python benchmarks/data.py                                   # what docs/results/data.md shows (1B tokens)
    python benchmarks/data.py --tokens 2e7 --out /tmp/data      # a quick look

1. Generates a synthetic corpus of `--tokens` byte tokens (UTF-8 text, one byte per token) as
   .jsonl files of `--file-mb` MB on disk (random words, documents of a few KB), and one of
   `--small-tokens` tokens; the free disk space is checked first, and everything is deleted
   at the end (unless --keep).
2. First run: a fresh process builds the token cache of the large corpus (`p3d.data.open_cache`
   with data.tokenize_workers=0, one worker process per available core): wall time, tokens/s,
   processes used, and the builder's and its workers' peak RSS.
3. Second run: a fresh process builds the sampler again (the cache exists): the seconds from the
   call to the first batch (fingerprint, manifest, maps, one global batch read).
4. Training: `p3d.train` under torchrun (`--nproc` ranks, dp), tiny Llama, on each corpus with
   its cache built; per-rank peak RSS (summary.json), tokens/s (median of the step records after
   the first five), the fastest step's tokens/s, and the time a step waits for its data. The same
   training on the small corpus with the data.py of `--baseline` (a git revision from before the
   cache: every rank tokenizes the whole corpus into one int64 array in memory), alternated with
   cached runs (ABBA order) for `--repeats` rounds, for the throughput comparison; that version
   cannot hold the large corpus (8 bytes per token per rank, and more while it tokenizes), so it
   runs on the small one only.
5. Paired steps: in one process, one model trained with both samplers of the small corpus, their
   steps alternated, each step timed (read, forward, backward, optimizer step): the comparison
   that the load of other jobs disturbs least. The cache is read as the trainer reads it: each
   step's data prefetched on a background thread while the step before trains.
   `--only-paired` runs just this part (on the small corpus; the rest of the report is left out).

Timings on a loaded machine are marked so in the output; the memory figures (RSS) are not
affected by load. Writes <out>/data.md and <out>/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 128, 16, 8
TRAIN = ["model=tiny_llama", f"data.seq_len={SEQ_LEN}", f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO_BATCH}", "train.steps=40", "checkpoint=none", "logging.every=10"]


def generate(directory: Path, tokens: int, file_bytes: int, seed: int = 0) -> dict:
    """`.jsonl` files of documents of random words; returns the corpus' size (bytes of text, documents)."""
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters[: rng.randint(5, 26)]) for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    pool = " ".join(rng.choice(words) for _ in range(2_000_000))  # ~10 MB of text, cut into documents below
    text_bytes = documents = index = 0
    while text_bytes < tokens:
        path = directory / f"part-{index:05d}.jsonl"
        written = 0
        with path.open("w") as stream:
            while written < file_bytes and text_bytes < tokens:
                length = min(int(rng.lognormvariate(8.0, 0.7)), 60_000)
                start = rng.randrange(len(pool) - length)
                text = f"Document {documents}. " + pool[start : start + length]
                line = json.dumps({"text": text}) + "\n"
                stream.write(line)
                written += len(line)
                text_bytes += len(text) + 1  # + its end-of-document token
                documents += 1
        index += 1
    return {"tokens": text_bytes, "documents": documents, "files": index, "bytes_on_disk": sum(p.stat().st_size for p in directory.iterdir())}


def run_python(code: str, argv: list[str] = ()) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


BUILD = """
import json, resource, sys, time
from pathlib import Path
from p3d.config.compose import compose, to_object
from p3d.data import ByteTokenizer, open_cache, training_sources
config = to_object(compose([f"data.path={sys.argv[1]}"]))
(source,) = training_sources(config.data)
started = time.perf_counter()
entry = open_cache(source, ByteTokenizer(), Path(sys.argv[2]), workers=0)
seconds = time.perf_counter() - started
print(json.dumps({"wall_s": seconds, "manifest": entry.manifest, "builder_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

STARTUP = """
import json, resource, sys, time
from pathlib import Path
from p3d.config.compose import compose, to_object
from p3d.data import build_sampler
config = to_object(compose([f"data.path={sys.argv[1]}", f"data.cache_dir={sys.argv[2]}", "data.seq_len=128"]))
started = time.perf_counter()
sampler = build_sampler(config.data, config.model, 0, 16, 8, 2, 0)
ready = time.perf_counter() - started
sampler.micro_batches(0)
first_batch = time.perf_counter() - started
print(json.dumps({"sampler_s": ready, "first_batch_s": first_batch, "windows": int(sampler.order.shuffles[0].count)}))
"""


PAIRED = """
import importlib.util, json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM
from p3d.config.compose import compose, to_object
from p3d.data import IGNORE_INDEX, BatchPrefetcher, build_sampler
from p3d.model import build_hf_config
corpus, cache, baseline_data, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
config = to_object(compose(["model=tiny_llama", f"data.path={corpus}", f"data.cache_dir={cache}", "data.seq_len=SEQ_LEN"]))
spec = importlib.util.spec_from_file_location("baseline_data", baseline_data)
baseline = sys.modules["baseline_data"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline)
samplers = {
    "in_memory": baseline.build_sampler(config.data, config.model, 0, GLOBAL_BATCH, MICRO_BATCH, 1, 0),
    "cached": build_sampler(config.data, config.model, 0, GLOBAL_BATCH, MICRO_BATCH, 1, 0),
}
for stream in samplers["cached"].streams:  # in the page cache, as the in-memory array is in memory
    int(stream.tokens.sum())
    stream._release()
model = AutoModelForCausalLM.from_config(build_hf_config(config.model))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
prefetcher = BatchPrefetcher(samplers["cached"])  # as the trainer reads the cache: the next step while this one trains

def read(kind, consumed):
    if kind == "in_memory":
        return samplers[kind].micro_batches(consumed)
    batches = prefetcher.take(consumed).micro_batches
    prefetcher.prefetch(consumed + GLOBAL_BATCH)
    return batches

def step(kind, consumed):
    started = time.perf_counter()
    batches = read(kind, consumed)
    waited = time.perf_counter() - started
    for batch in batches:
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, waited

times = {kind: [] for kind in samplers}
for index in range(steps + 5):
    order = ("in_memory", "cached") if index % 2 == 0 else ("cached", "in_memory")
    for kind in order:
        seconds, waited = step(kind, index * GLOBAL_BATCH)
        if index >= 5:
            times[kind].append((seconds, waited))
prefetcher.close()
results = {kind: {"step_ms": [round(s * 1000, 3) for s, _ in values], "wait_ms": [round(w * 1000, 4) for _, w in values]} for kind, values in times.items()}

# the same reads from a cache whose pages are not in memory: dropped from the page cache first
import os
from pathlib import Path
from p3d.data import build_tokenizer, open_cache, training_sources
entry = open_cache(training_sources(config.data)[0], build_tokenizer(config.data, config.model), Path(cache))
descriptor = os.open(entry.directory / "train.tokens.bin", os.O_RDONLY)
cold = []
for index in range(50):
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    started = time.perf_counter()
    samplers["cached"].micro_batches((10_000 + index) * GLOBAL_BATCH)
    cold.append(round((time.perf_counter() - started) * 1000, 4))
results["cold_read_ms"] = cold
print(json.dumps(results))
""".replace("SEQ_LEN", str(SEQ_LEN)).replace("GLOBAL_BATCH", str(GLOBAL_BATCH)).replace("MICRO_BATCH", str(MICRO_BATCH))


def train(name: str, corpus: Path, cache: Path, workdir: Path, nproc: int, source_root: Path | None = None) -> dict:
    """A training run under torchrun; source_root: another checkout's src/ (the baseline's data.py)."""
    run_dir = workdir / "runs" / name
    overrides = [*TRAIN, f"data.path={corpus}", f"run.dir={run_dir}", f"parallel.dp={nproc}"]
    if source_root is None:
        overrides.append(f"data.cache_dir={cache}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(workdir / "hf-datasets")}
    env["PYTHONPATH"] = str(source_root or ROOT / "src")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "p3d.train", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name,
        "peak_rss_gb_per_rank": summary["peak_mem_gb_per_rank"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[5:]),
        "fastest_step_tokens_per_s": max(r["tokens_per_s"] for r in records[5:]),  # the step least slowed by other jobs
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in records[5:]),
        "data_wait_ms": statistics.median(r["data_wait_frac"] * r["step_time_s"] * 1000 for r in records[5:]),
        "final_loss": summary["loss"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def baseline_checkout(revision: str, directory: Path) -> Path:
    """src/ and conf/ of `revision`, extracted from git (the working tree is not touched), once."""
    if directory.exists():
        return directory / "src"
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src", "conf", "recipes"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory / "src"


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1.0e9, help="byte tokens of the large corpus")
    parser.add_argument("--small-tokens", type=float, default=1.0e7, help="byte tokens of the small corpus")
    parser.add_argument("--file-mb", type=int, default=64, help="size of each .jsonl file")
    parser.add_argument("--nproc", type=int, default=2, help="training ranks")
    parser.add_argument("--paired-steps", type=int, default=300, help="steps of each kind in the paired comparison in one process")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the cached and the in-memory data for the throughput comparison")
    parser.add_argument("--baseline", default="5ce82a4", help="git revision with the in-memory data.py")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/p3d-data-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--only-paired", action="store_true", help="re-measure only the paired steps in one process; the rest of <out>/data.json stays")
    args = parser.parse_args()
    if args.only_paired:
        return remeasure_paired(args)
    large, small = int(args.tokens), int(args.small_tokens)
    needed = large * 3.3 + small * 3.3 + 2e9  # text + jsonl quoting, a uint16 cache, margin
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < needed:
        raise SystemExit(f"--workdir {args.workdir}: {free / 1e9:.1f} GB free, the benchmark needs about {needed / 1e9:.1f} GB")
    work = Path(args.workdir) / f"run-{os.getpid()}"
    try:
        results = measure(args, work, large, small)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "data.md").write_text(report(results))
    print(report(results))


def paired_steps(args, work: Path, cache: Path) -> dict:
    print("training: paired steps in one process", flush=True)
    baseline_src = baseline_checkout(args.baseline, work / "baseline")
    paired = run_python(PAIRED, [str(work / "small"), str(cache), str(baseline_src / "p3d" / "data.py"), str(args.paired_steps)])
    paired["load"] = machine_load()
    return paired


def remeasure_paired(args) -> None:
    results = json.loads((args.out / "data.json").read_text())
    work = Path(args.workdir) / f"run-{os.getpid()}"
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    try:
        generate(work / "small", int(args.small_tokens), args.file_mb * 2**20, seed=1)
        run_python(BUILD, [str(work / "small"), str(work / "cache")])
        results["paired_steps"] = paired_steps(args, work, work / "cache")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    (args.out / "data.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "data.md").write_text(report(results))
    print(report(results))


def measure(args, work: Path, large: int, small: int) -> dict:
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")  # the in-memory version reads files through datasets
    print(f"generating {large:,} + {small:,} tokens in {work}", flush=True)
    started = time.perf_counter()
    corpora = {"large": generate(work / "large", large, args.file_mb * 2**20), "small": generate(work / "small", small, args.file_mb * 2**20, seed=1)}
    generate_s = time.perf_counter() - started
    cache = work / "cache"
    builds = {}
    for name in ("small", "large"):
        print(f"building the cache of the {name} corpus", flush=True)
        builds[name] = run_python(BUILD, [str(work / name), str(cache)])
    startup = run_python(STARTUP, [str(work / "large"), str(cache)])
    print("training: peak RSS per rank", flush=True)
    memory = {name: train(f"cached-{name}", work / name, cache, work, args.nproc) for name in ("small", "large")}
    baseline_src = baseline_checkout(args.baseline, work / "baseline")
    comparison = {"cached": [], "in_memory": []}
    for repeat in range(args.repeats):  # alternated (ABBA), so that a change in the machine's load hits both alike
        print(f"training: throughput, round {repeat + 1} of {args.repeats}", flush=True)
        for kind in ("in_memory", "cached") if repeat % 2 == 0 else ("cached", "in_memory"):
            source_root = baseline_src if kind == "in_memory" else None
            comparison[kind].append(train(f"{kind}-small-{repeat}", work / "small", cache, work, args.nproc, source_root=source_root))
    paired = paired_steps(args, work, cache)
    return {
        "machine": {"cpus": os.cpu_count(), "load": machine_load(), "note": "timings measured under load (other jobs on the machine); RSS is not affected"},
        "corpora": corpora,
        "generate_s": round(generate_s, 1),
        "cache_build": {name: {
            "tokens": build["manifest"]["parts"]["train"]["tokens"],
            "wall_s": round(build["wall_s"], 2),
            "tokens_per_s": round(build["manifest"]["parts"]["train"]["tokens"] / build["wall_s"]),
            "processes": build["manifest"]["build"]["processes"],
            "parts": build["manifest"]["build"]["units"],
            "dtype": build["manifest"]["dtype"],
            "builder_peak_rss_gb": round(build["builder_peak_rss_gb"], 3),
            "largest_worker_peak_rss_gb": build["manifest"]["build"]["peak_rss_gb"],
        } for name, build in builds.items()},
        "second_start": {key: round(value, 4) if isinstance(value, float) else value for key, value in startup.items()},
        "training": {"cached_small": memory["small"], "cached_large": memory["large"]},
        "comparison": comparison,
        "paired_steps": paired,
        "settings": {"train": TRAIN, "nproc": args.nproc, "baseline": args.baseline, "file_mb": args.file_mb, "repeats": args.repeats},
    }


def report(results: dict) -> str:
    large, small = results["corpora"]["large"], results["corpora"]["small"]
    builds = results["cache_build"]
    training, comparison = results["training"], results["comparison"]
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731

    def rss(run: dict) -> str:
        low, high = min(run["peak_rss_gb_per_rank"]), max(run["peak_rss_gb_per_rank"])
        return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f} / {high:.3f}"

    def build_row(label: str, key: str, form: str) -> str:
        return f"| {label} | " + " | ".join(form.format(builds[name][key]) for name in ("small", "large")) + " |"

    paired = results["paired_steps"]
    paired_difference = statistics.median(b - a for a, b in zip(paired["in_memory"]["step_ms"], paired["cached"]["step_ms"]))
    small_rss, large_rss = max(training["cached_small"]["peak_rss_gb_per_rank"]), max(training["cached_large"]["peak_rss_gb_per_rank"])
    lines = [
        "# Data at scale: token cache, start-up, memory per rank",
        "",
        "Measured by `python benchmarks/data.py` (the script's docstring says what each figure is). "
        f"Machine: {results['machine']['cpus']} CPU cores, shared with other jobs ({results['machine']['load']} when it finished): "
        "**the times and throughputs were measured under load** and are for orientation; "
        "the memory figures (peak RSS) do not depend on load.",
        "",
        "Synthetic corpora generated on disk by the script (UTF-8 text of random words, documents of a few KB, "
        f"`.jsonl` files of {results['settings']['file_mb']} MB, byte tokenizer: one token per byte plus one end-of-document token per document):",
        "",
        "| corpus | tokens | documents | files | on disk |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {name} | {c['tokens']:,} | {c['documents']:,} | {c['files']} | {c['bytes_on_disk'] / 1e9:.2f} GB |" for name, c in (("small", small), ("large", large))),
        "",
        "## First run: building the cache; second run: starting again",
        "",
        "| | small corpus | large corpus |",
        "| --- | --- | --- |",
        build_row("first run: cache build, wall", "wall_s", "{:,.2f} s"),
        build_row("first run: tokens/s", "tokens_per_s", "{:,.0f}"),
        build_row("processes that tokenized (one per available core)", "processes", "{}"),
        build_row("parts (files, 32 MB ranges of a file)", "parts", "{}"),
        build_row("token dtype", "dtype", "{}"),
        build_row("peak RSS of the building process (GB)", "builder_peak_rss_gb", "{:.3f}"),
        build_row("peak RSS of the largest tokenizing worker (GB)", "largest_worker_peak_rss_gb", "{:.3f}"),
        "",
        f"Second run over the large corpus (the cache exists), in a fresh process: the sampler is ready (fingerprint of "
        f"the {large['files']} files, manifest, maps) {results['second_start']['sampler_s'] * 1000:,.0f} ms after the call, "
        f"the first global batch is read {results['second_start']['first_batch_s'] * 1000:,.0f} ms after it "
        f"({results['second_start']['windows']:,} windows of {SEQ_LEN + 1} tokens).",
        "",
        "## Training: peak RSS per rank",
        "",
        f"`p3d.train` under torchrun, {results['settings']['nproc']} ranks (dp), `{' '.join(results['settings']['train'])}`, "
        "the cache built beforehand.",
        "",
        "| corpus | peak RSS per rank (GB) | tokens/s | waiting for data per step (ms) |",
        "| --- | --- | --- | --- |",
        *(f"| {name}, {c['tokens']:,} tokens | {rss(training[key])} | {training[key]['tokens_per_s']:,.0f} | {training[key]['data_wait_ms']:.2f} |"
          for name, c, key in (("small", small, "cached_small"), ("large", large, "cached_large"))),
        "",
        f"Per-rank peak RSS, large against small corpus: {large_rss - small_rss:+.3f} GB ({(large_rss / small_rss - 1):+.1%}) "
        f"for {large['tokens'] / small['tokens']:.0f} times the tokens. Each rank maps the cache and reads a step's windows "
        "on demand; the in-memory array of the version before would hold "
        f"{large['tokens'] * 8 / 1e9:.1f} GB per rank for the large corpus (int64), and more while it tokenizes, so it was not run on it.",
        "",
        "## Training: throughput against the in-memory array",
        "",
        f"The small corpus, the same training, with the token cache and with the data.py of {results['settings']['baseline']} "
        "(every rank tokenizes the corpus into one int64 array in memory), runs alternated, tokens/s the median of the steps after the fifth:",
        "",
        "| round | tokens/s: in-memory | tokens/s: cache | fastest step, tokens/s: in-memory | fastest step, tokens/s: cache | waiting for data per step (ms): in-memory | waiting for data per step (ms): cache |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {index + 1} | {memory['tokens_per_s']:,.0f} | {cached['tokens_per_s']:,.0f} | {memory['fastest_step_tokens_per_s']:,.0f} | "
          f"{cached['fastest_step_tokens_per_s']:,.0f} | {memory['data_wait_ms']:.2f} | {cached['data_wait_ms']:.2f} |"
          for index, (memory, cached) in enumerate(zip(comparison["in_memory"], comparison["cached"]))),
        "| **median** | " + " | ".join(f"**{median(comparison[kind], key):{form}}**" for key, form in (("tokens_per_s", ",.0f"), ("fastest_step_tokens_per_s", ",.0f"), ("data_wait_ms", ".2f"))
                                        for kind in ("in_memory", "cached")) + " |",
        "",
        f"Cache over in-memory, median tokens/s: {median(comparison['cached'], 'tokens_per_s') / median(comparison['in_memory'], 'tokens_per_s'):.3f}; "
        f"median of the fastest steps: {median(comparison['cached'], 'fastest_step_tokens_per_s') / median(comparison['in_memory'], 'fastest_step_tokens_per_s'):.3f}. "
        "The two runs differ only in how a step gets its windows (the model, its step and the metrics are the same code): "
        "the in-memory version gathers them from its array, the cache's sampler computes their positions and reads them "
        "from the map. The last two columns time that at the start of each step: "
        f"{median(comparison['cached'], 'data_wait_ms') - median(comparison['in_memory'], 'data_wait_ms'):+.2f} ms "
        f"per step (median) with the cache, in a step of {GLOBAL_BATCH * SEQ_LEN / median(comparison['cached'], 'tokens_per_s') * 1000:.0f} ms. "
        "The spread of tokens/s between rounds of the same kind is the load of the other jobs.",
        "",
        "### Step by step in one process",
        "",
        "Runs seconds apart see different loads. So the same comparison once more in one process: one model "
        f"(tiny Llama, AdamW), the two samplers of the small corpus (one rank, {GLOBAL_BATCH} sequences of {SEQ_LEN} tokens per step), "
        f"their steps alternated (ABBA), {len(paired['cached']['step_ms'])} steps of each; a step is reading its batch, forward, backward and the optimizer step. "
        "The cache is read as the trainer reads it: the next step's batch on a background thread while a step trains"
        + (f" (measured at {paired['load']})." if "load" in paired else "."),
        "",
        "| | in-memory array | token cache |",
        "| --- | --- | --- |",
        "| median step (ms) | " + " | ".join(f"{statistics.median(paired[kind]['step_ms']):.1f}" for kind in ("in_memory", "cached")) + " |",
        "| tokens/s at the median step | " + " | ".join(f"{GLOBAL_BATCH * SEQ_LEN / statistics.median(paired[kind]['step_ms']) * 1000:,.0f}" for kind in ("in_memory", "cached")) + " |",
        "| fastest step (ms) | " + " | ".join(f"{min(paired[kind]['step_ms']):.1f}" for kind in ("in_memory", "cached")) + " |",
        "| reading the step's batch, median (ms) | " + " | ".join(f"{statistics.median(paired[kind]['wait_ms']):.2f}" for kind in ("in_memory", "cached")) + " |",
        "",
        f"Median of the differences of neighbouring steps (cache minus in-memory): {paired_difference:+.2f} ms per step. "
        "Both read from memory here (the cache's pages were read once before the steps, as they are after a few epochs "
        "or when the cache was just built). From a cache whose pages are not in memory (dropped from the page cache before "
        f"each read), reading a step's {GLOBAL_BATCH} windows took {statistics.median(paired['cold_read_ms']):.2f} ms (median of "
        f"{len(paired['cold_read_ms'])}): one random read from disk per window.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
