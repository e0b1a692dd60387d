"""p3d against a hand-written loop, step by step in the same processes.

    python benchmarks/paired_steps.py [--pairs defaults-plain,best-fast] [--layouts dp2,tp2dp2,tp2dp2cp2]
        [--shapes 256x4:40,1024x4:12] [--repeats 3] [--keep-from docs/results/paired_steps.json] [--out docs/results]

Pairs: `defaults-plain` is p3d with its defaults against the plain loop (the same FSDP2/TP calls,
benchmarks/plain_loop.py); `best-fast` is p3d with throughput.py's best settings for the layout
against the fast loop (benchmarks/fast_loop.py).

throughput.py runs each program in processes of its own, and on this machine (two virtual cores on a
shared host) the same program's tokens/s moves by 20-30% from one run to the next, more than the
few percent that separate p3d from a loop. Here both are built in the same ranks (p3d's model, data
and trainer through `python -m p3d.train`, the loop's through plain_loop.PlainLoop or
fast_loop.FastLoop) and their steps alternate (p3d, loop, loop, p3d, ...), each started after a
barrier and timed on rank 0; p3d's step is the whole of one iteration of its training loop
(`Trainer.run_step`: the step, the per-step agreement, logging). Whatever slows the machine for
a while slows both. Each run's figure is the median over the steps after the warm-up of
the loop's time / p3d's time for the two steps of one pair (p3d's tokens/s relative to the loop);
the table gives the median over the runs and each run's figure. With --keep-from, an earlier run's
rows for pairs, shapes and layouts this run does not measure are kept.

Writes <out>/paired_steps.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import LAYOUTS, check_layouts, loop_flags, p3d_overrides, p3d_settings, parse_shapes, run, torchrun  # noqa: E402

PAIRS = {"defaults-plain": ("plain_loop", "PlainLoop"), "best-fast": ("fast_loop", "FastLoop")}  # pair: the loop's module and class


def worker(argv: list[str]) -> None:
    """Under torchrun: `--worker PAIR <loop flags> -- <p3d overrides>`."""
    import importlib

    import torch.distributed as dist

    import p3d.train
    from p3d.trainer import Trainer

    module_name, class_name = PAIRS[argv[0]]
    module = importlib.import_module(module_name)
    Loop = getattr(module, class_name)
    split = argv.index("--")
    args = module.parse_args(argv[1:split])

    def alternate(trainer: Trainer) -> None:  # replaces Trainer.fit: the process group and trainer are p3d's
        loop = Loop(args)
        seconds = {"p3d": [], "loop": []}
        losses = {"p3d": [], "loop": []}
        try:
            for step in range(args.steps):
                for who in ("p3d", "loop") if step % 2 == 0 else ("loop", "p3d"):
                    dist.barrier()
                    started = time.perf_counter()
                    if who == "p3d":
                        losses["p3d"].append(trainer.run_step(stop_requested=False)[0]["loss"])
                    else:
                        losses["loop"].append(loop.step(step).item())
                    seconds[who].append(time.perf_counter() - started)
        finally:
            trainer.batches.close()
            trainer.metrics.close()
        if dist.get_rank() == 0:
            print("PAIRED " + json.dumps({"seconds": seconds, "losses": losses, "warmup": args.warmup}), flush=True)

    Trainer.fit = alternate
    p3d.train.main(argv[split + 1:])


def paired_run(pair: str, name: str, shape, args, run_dir: Path) -> dict:
    layout = LAYOUTS[name]
    tp, dp, cp = layout
    settings = p3d_settings(name, {}) if pair == "best-fast" else []
    command = [*torchrun(tp * dp * cp), str(Path(__file__).resolve()), "--worker", pair, *loop_flags(layout, shape, args), "--",
               *p3d_overrides(layout, shape, args, settings, run_dir), "logging.progress=false"]
    line = next(line for line in run(command).splitlines() if line.startswith("PAIRED "))
    result = json.loads(line.removeprefix("PAIRED "))
    p3d, loop = (result["seconds"][who][result["warmup"]:] for who in ("p3d", "loop"))
    return {
        "ratio": statistics.median(b / a for a, b in zip(p3d, loop)), "p3d_settings": settings,
        "p3d_step_s": statistics.median(p3d), "loop_step_s": statistics.median(loop),
        "p3d_losses": result["losses"]["p3d"], "loop_losses": result["losses"]["loop"],
    }


def measure(args, workdir: Path) -> list[dict]:
    rows = []
    for pair in args.pairs.split(","):
        for shape in parse_shapes(args.shapes):
            hidden, layers, steps = shape
            for name in args.layouts.split(","):
                runs = [paired_run(pair, name, shape, args, workdir / f"{pair}-{hidden}x{layers}-{name}-{repeat}") for repeat in range(args.repeats)]
                for repeat, result in enumerate(runs):
                    print(f"{pair} hidden {hidden} x {layers} {name} run {repeat}: p3d / loop {result['ratio']:.3f} "
                          f"(steps {result['p3d_step_s']:.3f} s, {result['loop_step_s']:.3f} s)", flush=True)
                ratios = [r["ratio"] for r in runs]
                rows.append({
                    "pair": pair, "hidden": hidden, "layers": layers, "steps": steps, "layout": name,
                    "ranks": LAYOUTS[name][0] * LAYOUTS[name][1] * LAYOUTS[name][2], "p3d_settings": runs[0]["p3d_settings"],
                    "ratio": statistics.median(ratios), "ratio_runs": ratios,
                    "p3d_step_s": statistics.median(r["p3d_step_s"] for r in runs), "loop_step_s": statistics.median(r["loop_step_s"] for r in runs),
                    "runs": runs,
                })
    return rows


def with_earlier_rows(rows: list[dict], earlier_json: str | None) -> list[dict]:
    """This run's rows, and the earlier run's rows for the pairs, shapes and layouts it did not measure."""
    if not earlier_json:
        return rows
    def key(row):
        return row["pair"], row["hidden"], row["layers"], row["layout"]
    measured = {key(r) for r in rows}
    kept = [dict(r, measured_earlier=True) for r in json.loads(Path(earlier_json).read_text()) if key(r) not in measured]
    order = {name: index for index, name in enumerate(LAYOUTS)}
    pairs = {name: index for index, name in enumerate(PAIRS)}
    return sorted(rows + kept, key=lambda r: (pairs[r["pair"]], r["hidden"], r["layers"], order[r["layout"]]))


def report(rows: list[dict], args) -> str:
    lines = [
        f"Model: tiny_llama widened (intermediate 2 x hidden, 8 heads, 4 kv heads, vocab 264), seq_len {args.seq_len}, global batch "
        f"{args.global_batch}, fp32, CPU/gloo, OMP_NUM_THREADS=1; steps per run as listed, {args.warmup} warm-up; {args.repeats} runs per row. "
        f"Machine: {os.cpu_count()} cores.",
        "",
        "| p3d / loop | p3d settings | shape | layout | ranks | p3d step (s) | loop step (s) | p3d / loop (median of the runs) | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        runs = ", ".join(f"{ratio:.3f}" for ratio in r["ratio_runs"])
        earlier = " (earlier run)" if r.get("measured_earlier") else ""
        settings = " ".join(r["p3d_settings"]) or "defaults"
        lines.append(f"| {r['pair']}{earlier} | `{settings}` | hidden {r['hidden']}, {r['layers']} layers ({r['steps']} steps) | {r['layout']} | {r['ranks']} | "
                     f"{r['p3d_step_s']:.3f} | {r['loop_step_s']:.3f} | {r['ratio']:.3f} | {runs} |")
    if any(r.get("measured_earlier") for r in rows):
        lines += ["", "Rows marked (earlier run) come from an earlier run of this script (`--keep-from`), with that run's figures."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="defaults-plain,best-fast", help="comma-separated: " + ", ".join(PAIRS))
    parser.add_argument("--layouts", default="dp2,tp2dp2,tp2dp2cp2")
    parser.add_argument("--shapes", default="256x4:40,1024x4:12", help="HIDDENxLAYERS:STEPS, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--keep-from", help="an earlier paired_steps.json: its rows for what this run does not measure are kept")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    for pair in args.pairs.split(","):
        if pair not in PAIRS:
            raise SystemExit(f"--pairs: unknown pair {pair!r} (known: {', '.join(PAIRS)})")
    check_layouts(args.layouts)
    with tempfile.TemporaryDirectory() as workdir:
        rows = with_earlier_rows(measure(args, Path(workdir)), args.keep_from)
    text = report(rows, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired_steps.md").write_text(
        "# p3d against the hand-written loops, step by step\n\nGenerated by `python benchmarks/paired_steps.py` (see its docstring): "
        "p3d and a loop built in the same ranks, their steps alternated; p3d / loop = the loop's step time over p3d's (above 1: p3d is "
        "faster). defaults-plain: p3d's defaults (FSDP2, eager) against benchmarks/plain_loop.py (the same FSDP2/TP calls); best-fast: "
        "p3d's best settings for the layout against benchmarks/fast_loop.py (written for speed).\n\n" + text
    )
    (out / "paired_steps.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
