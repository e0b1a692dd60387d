"""p3d's defaults against the plain loop (the same FSDP2/TP calls), step by step in the same processes.

    python benchmarks/paired_steps.py [--layouts dp2,tp2dp2,tp2dp2cp2] [--shapes 256x4:40,1024x4:12]
        [--repeats 3] [--out docs/results]

throughput.py runs each program in processes of its own, and on this machine (two virtual cores on a
shared host) the same program's tokens/s moves by 20-30% from one run to the next, more than the
few percent that separate p3d's defaults from the plain loop. Here both are built in the same ranks
(p3d's model, data and trainer through `python -m p3d.train`, the plain loop's through
plain_loop.PlainLoop) and their steps alternate (p3d, plain, plain, p3d, ...), each started after a
barrier and timed on rank 0; p3d's step is the whole of one iteration of its training loop
(`Trainer.run_step`: the step, the per-step agreement, logging). Whatever slows the machine for
a while slows both. Each run's figure is the median over the steps after the warm-up of
plain's time / p3d's time for the two steps of one pair (p3d's tokens/s relative to the plain loop);
the table gives the median over the runs and their spread.

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
from throughput import LAYOUTS, loop_flags, p3d_overrides, parse_shapes, run, torchrun  # noqa: E402


def worker(argv: list[str]) -> None:
    """Under torchrun: `--worker <plain loop flags> -- <p3d overrides>`."""
    import torch.distributed as dist

    import p3d.train
    from p3d.trainer import Trainer
    from plain_loop import PlainLoop, parse_args

    split = argv.index("--")
    args = parse_args(argv[:split])

    def alternate(trainer: Trainer) -> None:  # replaces Trainer.fit: the process group and trainer are p3d's
        loop = PlainLoop(args)
        seconds = {"p3d": [], "plain": []}
        losses = {"p3d": [], "plain": []}
        try:
            for step in range(args.steps):
                for who in ("p3d", "plain") if step % 2 == 0 else ("plain", "p3d"):
                    dist.barrier()
                    started = time.perf_counter()
                    if who == "p3d":
                        losses["p3d"].append(trainer.run_step(stop_requested=False)[0]["loss"])
                    else:
                        losses["plain"].append(loop.step(step).item())
                    seconds[who].append(time.perf_counter() - started)
        finally:
            trainer.batches.close()
            trainer.metrics.close()
        if dist.get_rank() == 0:
            print("PAIRED " + json.dumps({"seconds": seconds, "losses": losses, "warmup": args.warmup}), flush=True)

    Trainer.fit = alternate
    p3d.train.main(argv[split + 1:])


def paired_run(layout, shape, args, run_dir: Path) -> dict:
    tp, dp, cp = layout
    command = [*torchrun(tp * dp * cp), str(Path(__file__).resolve()), "--worker", *loop_flags(layout, shape, args), "--",
               *p3d_overrides(layout, shape, args, [], run_dir), "logging.progress=false"]
    line = next(line for line in run(command).splitlines() if line.startswith("PAIRED "))
    result = json.loads(line.removeprefix("PAIRED "))
    p3d, plain = (result["seconds"][who][result["warmup"]:] for who in ("p3d", "plain"))
    return {
        "ratio": statistics.median(b / a for a, b in zip(p3d, plain)),
        "p3d_step_s": statistics.median(p3d), "plain_step_s": statistics.median(plain),
        "p3d_losses": result["losses"]["p3d"], "plain_losses": result["losses"]["plain"],
    }


def measure(args, workdir: Path) -> list[dict]:
    rows = []
    for shape in parse_shapes(args.shapes):
        hidden, layers, steps = shape
        for name in args.layouts.split(","):
            runs = [paired_run(LAYOUTS[name], shape, args, workdir / f"{hidden}x{layers}-{name}-{repeat}") for repeat in range(args.repeats)]
            for repeat, result in enumerate(runs):
                print(f"hidden {hidden} x {layers} {name} run {repeat}: p3d / plain {result['ratio']:.3f} "
                      f"(steps {result['p3d_step_s']:.3f} s, {result['plain_step_s']:.3f} s)", flush=True)
            ratios = [r["ratio"] for r in runs]
            rows.append({
                "hidden": hidden, "layers": layers, "steps": steps, "layout": name, "ranks": LAYOUTS[name][0] * LAYOUTS[name][1] * LAYOUTS[name][2],
                "ratio": statistics.median(ratios), "ratio_runs": ratios,
                "p3d_step_s": statistics.median(r["p3d_step_s"] for r in runs), "plain_step_s": statistics.median(r["plain_step_s"] for r in runs),
                "runs": runs,
            })
    return rows


def report(rows: list[dict], args) -> str:
    lines = [
        f"Model: tiny_llama widened (intermediate 2 x hidden, 8 heads, 4 kv heads, vocab 264), seq_len {args.seq_len}, global batch "
        f"{args.global_batch}, fp32, CPU/gloo, OMP_NUM_THREADS=1; steps per run as listed, {args.warmup} warm-up; {args.repeats} runs per row. "
        f"Machine: {os.cpu_count()} cores.",
        "",
        "| shape | layout | ranks | p3d step (s) | plain step (s) | p3d / plain (median of the runs) | runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        runs = ", ".join(f"{ratio:.3f}" for ratio in r["ratio_runs"])
        lines.append(f"| hidden {r['hidden']}, {r['layers']} layers ({r['steps']} steps) | {r['layout']} | {r['ranks']} | {r['p3d_step_s']:.3f} | "
                     f"{r['plain_step_s']:.3f} | {r['ratio']:.3f} | {runs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="dp2,tp2dp2,tp2dp2cp2")
    parser.add_argument("--shapes", default="256x4:40,1024x4:12", help="HIDDENxLAYERS:STEPS, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {name!r} (known: {', '.join(LAYOUTS)})")
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(args, Path(workdir))
    text = report(rows, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired_steps.md").write_text(
        "# p3d's defaults against the plain loop, step by step\n\nGenerated by `python benchmarks/paired_steps.py` (see its docstring): "
        "p3d with its defaults (FSDP2, eager) and benchmarks/plain_loop.py (the same FSDP2/TP calls) built in the same ranks, their steps "
        "alternated, p3d / plain = the plain step's time over p3d's (above 1: p3d is faster).\n\n" + text
    )
    (out / "paired_steps.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
