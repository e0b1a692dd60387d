"""Throughput of p3d against a minimal hand-written PyTorch loop, same model, data and layout.

    python benchmarks/throughput.py [--layouts dp2,tp2dp2cp2] [--repeats 3] [--steps 20] [--out docs/results]

For each layout the two are run alternately `repeats` times (torchrun, gloo, CPU). Each run's
figure is the median tokens/s of its steps after a warm-up; the table gives the median of the
runs, the ratio p3d / plain loop and its spread over the repeats. The plain loop is
benchmarks/plain_loop.py: the same TP/FSDP2/CP calls, loss normalisation, clipping and fused
AdamW, without p3d. Writes <out>/throughput.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {"1 process": (1, 1, 1), "dp2": (1, 2, 1), "tp2": (2, 1, 1), "cp2": (1, 1, 2), "tp2dp2cp2": (2, 2, 2)}
HERE = Path(__file__).resolve().parent


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


def p3d_tokens_per_s(layout, args, run_dir: Path) -> float:
    tp, dp, cp = layout
    overrides = [
        "model=tiny_llama", f"model.config.hidden_size={args.hidden}", f"model.config.intermediate_size={2 * args.hidden}",
        f"model.config.num_hidden_layers={args.layers}", "model.config.max_position_embeddings=4096",
        f"data.seq_len={args.seq_len}", f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.global_batch // dp}", f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.cp={cp}",
        "parallel.cp_impl=allgather",  # the plain loop's context parallelism gathers K/V too
        "checkpoint=none", f"run.dir={run_dir}",
    ]
    run([*torchrun(tp * dp * cp), "-m", "p3d.train", *overrides])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[args.warmup:])


def plain_tokens_per_s(layout, args) -> float:
    tp, dp, cp = layout
    flags = [f"--tp={tp}", f"--dp={dp}", f"--cp={cp}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seq-len={args.seq_len}",
             f"--global-batch={args.global_batch}", f"--hidden={args.hidden}", f"--layers={args.layers}"]
    output = run([*torchrun(tp * dp * cp), str(HERE / "plain_loop.py"), *flags])
    return json.loads(output.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="dp2,tp2dp2cp2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.layouts.split(","):
            layout = LAYOUTS[name]
            p3d, plain = [], []
            for repeat in range(args.repeats):
                p3d.append(p3d_tokens_per_s(layout, args, Path(workdir) / f"{name}-{repeat}"))
                plain.append(plain_tokens_per_s(layout, args))
                print(f"{name} repeat {repeat}: p3d {p3d[-1]:,.0f} tok/s, plain {plain[-1]:,.0f} tok/s", flush=True)
            ratios = [a / b for a, b in zip(p3d, plain)]
            rows.append({
                "layout": name, "ranks": layout[0] * layout[1] * layout[2],
                "p3d_tokens_per_s": statistics.median(p3d), "plain_tokens_per_s": statistics.median(plain),
                "ratio": statistics.median(p3d) / statistics.median(plain), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "p3d_runs": p3d, "plain_runs": plain,
            })
    model = f"tiny_llama widened to hidden {args.hidden}, {args.layers} layers, seq_len {args.seq_len}, global batch {args.global_batch}, fp32, CPU/gloo"
    lines = [
        f"Model: {model}; {args.steps} steps per run ({args.warmup} warm-up), {args.repeats} alternating runs each.",
        "",
        "| layout | ranks | p3d tokens/s | plain loop tokens/s | p3d / plain (median) | spread over runs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['ranks']} | {r['p3d_tokens_per_s']:,.0f} | {r['plain_tokens_per_s']:,.0f} | {r['ratio']:.3f} | {r['ratio_min']:.3f} - {r['ratio_max']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.md").write_text("# Throughput: p3d against a plain PyTorch loop\n\nGenerated by `python benchmarks/throughput.py`.\n\n" + text + "\n![throughput](throughput.png)\n")
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    x = range(len(rows))
    axis.bar([i - 0.2 for i in x], [r["p3d_tokens_per_s"] for r in rows], width=0.4, label="p3d")
    axis.bar([i + 0.2 for i in x], [r["plain_tokens_per_s"] for r in rows], width=0.4, label="plain PyTorch loop")
    axis.set_xticks(list(x), [f"{r['layout']}\np3d/plain {r['ratio']:.2f}" for r in rows])
    axis.set_ylabel("tokens/s (median)")
    axis.set_title("Training throughput on CPU (gloo)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=120)


if __name__ == "__main__":
    main()
