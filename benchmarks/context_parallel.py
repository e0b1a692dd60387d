"""Context parallelism on one long sequence: memory, step time and attention balance by cp degree.

    python benchmarks/context_parallel.py                        # 4096 tokens, cp 1, 2, 4, 8
    python benchmarks/context_parallel.py --seq-len 1024 --cps 1,2 --steps 2 --out /tmp/cp   # a quick run

For each cp degree it runs `p3d.train` (torchrun on gloo, CPU; dp=tp=1, one sequence per step)
with every combination of parallel.cp_impl (ring, allgather) and parallel.cp_layout (balanced,
contiguous), and logging.attention_timing=true. From each run it reads:

- per-rank peak memory (summary.json; peak RSS on CPU) and the share above the import baseline;
- step time: the median over the steps after the first (metrics.jsonl);
- per-rank attention time (summary.json): the tiles' math (on CPU the thread's CPU time, so ranks
  sharing cores are compared by their own work) and the wall time inside attention with its
  communication. The max / min over ranks of the math shows how evenly causal work is spread.

cp=1 is one process with the model's own SDPA attention (nothing to shard). Writes
<out>/context_parallel.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import MemorySampler, import_baseline_gb  # noqa: E402

IMPLS = ("ring", "allgather")
LAYOUTS = ("balanced", "contiguous")


def model_overrides(args) -> list[str]:
    return [
        "model=tiny_llama", f"model.config.hidden_size={args.hidden}", f"model.config.intermediate_size={4 * args.hidden}",
        f"model.config.num_hidden_layers={args.layers}", "model.config.num_attention_heads=8", "model.config.num_key_value_heads=4",
        f"model.config.max_position_embeddings={args.seq_len}", f"data.seq_len={args.seq_len}", f"train.steps={args.steps}",
        "train.global_batch_size=1", "train.micro_batch_size=1", "checkpoint=none", "logging.attention_timing=true",
    ]


def run(cp: int, impl: str, layout: str, args, workdir: Path) -> dict:
    name = f"cp{cp}-{impl}-{layout}" if cp > 1 else "cp1"
    run_dir = workdir / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}", "-m", "p3d.train", *model_overrides(args)]
    command += [f"parallel.cp={cp}", "parallel.tp=1", "parallel.dp=1", f"parallel.cp_impl={impl}", f"parallel.cp_layout={layout}", f"run.dir={run_dir}"]
    started = time.monotonic()
    with MemorySampler() as sampler:
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    compute = summary.get("attention_compute_s_per_rank")
    total = summary.get("attention_total_s_per_rank")
    return {
        "name": name,
        "cp": cp,
        "impl": impl if cp > 1 else "sdpa",
        "layout": layout if cp > 1 else "-",
        "peak_gb_per_rank": summary["peak_mem_gb_per_rank"],
        "job_peak_gb": round(sampler.job_peak_gb, 3),
        "step_time_s": round(statistics.median(r["step_time_s"] for r in records[1:] or records), 3),
        "attention_compute_s_per_rank": compute,
        "attention_total_s_per_rank": total,
        "attention_imbalance": round(max(compute) / min(compute), 2) if compute else None,
        "losses": [r["loss"] for r in records],
        "wall_s": round(time.monotonic() - started, 1),
    }


def markdown(rows: list[dict], baseline: float, args) -> str:
    steps = args.steps
    lines = [
        f"Model: tiny_llama widened to hidden {args.hidden}, {args.layers} layers, 8 query / 4 kv heads; one sequence of {args.seq_len} tokens "
        f"per step, fp32, {steps} steps. Import baseline per process: {baseline:.2f} GB.",
        "",
        "| cp | impl | layout | max per-rank peak (GB) | max share above baseline (GB) | job peak, machine (GB) | step time (s, median) | "
        "attention math per rank per step (s): min / max | max/min | attention wall incl. comm, max rank (s/step) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        peak = max(r["peak_gb_per_rank"])
        if r["attention_compute_s_per_rank"]:
            compute = r["attention_compute_s_per_rank"]
            timing = f"{min(compute) / steps:.3f} / {max(compute) / steps:.3f} | {r['attention_imbalance']:.2f} | {max(r['attention_total_s_per_rank']) / steps:.3f}"
        else:
            timing = "- | - | -"
        lines.append(
            f"| {r['cp']} | {r['impl']} | {r['layout']} | {peak:.3f} | {peak - baseline:.3f} | {r['job_peak_gb']:.2f} | {r['step_time_s']:.2f} | {timing} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis, balance_axis) = plt.subplots(1, 3, figsize=(15, 4.5))
    single = [r for r in rows if r["cp"] == 1]
    cps = sorted({r["cp"] for r in rows})
    for impl, marker in zip(IMPLS, "os"):
        for layout, style in zip(LAYOUTS, ("-", "--")):
            series = single + [r for r in rows if r["impl"] == impl and r["layout"] == layout]
            label = f"{impl}, {layout}"
            memory_axis.plot(cps, [max(r["peak_gb_per_rank"]) - baseline for r in series], style, marker=marker, label=label)
            time_axis.plot(cps, [r["step_time_s"] for r in series], style, marker=marker, label=label)
            sharded = [r for r in series if r["cp"] > 1]
            balance_axis.plot([r["cp"] for r in sharded], [r["attention_imbalance"] for r in sharded], style, marker=marker, label=label)
    memory_axis.set(title="max per-rank peak above import baseline", xlabel="cp", ylabel="GB", xscale="log", xticks=cps)
    time_axis.set(title="step time (2 cores shared by all ranks)", xlabel="cp", ylabel="s", xscale="log", xticks=cps)
    balance_axis.set(title="attention math: slowest / fastest rank", xlabel="cp", ylabel="max / min", xscale="log", xticks=[c for c in cps if c > 1])
    for axis in (memory_axis, time_axis, balance_axis):
        axis.set_xticklabels([str(c) for c in axis.get_xticks()])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    balance_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cps", default="1,2,4,8")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    baseline = import_baseline_gb()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for cp in (int(c) for c in args.cps.split(",")):
            combos = [("ring", "balanced")] if cp == 1 else [(impl, layout) for impl in IMPLS for layout in LAYOUTS]
            for impl, layout in combos:
                rows.append(run(cp, impl, layout, args, Path(workdir)))
                print(json.dumps(rows[-1]), flush=True)
    reference = rows[0]["losses"]
    worst = max(abs(a - b) for r in rows for a, b in zip(r["losses"], reference))
    text = markdown(rows, baseline, args) + f"\nLargest per-step loss difference from cp=1 over all runs: {worst:.1e}.\n"
    print(text)
    (out / "context_parallel.json").write_text(json.dumps({"baseline_gb": baseline, "args": vars(args), "runs": rows}, indent=1))
    header = "# Context parallelism on one long sequence\n\nGenerated by `python benchmarks/context_parallel.py` on the development machine (2 CPU cores shared by all ranks, gloo).\n\n"
    (out / "context_parallel.md").write_text(header + text + "\n![context parallelism](context_parallel.png)\n")
    plot(rows, baseline, out / "context_parallel.png")


if __name__ == "__main__":
    main()
