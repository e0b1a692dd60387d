"""Throughput of p3d against two hand-written loops, same model, data and layout.

    python benchmarks/throughput.py [--layouts dp2,tp2dp2,tp2dp2cp2] [--shapes 256x4:20,1024x4:8]
        [--repeats 3] [--p3d-overrides 'dp2=parallel.key=value ...'] [--keep-from docs/results/throughput.json]
        [--out docs/results]

The two baselines (torchrun, gloo, CPU, no p3d code):
- the plain loop, benchmarks/plain_loop.py: the same TP/FSDP2/CP calls as p3d makes;
- the fast loop, benchmarks/fast_loop.py: written for speed (replicated data parallelism with
  one bucketed gradient all-reduce per step, Megatron-style TP on plain tensors with explicit
  collectives, K/V all-gather CP).
p3d runs twice: with the best settings known for the layout (BEST_SETTINGS, plus any
--p3d-overrides, named in the table), held against the fast loop, and with its defaults (the same
calls as the plain loop: FSDP2, eager), held against the plain loop. For each shape and layout the
four are run alternately `repeats` times. Each run's figure is the median tokens/s of its steps
after a warm-up; the table gives the median of the runs, the ratios p3d (defaults) / plain and
p3d (best) / fast, and the spread of the latter over the repeats.

Every run also checks the fast loop trains the same model: its per-step losses against the plain
loop's on one process (first --check-steps steps; the largest difference is in the table).
Writes <out>/throughput.md, .json and .png. With --keep-from, the rows of an earlier run's json for
shapes and layouts this run does not measure are kept (marked "earlier run" in the table).
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

LAYOUTS = {"1 process": (1, 1, 1), "dp2": (1, 2, 1), "tp2": (2, 1, 1), "cp2": (1, 1, 2), "tp2dp2": (2, 2, 1), "tp2dp2cp2": (2, 2, 2)}
# p3d settings per layout beyond the layout itself: the fastest measured (docs/results/profile.md).
# "all" applies to every layout. The hand-written loops gather K/V for context parallelism, so p3d does too.
BEST_SETTINGS: dict[str, list[str]] = {
    "all": ["train.compile=true"],
    "dp2": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "tp2dp2": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "tp2dp2cp2": ["parallel.cp_impl=allgather"],
    "cp2": ["parallel.cp_impl=allgather"],
}
HERE = Path(__file__).resolve().parent


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'256x4:20,1024x4:8' -> [(hidden, layers, steps), ...]."""
    shapes = []
    for item in text.split(","):
        size, _, steps = item.partition(":")
        hidden, layers = size.split("x")
        shapes.append((int(hidden), int(layers), int(steps or 20)))
    return shapes


def check_layouts(text: str) -> None:
    """--layouts: comma-separated names from LAYOUTS."""
    for name in text.split(","):
        if name not in LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {name!r} (known: {', '.join(LAYOUTS)})")


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """['dp2=parallel.a=1 parallel.b=2', 'all=...'] -> {layout: [override, ...]}."""
    table: dict[str, list[str]] = {}
    for item in items:
        layout, sep, overrides = item.partition("=")
        if not sep or (layout not in LAYOUTS and layout != "all"):
            raise SystemExit(f"--p3d-overrides {item!r}: use LAYOUT=key=value [key=value ...] with LAYOUT one of all, {', '.join(LAYOUTS)}")
        table.setdefault(layout, []).extend(overrides.split())
    return table


def p3d_settings(name: str, extra: dict[str, list[str]]) -> list[str]:
    settings = BEST_SETTINGS.get("all", []) + BEST_SETTINGS.get(name, []) + extra.get("all", []) + extra.get(name, [])
    latest = {}
    for override in settings:  # a later setting of a key wins
        latest[override.partition("=")[0]] = override
    return list(latest.values())


def p3d_overrides(layout, shape, args, settings: list[str], run_dir: Path) -> list[str]:
    """p3d's command-line overrides for the loops' model, data and layout."""
    tp, dp, cp = layout
    hidden, layers, steps = shape
    return [
        "model=tiny_llama", f"model.config.hidden_size={hidden}", f"model.config.intermediate_size={2 * hidden}",
        f"model.config.num_hidden_layers={layers}", "model.config.max_position_embeddings=4096",
        f"data.seq_len={args.seq_len}", f"train.steps={steps}", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.global_batch // dp}", f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.cp={cp}",
        "checkpoint=none", f"run.dir={run_dir}", *settings,
    ]


