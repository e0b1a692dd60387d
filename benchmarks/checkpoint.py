"""Checkpoint save and load of an OPT-1.3B-shaped model under tp2dp2cp2 (8 ranks), sync against async.

    python benchmarks/checkpoint.py                                   # what docs/results/checkpoint.md shows
    python benchmarks/checkpoint.py --layers 1 --saves 1 --out /tmp/ckpt   # a quick look

The full OPT-1.3B in fp32 with AdamW state (about 21 GB over the ranks, plus an in-memory copy for
an async save) does not fit the development machine beside other jobs, and even one decoder layer
with the real 50272-token vocabulary takes 12 GB there (8 processes, each with its imports and the
FSDP working set of a 50M-parameter layer). So the runs use OPT-1.3B's decoder layers unchanged
(hidden 2048, ffn 8192, 32 heads, with biases and layer norms) with `model.config.num_hidden_layers`
cut to each of `--layers` and the vocabulary cut to `--vocab-size`. For each layer count it runs
`p3d.train` under torchrun three times: sync saves, async saves (`checkpoint.async_mode=thread`),
and a resume from the last checkpoint. Saves happen every `--every` steps; the figures are the
medians over the saves made while training was still going (the final save, after which training
has nothing left to overlap, is left out):

- save time: sync, the whole save; async, from the save call until rank 0's background write
  finished (the completion marker's save_s);
- blocked: how long the train loop waited for the save (the step record's checkpoint_blocked_s);
- size: the bytes of the checkpoint directory; load: the resume's load time (summary.json).

The estimate for the whole OPT-1.3B is an extrapolation, labelled as such: every figure is a fixed
part plus a per-layer part (two layer counts give both); the checkpoint size adds 12 bytes (fp32
weight, AdamW exp_avg and exp_avg_sq) per parameter of the embedding rows that the cut vocabulary
left out, and the times add those bytes at the per-layer part's seconds per byte. The size
estimate is checked against 12 bytes per parameter of the real model. The peak memory of each
job's process tree (sum of PSS) is sampled and the job is stopped if it passes --max-memory-gb.
Writes <out>/checkpoint.md and <out>/checkpoint.json.

The cost of the checkpoint checksums (xxh3-128 of every file, taken while it is written):

    python benchmarks/checkpoint.py --checksums compare --repeats 5   # checksums on against off

runs sync-save and async-save jobs with `checkpoint.checksums=true` and `false` alternately
(on, off, off, on, on, off, ... so drift over time does not favour either), `--repeats` jobs of
each, and reports the median save time of each setting over all mid-training saves (the marker's
save_s) and the difference. Writes <out>/checkpoint_checksums.md and .json. `--checksums on|off`
sets the checksums for the plain benchmark above (default on, as p3d's default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FULL_LAYERS = 24
FULL_VOCAB = 50272


def process_tree(root: int) -> set[int]:
    """A process and all its descendants (torchrun's workers run in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def pss_gb(pids: set[int]) -> float:
    """The sum of the processes' PSS (proportional set size), which counts a page shared by N
    processes (torch's libraries) as 1/N in each, unlike RSS."""
    total_kib = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kib += next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total_kib / 2**20


def run_job(command: list[str], max_memory_gb: float) -> float:
    """Run a command, sampling its process tree's memory (PSS); returns the peak in GB."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    peak, over = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            pids = process_tree(process.pid)
            peak = max(peak, pss_gb(pids))
            if peak > max_memory_gb:
                over.set()
                for pid in sorted(pids, reverse=True):  # the workers first, then torchrun
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    if over.is_set():
        raise SystemExit(f"stopped: the job's processes used more than --max-memory-gb={max_memory_gb} GB\n{' '.join(command)}")
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{stderr[-3000:]}")
    return peak


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "p3d.train"]


def base_overrides(layers: int, args, checksums: str | None = None) -> list[str]:
    return [
        "model=opt1.3b", f"model.config.num_hidden_layers={layers}", f"model.config.vocab_size={args.vocab_size}", "parallel=tp2dp2cp2",
        f"data.seq_len={args.seq_len}", "train.global_batch_size=4", "train.micro_batch_size=2",
        f"checkpoint.checksums={(checksums or args.checksums) == 'on'}",
    ]


def save_times(layers: int, args, workdir: Path, mode: str, checksums: str) -> list[float]:
    """One job with saves every --every steps; the save_s of each mid-training save (its marker)."""
    steps = args.every * (args.saves + 1)
    run_dir = workdir / f"L{layers}-{mode}-checksums-{checksums}"
    overrides = [*base_overrides(layers, args, checksums), f"train.steps={steps}", f"checkpoint.every={args.every}",
                 f"checkpoint.async_mode={mode}", f"run.dir={run_dir}"]
    run_job(torchrun(8) + overrides, args.max_memory_gb)
    markers = [json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "p3d_complete.json").read_text())
               for step in range(args.every, steps, args.every)]
    assert all((marker["checksum"] is not None) == (checksums == "on") for marker in markers)
    shutil.rmtree(run_dir)
    return [marker["save_s"] for marker in markers]


def compare_checksums(layers: int, args, workdir: Path) -> list[dict]:
    """Save times with checksums on and off, alternated job by job; medians over all their saves."""
    rows = []
    for mode in ("disabled", "thread"):
        times: dict[str, list[float]] = {"on": [], "off": []}
        for repeat in range(args.repeats):
            order = ("on", "off") if repeat % 2 == 0 else ("off", "on")
            for checksums in order:
                times[checksums] += save_times(layers, args, workdir, mode, checksums)
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        rows.append({"layers": layers, "mode": "sync" if mode == "disabled" else "async", "saves": len(times["on"]),
                     "save_s_checksums_on": on, "save_s_checksums_off": off, "cost": on / off - 1, "all": times})
        print(f"layers={layers} {rows[-1]['mode']}: save {on:.3f} s with checksums, {off:.3f} s without "
              f"({100 * rows[-1]['cost']:+.1f} %), medians over {len(times['on'])} saves each", flush=True)
    return rows


def render_checksums(rows: list[dict], args) -> str:
    lines = [
        f"OPT-1.3B's decoder layers cut to {', '.join(sorted({str(r['layers']) for r in rows}))} layer(s), vocabulary {args.vocab_size}, "
        f"tp2dp2cp2 on 8 ranks (torchrun, gloo, CPU), fp32 weights and AdamW state; saves every {args.every} steps. "
        f"{args.repeats} jobs with checksums and {args.repeats} without, alternated; each figure is the median save time "
        f"(the completion marker's save_s: sync, the whole save; async, until rank 0's background write finished) "
        f"over all mid-training saves of those jobs.",
        "",
        "| layers | save | saves per setting | checksums on | checksums off | cost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['mode']} | {r['saves']} | {r['save_s_checksums_on']:.3f} s | {r['save_s_checksums_off']:.3f} s | {100 * r['cost']:+.1f} % |")
    return "\n".join(lines) + "\n"


def measure(layers: int, args, workdir: Path) -> dict:
    """One layer count: a sync-save run, an async-save run, a resume; medians over the mid-training saves."""
    steps = args.every * (args.saves + 1)
    result: dict = {"layers": layers}
    for mode in ("disabled", "thread"):
        run_dir = workdir / f"L{layers}-{mode}"
        overrides = [*base_overrides(layers, args), f"train.steps={steps}", f"checkpoint.every={args.every}",
                     f"checkpoint.async_mode={mode}", f"run.dir={run_dir}"]
        peak = run_job(torchrun(8) + overrides, args.max_memory_gb)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        saves = [r for r in records if r["step"] % args.every == 0 and r["step"] < steps]
        checkpoints = run_dir / "checkpoints"
        markers = [json.loads((checkpoints / f"step_{r['step']:08d}" / "p3d_complete.json").read_text()) for r in saves]
        assert all(marker["async"] == (mode == "thread") for marker in markers)
        key = "sync" if mode == "disabled" else "async"
        result[f"{key}_blocked_s"] = statistics.median(r["checkpoint_blocked_s"] for r in saves)
        result[f"{key}_save_s"] = statistics.median(marker["save_s"] for marker in markers)
        result[f"{key}_step_s"] = statistics.median(r["step_time_s"] for r in records[1:])
        result[f"{key}_peak_memory_gb"] = peak
        final = checkpoints / f"step_{steps:08d}"
        result["size_bytes"] = directory_bytes(final)
        if mode == "thread":
            result["final_checkpoint"] = str(final)
        else:
            shutil.rmtree(run_dir)
        print(f"layers={layers} {key}: save {result[f'{key}_save_s']:.2f} s, blocked {result[f'{key}_blocked_s']:.2f} s, "
              f"size {result['size_bytes'] / 1e9:.3f} GB, peak memory (PSS) of the job {peak:.1f} GB", flush=True)
    resume_dir = workdir / f"L{layers}-resume"
    overrides = [*base_overrides(layers, args), f"train.steps={steps + 1}", "checkpoint.every=0", "checkpoint.at_end=false",
                 f"checkpoint.load_from={result.pop('final_checkpoint')}", f"run.dir={resume_dir}"]
    result["load_peak_memory_gb"] = run_job(torchrun(8) + overrides, args.max_memory_gb)
    result["load_s"] = json.loads((resume_dir / "summary.json").read_text())["resume_load_s"]
    print(f"layers={layers}: load {result['load_s']:.2f} s", flush=True)
    shutil.rmtree(resume_dir)
    shutil.rmtree(workdir / f"L{layers}-thread")
    return result


def parameter_count(layers: int, vocab_size: int) -> int:
    from p3d.config.compose import compose, to_object
    from p3d.model import build_hf_config, build_meta_model

    config = to_object(compose(["model=opt1.3b", f"model.config.num_hidden_layers={layers}", f"model.config.vocab_size={vocab_size}"]))
    model = build_meta_model(build_hf_config(config.model))
    return sum(p.numel() for p in model.parameters())


def linear_fit(rows: list[dict], key: str) -> tuple[float, float]:
    """(fixed part, per layer) from the first and last layer counts."""
    first, last = rows[0], rows[-1]
    per_layer = (last[key] - first[key]) / (last["layers"] - first["layers"])
    return first[key] - per_layer * first["layers"], per_layer


def render(rows: list[dict], args, params: dict) -> str:
    gb = 1e9
    hidden = 2048
    lines = [
        f"OPT-1.3B's decoder layers (hidden 2048, ffn 8192, 32 heads, tied embeddings) with the decoder cut to "
        f"{', '.join(str(r['layers']) for r in rows)} layer(s) and the vocabulary cut from {FULL_VOCAB} to {args.vocab_size} "
        f"tokens (memory: see benchmarks/checkpoint.py); tp2dp2cp2 on 8 ranks (torchrun, gloo, CPU); fp32 weights and "
        f"AdamW state; seq_len {args.seq_len}, global batch 4; saves every {args.every} steps, medians over "
        f"{args.saves} mid-training saves per run. Measured on the development machine (2 cores shared with other "
        f"jobs, local disk): times are noisy.",
        "",
        "## Measured",
        "",
        "| layers | parameters | checkpoint size | save, sync | save, async (total) | async: training blocked | load (resume) | step time (sync run / async run) | peak memory of the job, PSS (sync / async / load) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {params[(r['layers'], args.vocab_size)] / 1e6:,.0f} M | {r['size_bytes'] / gb:.3f} GB | {r['sync_save_s']:.2f} s | "
            f"{r['async_save_s']:.2f} s | {r['async_blocked_s']:.2f} s | {r['load_s']:.2f} s | {r['sync_step_s']:.2f} / {r['async_step_s']:.2f} s | "
            f"{r['sync_peak_memory_gb']:.1f} / {r['async_peak_memory_gb']:.1f} / {r['load_peak_memory_gb']:.1f} GB |"
        )
    sync_blocked = [r["sync_blocked_s"] for r in rows]
    async_blocked = [r["async_blocked_s"] for r in rows]
    lines += [
        "",
        f"Training waited {min(async_blocked):.2f}-{max(async_blocked):.2f} s for an async save (copying the state into "
        f"memory; the write then overlaps the next steps) against {min(sync_blocked):.2f}-{max(sync_blocked):.2f} s for "
        f"a sync save of the same checkpoint.",
    ]
    if all(r["async_save_s"] > r["sync_save_s"] for r in rows):
        lines[-1] += " An async save takes longer in total here: its background write shares the machine's cores with training."
    if len(rows) < 2:
        return "\n".join(lines) + "\n"
    full_params = params[(FULL_LAYERS, FULL_VOCAB)]
    # The left-out embedding rows: fp32 weight and two AdamW moments, plus the weight once more as
    # the tied output head, which the model's state dict (and so the checkpoint) holds under its own name.
    extra_bytes = 16 * (FULL_VOCAB - args.vocab_size) * hidden
    size_fixed, size_per_layer = linear_fit(rows, "size_bytes")
    full_size = size_fixed + extra_bytes + FULL_LAYERS * size_per_layer
    lines += [
        "",
        f"## Estimated for the whole OPT-1.3B ({FULL_LAYERS} layers, vocabulary {FULL_VOCAB}): extrapolated, not measured",
        "",
        f"Fixed part and per-layer part from the {rows[0]['layers']}- and {rows[-1]['layers']}-layer runs; the "
        f"{(FULL_VOCAB - args.vocab_size) * hidden / 1e6:.0f} M embedding parameters the cut vocabulary left out add "
        f"{extra_bytes / gb:.2f} GB (16 bytes each: weight, two AdamW moments, and the weight again as the tied "
        f"output head `lm_head.weight`, which the checkpoint stores under its own name), and to each time their bytes "
        f"at the per-layer part's seconds per byte.",
        "",
        "| figure | fixed part (cut vocabulary) | per layer | estimate for OPT-1.3B |",
        "| --- | --- | --- | --- |",
        f"| checkpoint size | {size_fixed / gb:.3f} GB | {size_per_layer / gb:.3f} GB | {full_size / gb:.2f} GB |",
    ]
    for key, label in (("sync_save_s", "save, sync"), ("async_save_s", "save, async (total)"),
                       ("async_blocked_s", "async: training blocked"), ("load_s", "load (resume)")):
        fixed, per_layer = linear_fit(rows, key)
        full = fixed + per_layer * (FULL_LAYERS + extra_bytes / size_per_layer)
        lines.append(f"| {label} | {fixed:.2f} s | {per_layer:.2f} s | {full:.1f} s |")
    noisy = [label for key, label in (("sync_save_s", "save, sync"), ("async_save_s", "save, async"),
                                      ("async_blocked_s", "async: training blocked"), ("load_s", "load"))
             if min(linear_fit(rows, key)) < 0]
    if noisy:
        lines += ["", f"A negative part ({', '.join(noisy)}) means the run-to-run noise of this shared machine is larger "
                      f"than that part; the time estimates are rough, the size estimate is not."]
    lines += [
        "",
        f"Check of the size: OPT-1.3B has {full_params / 1e9:.3f} B parameters; 12 bytes each plus the tied head's "
        f"copy is {(12 * full_params + 4 * FULL_VOCAB * hidden) / gb:.2f} GB, against the estimate of {full_size / gb:.2f} GB "
        f"(the rest: the step counters, DCP's metadata, the stored configs and the random-number states).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,2", help="comma-separated decoder layer counts (two or more to extrapolate)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--every", type=int, default=2, help="steps between saves")
    parser.add_argument("--saves", type=int, default=2, help="mid-training saves per run (plus the final one)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the runs (OPT-1.3B's is 50272)")
    parser.add_argument("--max-memory-gb", type=float, default=10.0, help="stop a job whose processes use more than this (GB, PSS)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--from-json", help="render the tables again from a checkpoint.json this script wrote (no runs)")
    parser.add_argument("--checksums", choices=("on", "off", "compare"), default="on",
                        help="checkpoint.checksums for the runs; compare: only the save time with them against without")
    parser.add_argument("--repeats", type=int, default=3, help="with --checksums compare: jobs of each setting")
    args = parser.parse_args()
    layer_counts = sorted(int(n) for n in args.layers.split(","))
    if args.checksums == "compare":
        with tempfile.TemporaryDirectory(dir=os.environ.get("P3D_BENCH_TMP")) as workdir:
            rows = [row for layers in layer_counts for row in compare_checksums(layers, args, Path(workdir))]
        text = render_checksums(rows, args)
        print(text)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint_checksums.md").write_text(
            "# Checkpoint save time with and without checksums\n\nGenerated by `python benchmarks/checkpoint.py --checksums compare` "
            f"(`--layers {args.layers} --vocab-size {args.vocab_size} --saves {args.saves} --repeats {args.repeats}`).\n\n" + text
        )
        (out / "checkpoint_checksums.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        return
    params = {(n, args.vocab_size): parameter_count(n, args.vocab_size) for n in layer_counts}
    params[(FULL_LAYERS, FULL_VOCAB)] = parameter_count(FULL_LAYERS, FULL_VOCAB)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        if [r["layers"] for r in rows] != layer_counts:
            raise SystemExit(f"{args.from_json} has layer counts {[r['layers'] for r in rows]}, not --layers {args.layers}")
    else:
        with tempfile.TemporaryDirectory(dir=os.environ.get("P3D_BENCH_TMP")) as workdir:
            rows = [measure(layers, args, Path(workdir)) for layers in layer_counts]
    text = render(rows, args, params)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint.md").write_text(
        "# Checkpoint save and load: sync against async\n\nGenerated by `python benchmarks/checkpoint.py` "
        f"(`--layers {args.layers} --vocab-size {args.vocab_size} --saves {args.saves}`).\n\n" + text
    )
    (out / "checkpoint.json").write_text(json.dumps({"rows": rows, "parameters": {f"{n} layers, vocab {v}": c for (n, v), c in params.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
