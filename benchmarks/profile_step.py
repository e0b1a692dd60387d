"""Where one training step's time goes: p3d against the fast hand-written loop, torch.profiler per op.

    python benchmarks/profile_step.py [--layouts dp2,tp2dp2] [--shapes 256x4,1024x4] [--label after] [--out docs/results]

For each shape and layout, p3d (`python -m p3d.train` under torchrun, its Trainer.train_step wrapped
in torch.profiler for one step) and benchmarks/fast_loop.py (its --profile-step) are profiled on
the same step after warm-up. Rank 0's self CPU time per op is summed into categories: matmuls,
attention, collectives (the time the calling thread spends in them, waiting included), the
optimizer, copies, other aten ops, and the step's wall time outside every profiled op (Python:
module code, hooks, DTensor sharding propagation). Writes <out>/profile_<label>.json; profile.md
is rendered from every profile_*.json in <out> (so a `before` and an `after` sit side by side).

Under torchrun as a worker (internal): profile_step.py --worker p3d --profile-step N --profile-out FILE -- <p3d overrides>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = {"dp2": (1, 2, 1), "tp2dp2": (2, 2, 1), "tp2dp2cp2": (2, 2, 2), "tp2": (2, 1, 1), "1 process": (1, 1, 1)}
CATEGORIES = ("matmul", "attention", "collectives", "optimizer", "copies", "other ops", "outside ops (Python, hooks, DTensor)")
PROFILE_STEP = 4  # 1-based: three warm-up steps before it


def category(name: str) -> str:
    lowered = name.lower()
    # torch's collectives, FSDP2's labelled ones, and the autograd functions of p3d and the fast loop that run one
    # (their self time is the collective: the matmuls around them are ops of their own)
    words = ("gloo", "nccl", "c10d", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast", "record_param_comms",
             "wait", "fsdp::", "sumgradient", "sumovergroup", "gatherlastdim", "copytogroup", "reducefromgroup", "gathersequence", "redistribute")
    if any(word in lowered for word in words):
        return "collectives"
    if any(word in lowered for word in ("attention", "sdpa", "flash")):
        return "attention"
    if any(word in lowered for word in ("adam", "optimizer")):
        return "optimizer"
    if lowered in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::linear_backward"):
        return "matmul"
    if any(word in lowered for word in ("copy", "cat", "clone", "contiguous", "split_with_sizes_copy", "chunk_cat", "_to_copy")):
        return "copies"
    return "other ops"


def summarize(prof, wall_s: float) -> dict:
    """Self CPU seconds per category and the top ops of one profiled step (the calling process)."""
    per_category: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        per_category[category(event.key)] += seconds
        ops.append({"op": event.key, "self_s": seconds, "count": event.count})
    inside = sum(per_category.values())
    per_category[CATEGORIES[-1]] = max(wall_s - inside, 0.0)
    ops.sort(key=lambda op: -op["self_s"])
    return {"wall_s": wall_s, "categories": {name: per_category.get(name, 0.0) for name in CATEGORIES}, "top_ops": ops[:25],
            "op_calls": sum(op["count"] for op in ops)}


def profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def p3d_worker(profile_step: int, out: Path, overrides: list[str]) -> None:
    """p3d.train with one step (1-based) profiled; rank 0 writes the summary."""
    import torch.distributed as dist

    import p3d.trainer
    from p3d.train import main

    original = p3d.trainer.Trainer.train_step

    def train_step(self):
        if self.state.step + 1 != profile_step:
            return original(self)
        with profiler() as prof:
            started = time.perf_counter()
            record = original(self)
            wall = time.perf_counter() - started
        if dist.get_rank() == 0:
            out.write_text(json.dumps(summarize(prof, wall)))
        return record

    p3d.trainer.Trainer.train_step = train_step
    main(overrides)


def launch(world: int, command: list[str]) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    done = subprocess.run([*torchrun, *command], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")


def profile_p3d(layout, hidden: int, layers: int, settings: list[str], workdir: Path) -> dict:
    tp, dp, cp = layout
    out = workdir / "p3d.json"
    overrides = [
        "model=tiny_llama", f"model.config.hidden_size={hidden}", f"model.config.intermediate_size={2 * hidden}",
        f"model.config.num_hidden_layers={layers}", "model.config.max_position_embeddings=4096", "data.seq_len=256",
        f"train.steps={PROFILE_STEP}", "train.global_batch_size=8", f"train.micro_batch_size={8 // dp}",
        f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.cp={cp}", "checkpoint=none", f"run.dir={workdir / 'run'}", *settings,
    ]
    launch(tp * dp * cp, [str(Path(__file__).resolve()), "--worker", "p3d", f"--profile-step={PROFILE_STEP}", f"--profile-out={out}", "--", *overrides])
    return json.loads(out.read_text())


def profile_fast(layout, hidden: int, layers: int, workdir: Path) -> dict:
    tp, dp, cp = layout
    out = workdir / "fast.json"
    launch(tp * dp * cp, [str(HERE / "fast_loop.py"), f"--tp={tp}", f"--dp={dp}", f"--cp={cp}", f"--hidden={hidden}", f"--layers={layers}",
                          f"--steps={PROFILE_STEP}", "--warmup=1", f"--profile-step={PROFILE_STEP}", f"--profile-out={out}"])
    return json.loads(out.read_text())


def render(out: Path) -> str:
    """Tables of every profile_<label>.json in `out`."""
    lines = []
    for path in sorted(out.glob("profile_*.json")):
        result = json.loads(path.read_text())
        lines += [f"## {result['label']}: {result['description']}", "", f"Measured {result['when']}; {result['note']}", ""]
        lines.append("| shape | layout | program | step wall s | op calls | " + " | ".join(CATEGORIES) + " |")
        lines.append("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in CATEGORIES) + " |")
        for row in result["rows"]:
            for program in ("p3d", "fast"):
                summary = row[program]
                shares = " | ".join(f"{summary['categories'][name]:.3f} ({summary['categories'][name] / summary['wall_s']:.0%})" for name in CATEGORIES)
                lines.append(f"| hidden {row['hidden']}, {row['layers']} layers | {row['layout']} | {program} | {summary['wall_s']:.3f} | {summary['op_calls']:,} | {shares} |")
        lines.append("")
        for row in result["rows"]:
            lines.append(f"Top ops, hidden {row['hidden']} {row['layout']}: p3d "
                         + ", ".join(f"{op['op']} {op['self_s']:.3f}s x{op['count']}" for op in row["p3d"]["top_ops"][:8])
                         + "; fast " + ", ".join(f"{op['op']} {op['self_s']:.3f}s x{op['count']}" for op in row["fast"]["top_ops"][:8]) + ".")
            lines.append("")
    return "\n".join(lines)


MARKER = "<!-- tables generated by benchmarks/profile_step.py below this line -->"


def write_profile_md(path: Path, tables: str) -> None:
    """profile.md: the written findings above MARKER are kept; the tables below it are regenerated."""
    findings = path.read_text().split(MARKER)[0] if path.exists() and MARKER in path.read_text() else (
        "# Profile of one training step: p3d against the fast hand-written loop\n\n")
    path.write_text(findings + MARKER + "\n\nGenerated by `python benchmarks/profile_step.py`: rank 0's profiled step; per category its self CPU "
                    "seconds and share of the step's wall time.\n\n" + tables)


def main() -> None:
    if "--worker" in sys.argv:
        worker = argparse.ArgumentParser()
        worker.add_argument("--worker", choices=["p3d"])
        worker.add_argument("--profile-step", type=int)
        worker.add_argument("--profile-out", type=Path)
        known, rest = worker.parse_known_args()
        p3d_worker(known.profile_step, known.profile_out, [item for item in rest if item != "--"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="dp2,tp2dp2")
    parser.add_argument("--shapes", default="256x4,1024x4")
    parser.add_argument("--label", default="after", help="names the output, profile_<label>.json (e.g. before, after)")
    parser.add_argument("--description", default="", help="what p3d code this profiles (e.g. a commit and what it changed)")
    parser.add_argument("--note", default="measured under load (a shared 2-core machine)")
    parser.add_argument("--p3d-overrides", default="", help="extra p3d overrides for every layout, space-separated")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        hidden, layers = (int(part) for part in shape.split("x"))
        for name in args.layouts.split(","):
            with tempfile.TemporaryDirectory() as workdir:
                p3d = profile_p3d(LAYOUTS[name], hidden, layers, args.p3d_overrides.split(), Path(workdir))
                fast = profile_fast(LAYOUTS[name], hidden, layers, Path(workdir))
            rows.append({"hidden": hidden, "layers": layers, "layout": name, "p3d": p3d, "fast": fast})
            print(f"hidden {hidden} {name}: p3d step {p3d['wall_s']:.3f} s, fast {fast['wall_s']:.3f} s", flush=True)
    result = {"label": args.label, "description": args.description or args.label, "note": args.note,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    (out / f"profile_{args.label}.json").write_text(json.dumps(result, indent=1))
    text = render(out)
    write_profile_md(out / "profile.md", text)
    print(text)


if __name__ == "__main__":
    main()
