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
   its cache built; per-rank peak RSS (summary.json) and tokens/s (median of the step records
   after the first five). The same training on the small corpus with the data.py of `--baseline`
   (a git revision from before the cache: every rank tokenizes the whole corpus into one int64
   array in memory), alternated with the cached runs `--repeats` times, for the throughput
   comparison; that version cannot hold the large corpus (8 bytes per token per rank, and more
   while it tokenizes), so it runs on the small one only.

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
TRAIN = ["model=tiny_llama", "data.seq_len=128", "train.global_batch_size=16", "train.micro_batch_size=8", "train.steps=40", "checkpoint=none", "logging.every=10"]


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


def run_python(code: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})})
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
print(json.dumps({"wall_s": seconds, "manifest": entry.manifest,
  "builder_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  "largest_worker_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
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
        "final_loss": summary["loss"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def baseline_checkout(revision: str, directory: Path) -> Path:
    """src/ and conf/ of `revision`, extracted from git (the working tree is not touched)."""
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
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of the cached and the in-memory data for the throughput comparison")
    parser.add_argument("--baseline", default="5ce82a4", help="git revision with the in-memory data.py")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/p3d-data-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    args = parser.parse_args()
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


def measure(args, work: Path, large: int, small: int) -> dict:
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    print(f"generating {large:,} + {small:,} tokens in {work}", flush=True)
    started = time.perf_counter()
    corpora = {"large": generate(work / "large", large, args.file_mb * 2**20), "small": generate(work / "small", small, args.file_mb * 2**20, seed=1)}
    generate_s = time.perf_counter() - started
    cache = work / "cache"
    builds = {}
    for name in ("small", "large"):
        print(f"building the cache of the {name} corpus", flush=True)
        builds[name] = run_python(BUILD.replace("sys.argv[1]", repr(str(work / name))).replace("sys.argv[2]", repr(str(cache))))
    startup = run_python(STARTUP.replace("sys.argv[1]", repr(str(work / "large"))).replace("sys.argv[2]", repr(str(cache))))
    print("training", flush=True)
    memory = {name: train(f"cached-{name}", work / name, cache, work, args.nproc) for name in ("small", "large")}
    baseline_src = baseline_checkout(args.baseline, work / "baseline")
    throughput = {"cached": [memory["small"]["tokens_per_s"]], "in_memory": []}
    in_memory = []
    for repeat in range(args.repeats):
        in_memory.append(train(f"in-memory-{repeat}", work / "small", cache, work, args.nproc, source_root=baseline_src))
        throughput["in_memory"].append(in_memory[-1]["tokens_per_s"])
        if repeat + 1 < args.repeats:
            throughput["cached"].append(train(f"cached-small-{repeat}", work / "small", cache, work, args.nproc)["tokens_per_s"])
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
            "largest_worker_peak_rss_gb": round(build["largest_worker_peak_rss_gb"], 3),
        } for name, build in builds.items()},
        "second_start": {key: round(value, 4) if isinstance(value, float) else value for key, value in startup.items()},
        "training": {"cached_small": memory["small"], "cached_large": memory["large"], "in_memory_small": in_memory},
        "throughput_tokens_per_s": {"cached": throughput["cached"], "in_memory": throughput["in_memory"]},
        "settings": {"train": TRAIN, "nproc": args.nproc, "baseline": args.baseline},
    }


def report(results: dict) -> str:
    large, small = results["corpora"]["large"], results["corpora"]["small"]
    build = results["cache_build"]["large"]
    training = results["training"]
    rss = lambda run: "-".join(f"{value:.3f}" for value in sorted({min(run["peak_rss_gb_per_rank"]), max(run["peak_rss_gb_per_rank"])}))  # noqa: E731
    cached, in_memory = results["throughput_tokens_per_s"]["cached"], results["throughput_tokens_per_s"]["in_memory"]
    lines = [
        "# Data at scale: token cache, start-up, memory per rank",
        "",
        "Measured by `python benchmarks/data.py` (the script's docstring says what each figure is). "
        f"Machine: {results['machine']['cpus']} CPU cores, {results['machine']['load']} when it finished; "
        "**the times were measured under load** (other jobs shared the machine) and are for orientation; "
        "the memory figures (peak RSS) do not depend on load.",
        "",
        f"Synthetic corpora of byte tokens (UTF-8 text of random words, documents of a few KB, `.jsonl` files): "
        f"large {large['tokens']:,} tokens ({large['documents']:,} documents, {large['files']} files, {large['bytes_on_disk'] / 1e9:.2f} GB on disk); "
        f"small {small['tokens']:,} tokens.",
        "",
        "## Building the cache (first run) and starting again (second run)",
        "",
        "| | large corpus |",
        "| --- | --- |",
        f"| first run: cache build, wall | {build['wall_s']:.1f} s |",
        f"| first run: throughput | {build['tokens_per_s']:,.0f} tokens/s |",
        f"| processes used (one per available core) | {build['processes']} ({build['parts']} parts) |",
        f"| cache: dtype, size | {build['dtype']}, {build['tokens'] * 2 / 1e9:.2f} GB of tokens |",
        f"| peak RSS: builder process / largest worker | {build['builder_peak_rss_gb']:.3f} / {build['largest_worker_peak_rss_gb']:.3f} GB |",
        f"| second run: sampler ready (fingerprint, manifest, maps) | {results['second_start']['sampler_s'] * 1000:.0f} ms |",
        f"| second run: first global batch read | {results['second_start']['first_batch_s'] * 1000:.0f} ms |",
        "",
        "## Training: peak RSS per rank and throughput",
        "",
        f"`p3d.train` under torchrun, {results['settings']['nproc']} ranks (dp), {' '.join(results['settings']['train'])}.",
        "",
        "| run | corpus | peak RSS per rank (GB) | tokens/s |",
        "| --- | --- | --- | --- |",
        f"| token cache (memory-mapped) | small, {small['tokens']:,} tokens | {rss(training['cached_small'])} | {training['cached_small']['tokens_per_s']:,.0f} |",
        f"| token cache (memory-mapped) | large, {large['tokens']:,} tokens | {rss(training['cached_large'])} | {training['cached_large']['tokens_per_s']:,.0f} |",
        *(f"| in-memory int64 array ({results['settings']['baseline']}) | small | {rss(run)} | {run['tokens_per_s']:,.0f} |" for run in training["in_memory_small"]),
        "",
        f"Throughput on the small corpus, runs alternated: cached {', '.join(f'{v:,.0f}' for v in cached)} tokens/s "
        f"(median {statistics.median(cached):,.0f}); in-memory {', '.join(f'{v:,.0f}' for v in in_memory)} tokens/s "
        f"(median {statistics.median(in_memory):,.0f}).",
        "The in-memory version cannot run the large corpus: every rank would hold it as int64 "
        f"({large['tokens'] * 8 / 1e9:.0f} GB each), and more while it tokenizes.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