def loop_flags(layout, shape, args, steps: int | None = None) -> list[str]:
    """The hand-written loops' flags for the same model, data and layout."""
    tp, dp, cp = layout
    hidden, layers, shape_steps = shape
    return [f"--tp={tp}", f"--dp={dp}", f"--cp={cp}", f"--steps={steps or shape_steps}", f"--warmup={min(args.warmup, (steps or shape_steps) - 1)}",
            f"--seq-len={args.seq_len}", f"--global-batch={args.global_batch}", f"--hidden={hidden}", f"--layers={layers}"]


def p3d_tokens_per_s(layout, shape, args, settings: list[str], run_dir: Path) -> float:
    tp, dp, cp = layout
    run([*torchrun(tp * dp * cp), "-m", "p3d.train", *p3d_overrides(layout, shape, args, settings, run_dir)])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[args.warmup:])


def loop_result(script: str, layout, shape, args, steps: int | None = None) -> dict:
    tp, dp, cp = layout
    output = run([*torchrun(tp * dp * cp), str(HERE / script), *loop_flags(layout, shape, args, steps)])
    return json.loads(output.strip().splitlines()[-1])


def measure(args, extra: dict[str, list[str]], workdir: Path) -> list[dict]:
    rows = []
    for shape in parse_shapes(args.shapes):
        hidden, layers, steps = shape
        reference = loop_result("plain_loop.py", LAYOUTS["1 process"], shape, args, steps=args.check_steps)["losses"] if args.check_steps else None
        for name in args.layouts.split(","):
            layout = LAYOUTS[name]
            settings = p3d_settings(name, extra)
            p3d, same, plain, fast, loss_gaps = [], [], [], [], []
            for repeat in range(args.repeats):
                p3d.append(p3d_tokens_per_s(layout, shape, args, settings, workdir / f"{hidden}x{layers}-{name}-{repeat}"))
                same.append(p3d_tokens_per_s(layout, shape, args, [], workdir / f"{hidden}x{layers}-{name}-{repeat}-same"))
                plain.append(loop_result("plain_loop.py", layout, shape, args)["tokens_per_s"])
                fast_run = loop_result("fast_loop.py", layout, shape, args)
                fast.append(fast_run["tokens_per_s"])
                if reference:
                    loss_gaps.append(max(abs(a - b) for a, b in zip(fast_run["losses"], reference)))
                print(f"hidden {hidden} x {layers} {name} repeat {repeat}: p3d {p3d[-1]:,.0f}, p3d same calls {same[-1]:,.0f}, plain {plain[-1]:,.0f}, fast {fast[-1]:,.0f} tok/s", flush=True)
            rows.append({
                "hidden": hidden, "layers": layers, "steps": steps, "layout": name, "ranks": layout[0] * layout[1] * layout[2],
                "p3d_settings": settings,
                "p3d_tokens_per_s": statistics.median(p3d), "p3d_same_calls_tokens_per_s": statistics.median(same),
                "plain_tokens_per_s": statistics.median(plain), "fast_tokens_per_s": statistics.median(fast),
                "ratio_plain": statistics.median(same) / statistics.median(plain), "ratio_fast": statistics.median(p3d) / statistics.median(fast),
                "ratio_plain_runs": [a / b for a, b in zip(same, plain)], "ratio_fast_runs": [a / b for a, b in zip(p3d, fast)],
                "fast_loss_max_diff": max(loss_gaps) if loss_gaps else None,
                "p3d_runs": p3d, "p3d_same_calls_runs": same, "plain_runs": plain, "fast_runs": fast,
            })
    return rows


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} - {max(values):.2f}"


def report(rows: list[dict], args) -> str:
    lines = [
        f"Model: tiny_llama widened (intermediate 2 x hidden, 8 heads, 4 kv heads, vocab 264), seq_len {args.seq_len}, global batch {args.global_batch}, "
        f"fp32, CPU/gloo, OMP_NUM_THREADS=1; steps per run as listed ({args.warmup} warm-up), {args.repeats} alternating runs each. "
        f"Machine: {os.cpu_count()} cores{', ' + args.note if args.note else ''}.",
        "",
        "| shape | layout | ranks | p3d settings | p3d tok/s | p3d same calls tok/s | plain tok/s | fast tok/s | p3d same calls / plain | p3d / fast | spread p3d / fast | fast loss vs 1 process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        earlier = " (earlier run)" if r.get("measured_earlier") else ""
        gap = "not checked" if r["fast_loss_max_diff"] is None else f"{r['fast_loss_max_diff']:.1e}"
        settings = " ".join(s for s in r["p3d_settings"]) or "defaults"
        lines.append(
            f"| hidden {r['hidden']}, {r['layers']} layers ({r['steps']} steps) | {r['layout']}{earlier} | {r['ranks']} | `{settings}` | {r['p3d_tokens_per_s']:,.0f} | {r['p3d_same_calls_tokens_per_s']:,.0f} | "
            f"{r['plain_tokens_per_s']:,.0f} | {r['fast_tokens_per_s']:,.0f} | {r['ratio_plain']:.2f} | {r['ratio_fast']:.2f} | {spread(r['ratio_fast_runs'])} | {gap} |"
        )
    if any(r.get("measured_earlier") for r in rows):
        lines += ["", "Rows marked (earlier run) were not measured by this run: they come from an earlier run of this script (`--keep-from`), with that run's figures."]
    return "\n".join(lines) + "\n"


def with_earlier_rows(rows: list[dict], earlier_json: str | None) -> list[dict]:
    """This run's rows, and in their places the earlier run's rows for the shapes and layouts it did not measure."""
    if not earlier_json:
        return rows
    measured = {(r["hidden"], r["layers"], r["layout"]) for r in rows}
    kept = [dict(r, measured_earlier=True) for r in json.loads(Path(earlier_json).read_text()) if (r["hidden"], r["layers"], r["layout"]) not in measured]
    order = {name: index for index, name in enumerate(LAYOUTS)}
    return sorted(rows + kept, key=lambda r: (r["hidden"], r["layers"], order[r["layout"]]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(7, 1.6 * len(rows)), 4.5))
    x = range(len(rows))
    for offset, key, label in ((-0.27, "p3d_tokens_per_s", "p3d"), (0.0, "plain_tokens_per_s", "plain loop (same calls)"), (0.27, "fast_tokens_per_s", "fast hand-written loop")):
        axis.bar([i + offset for i in x], [r[key] for r in rows], width=0.27, label=label)
    axis.set_xticks(list(x), [f"h{r['hidden']} {r['layout']}\n/fast {r['ratio_fast']:.2f}" for r in rows], fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("tokens/s (median, log scale)")
    axis.set_title("Training throughput on CPU (gloo)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="dp2,tp2dp2,tp2dp2cp2")
    parser.add_argument("--shapes", default="256x4:20,1024x4:8", help="HIDDENxLAYERS:STEPS, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--check-steps", type=int, default=3, help="steps of the fast loop's loss check against one process (0: none)")
    parser.add_argument("--p3d-overrides", action="append", default=[], metavar="LAYOUT=KEY=VALUE ...",
                        help="extra p3d overrides for a layout (or all), e.g. 'dp2=parallel.dp_replicate=2 parallel.dp_shard=1'; repeatable")
    parser.add_argument("--note", default="", help="a remark on the machine for the report, e.g. 'measured under load'")
    parser.add_argument("--keep-from", help="an earlier throughput.json: its rows for shapes and layouts this run does not measure are kept")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    extra = parse_overrides(args.p3d_overrides)
    check_layouts(args.layouts)
    with tempfile.TemporaryDirectory() as workdir:
        rows = with_earlier_rows(measure(args, extra, Path(workdir)), args.keep_from)
    text = report(rows, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.md").write_text(
        "# Throughput: p3d against hand-written PyTorch loops\n\nGenerated by `python benchmarks/throughput.py`. p3d runs twice: with its best "
        "settings for the layout (named in the table; held against the fast loop) and with its defaults (FSDP2, eager; held against "
        "the plain loop, benchmarks/plain_loop.py, which makes those same FSDP2/TP calls). The fast loop (benchmarks/fast_loop.py) is written for speed: "
        "replicated data parallelism with one bucketed all-reduce per step, Megatron-style TP on plain tensors, K/V all-gather CP. "
        "p3d's defaults and the plain loop are also compared step by step in the same processes by benchmarks/paired_steps.py "
        "(paired_steps.md), which this machine's run-to-run drift does not skew.\n\n"
        + text + "\n![throughput](throughput.png)\n"
    )
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "throughput.png")


if __name__ == "__main__":
    main()
