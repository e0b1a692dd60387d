"""Per-rank peak memory of one model under several layouts, against one process and the ideal 1/N.

    python benchmarks/memory.py                       # a Llama-shaped 334M model (1.3 GB in fp32)
    python benchmarks/memory.py --layers 2 --steps 1 --out /tmp/mem   # a quick run

For every layout it runs `p3d.train` (torchrun on gloo, CPU) through benchmarks/memory_phases.py,
reads each rank's peak RSS from the run's summary.json and samples the machine's used memory from
outside for the whole job's peak. Every process pays a fixed cost for what a rank imports (torch,
transformers, p3d); that baseline is measured in the same run, and the model's share is the peak
above it. The ideal per-rank share is the one-process share divided by the number of ranks.
For the 8-rank layouts a breakdown says what the peak rank holds at its peak (from the per-phase
RSS of memory_phases.py and the parameter count). A second table shows activation checkpointing
(none / selective / full) on a long-sequence config. Writes <out>/memory.md, <out>/memory.json and
<out>/memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LAYOUTS = {  # name: (tp, dp, cp)
    "1 process": (1, 1, 1),
    "dp2": (1, 2, 1),
    "tp2": (2, 1, 1),
    "dp4": (1, 4, 1),
    "tp2dp2": (2, 2, 1),
    "dp8": (1, 8, 1),
    "tp2dp2cp2": (2, 2, 2),
}
# Settings that trade memory: name: (layout, overrides). Vocabulary parallelism never gathers the
# embedding or the head (parallel/vocab.py); full activation checkpointing keeps each block's input only;
# without backward prefetch FSDP2 holds one unit's gathered weights less; the optimizer in the backward
# frees each gradient as soon as its shard is updated (no clipping, no accumulation: dp8 has none here).
VOCAB_PARALLEL = "parallel.vocab_parallel=true"
SETTINGS = {
    "dp8 + vocab_parallel": ("dp8", [VOCAB_PARALLEL]),
    "tp2dp2cp2 + vocab_parallel": ("tp2dp2cp2", [VOCAB_PARALLEL]),
    "dp8 + vocab_parallel + full AC": ("dp8", [VOCAB_PARALLEL, "train.activation_checkpointing=full"]),
    "tp2dp2cp2 + vocab_parallel + no backward prefetch": ("tp2dp2cp2", [VOCAB_PARALLEL, "parallel.backward_prefetch=false"]),
    "dp8 + vocab_parallel + full AC + no backward prefetch": ("dp8", [VOCAB_PARALLEL, "train.activation_checkpointing=full", "parallel.backward_prefetch=false"]),
    "dp8 + vocab_parallel + full AC + no backward prefetch + optimizer in backward": (
        "dp8", [VOCAB_PARALLEL, "train.activation_checkpointing=full", "parallel.backward_prefetch=false", "optim.in_backward=true", "optim.grad_clip=0"],
    ),
}


# Each allocation over 64 KiB is its own mapping, given back to the OS when freed: peak RSS then
# counts what the process held, not what glibc's heap kept after frees (which varies by rank and run).
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def used_memory_gb() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda key: int(info[key].split()[0])  # noqa: E731
    return (kib("MemTotal") - kib("MemAvailable")) / 2**20


class MemorySampler:
    """Peak of the machine's used memory while a job runs, above what was used before it."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.before = used_memory_gb()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, used_memory_gb())

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def job_peak_gb(self) -> float:
        return self.peak - self.before


PHASES = Path(__file__).with_name("memory_phases.py")
BREAKDOWN_LAYOUTS = ("dp8", "tp2dp2cp2", *SETTINGS)
HIDDEN, INTERMEDIATE, VOCAB = 1024, 4096, 32000  # the benchmark's Llama shape (see main)


def parameter_count(layers: int) -> int:
    """Embedding and untied head, per block attention (4 h^2) + MLP (3 h i) + two norms, final norm."""
    return 2 * VOCAB * HIDDEN + layers * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) + HIDDEN


def import_baseline_gb() -> float:
    """Peak RSS of a process that only imports what a p3d rank of this benchmark imports (the built-in
    corpus needs no `datasets`; the model's modeling module is imported when the model is built)."""
    code = "import resource, p3d.train, transformers.models.llama.modeling_llama; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"
    env = dict(os.environ, **RETURN_FREED_MEMORY)
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip())


def run_layout(name: str, layout: tuple[int, int, int], overrides: list[str], workdir: Path) -> dict:
    tp, dp, cp = layout
    world = tp * dp * cp
    run_dir = workdir / name.replace(" ", "_")
    phases_dir = run_dir.with_name(run_dir.name + "_phases")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(PHASES), str(phases_dir)]
    command += [*overrides, f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.cp={cp}", f"run.dir={run_dir}", "checkpoint=none"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **RETURN_FREED_MEMORY)
    started = time.monotonic()
    with MemorySampler() as sampler:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        killed = "SIGKILL" in done.stderr  # the kernel's OOM killer; the table says so instead of stopping
        if not killed:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        return {"layout": name, "ranks": world, "killed": True, "job_peak_gb": round(sampler.job_peak_gb, 3),
                "seconds": round(time.monotonic() - started, 1)}
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = [json.loads(path.read_text()) for path in sorted(phases_dir.glob("rank_*.json"))]
    return {
        "layout": name,
        "ranks": world,
        "per_rank_peak_gb": summary["peak_mem_gb_per_rank"],
        "job_peak_gb": round(sampler.job_peak_gb, 3),
        "final_loss": summary["loss"],
        "seconds": round(time.monotonic() - started, 1),
        "phases_of_peak_rank": max(phases, key=lambda report: report["peak_gb"]) if phases else None,
    }


def breakdown(report: dict, ranks: int, ideal: float, parameters: int) -> dict:
    """What the peak rank holds at its peak, GiB: measured from its phases, the states from the parameter count.

    steady = RSS at the start of the last step (weights and optimizer state held between steps);
    activations = the growth over the forward of the decoder blocks (first micro-batch); the rest of the peak is what
    the phase of the peak adds (gathered FSDP units, their gradients and reduce-scatter buffers, logits).
    """
    baseline = report["phase_peaks_gb"]["imports"]  # this rank's own RSS once it had imported p3d.train
    steady = report["last_step_transitions_gb"][0][1]
    blocks = []  # RSS as each block's forward began, first micro-batch of the last step
    for phase, value in report["last_step_transitions_gb"]:
        if phase == "loss":
            break
        if phase.startswith("forward block "):
            blocks.append(value)
    activations = (blocks[-1] - blocks[0]) / max(len(blocks) - 1, 1) * len(blocks)
    states = parameters * 4 * 3 / ranks / 2**30  # fp32 weights and two AdamW moments, sharded
    peak = report["peak_gb"]
    return {
        "peak_phase": report["peak_phase"],
        "import baseline": round(baseline, 3),
        "sharded weights and AdamW moments (1/N)": round(states, 3),
        "per-process runtime (data, process groups, lazily loaded code)": round(steady - baseline - states, 3),
        "activations of one micro-batch (all blocks)": round(activations, 3),
        "in the phase of the peak (gathered units, their gradients and reduce buffers, logits)": round(peak - steady - activations, 3),
        "peak": round(peak, 3),
        "ideal share (1/N of one process)": round(ideal, 3),
    }


def layout_table(results: list[dict], baseline: float, parameters: int) -> list[dict]:
    single_share = max(results[0]["per_rank_peak_gb"]) - baseline
    rows = []
    for result in results:
        if result.get("killed") or result.get("measured_earlier"):  # an earlier run's row keeps that run's figures
            rows.append(result)
            continue
        peak = max(result["per_rank_peak_gb"])
        ideal = single_share / result["ranks"]
        extra = {"breakdown": breakdown(result["phases_of_peak_rank"], result["ranks"], ideal, parameters)} if result["layout"] in BREAKDOWN_LAYOUTS and result.get("phases_of_peak_rank") else {}
        rows.append({
            **result,
            **extra,
            "max_rank_peak_gb": round(peak, 3),
            "model_share_gb": round(peak - baseline, 3),
            "ideal_share_gb": round(ideal, 3),
            "share_vs_one_process": round((peak - baseline) / single_share, 3),
            "share_vs_ideal": round((peak - baseline) / ideal, 2),
        })
    return rows


def markdown(rows: list[dict], ac_rows: list[dict], baseline: float, model_desc: str, ac_desc: str, before: dict | None = None) -> str:
    lines = [
        f"Model: {model_desc}. Import baseline per process (what a rank imports: torch, transformers, p3d): {baseline:.2f} GB. GB here are GiB (2^30 bytes), as p3d reports peak memory.",
        "Runs with `MALLOC_MMAP_THRESHOLD_=65536`, so that peak RSS counts what a rank held rather than what glibc kept after frees. "
        "The job peak is the machine's used memory above what it was before the job: it also counts whatever else ran on the machine meanwhile "
        "(per-rank RSS does not).",
        "",
        "| layout | ranks | max per-rank peak RSS (GB) | model share above baseline (GB) | ideal 1/N share (GB) | share vs 1 process | share vs ideal | job peak, whole machine (GB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if any(r.get("measured_earlier") for r in rows):
        lines[-2:-2] = ["Rows marked (earlier run) were not measured by this run: they come from an earlier run of this script (`--keep-from`), with that run's figures.", ""]
    for r in rows:
        if r.get("killed"):
            lines.append(f"| {r['layout']} | {r['ranks']} | killed by the OOM killer | | | | | {r['job_peak_gb']:.2f} when killed |")
            continue
        lines.append(
            f"| {r['layout']}{' (earlier run)' if r.get('measured_earlier') else ''} | {r['ranks']} | {r['max_rank_peak_gb']:.2f} | {r['model_share_gb']:.2f} | {r['ideal_share_gb']:.2f} | "
            f"{r['share_vs_one_process']:.2f} | {r['share_vs_ideal']:.2f} | {r['job_peak_gb']:.2f} |"
        )
    if before:
        earlier = {row["layout"]: row for row in before["layouts"] if "share_vs_ideal" in row}
        lines += ["", f"Before and after ({before['description']}):", "", "| layout | share vs ideal, before | after | max per-rank peak (GB), before | after |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {r['layout']} | {earlier[r['layout']]['share_vs_ideal']:.2f} | {r['share_vs_ideal']:.2f} | {earlier[r['layout']]['max_rank_peak_gb']:.2f} | {r['max_rank_peak_gb']:.2f} |"
            for r in rows if r["layout"] in earlier and "share_vs_ideal" in r
        ]
    for r in rows:
        if r.get("breakdown"):
            b = r["breakdown"]
            lines += ["", f"What the peak rank of {r['layout']} holds at its peak (phase: {b['peak_phase']}), GB:", "", "| part | GB |", "| --- | --- |"]
            before_b = (before or {}).get("breakdowns", {}).get(r["layout"])
            if before_b:
                lines[-2:] = [f"| part | before (GB, phase: {before_b['peak_phase']}) | after (GB) |", "| --- | --- | --- |"]
                lines += [f"| {key} | {before_b.get(key, float('nan')):.3f} | {value:.3f} |" for key, value in b.items() if key != "peak_phase"]
            else:
                lines += [f"| {key} | {value:.3f} |" for key, value in b.items() if key != "peak_phase"]
    if any(r.get("breakdown") for r in rows):
        head = VOCAB * HIDDEN * 4 / 2**30
        block = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * 4 / 2**30
        lines += ["", (
            "What stays above the ideal, and why. The ideal divides everything one process holds by N. Without vocabulary "
            "parallelism the peak of both 8-rank layouts is the start of the backward, with the output head gathered, its "
            f"unsharded gradient and its reduce-scatter buffer ({head:.3f} GB each at dp8, half that under tp2), and the input "
            "embedding is gathered again at the end. `parallel.vocab_parallel=true` shards both over the vocabulary across all "
            "ranks and never gathers them (the hidden states and token ids are gathered instead: a few MB here); the peak moves "
            "into the blocks' backward. What remains does not divide by N: (1) each process's runtime (data, process groups, "
            "allocator) is paid per rank; (2) the activations of one micro-batch: at dp8 every rank runs its own micro-batch of "
            "the same size as the one process's, so data parallelism cannot divide them (cp, tp with sequence parallelism, or "
            "activation checkpointing can); (3) FSDP2's working set for one block's backward: its gathered weights, its unsharded "
            f"gradient and the reduce-scatter buffer, {block:.3f} GB each at dp8 and half that under tp2, plus the next block's "
            "weights unless `parallel.backward_prefetch=false`. A block is a fixed share of the model (1/16 here) while the ideal "
            "is 1/N of it, so (3) weighs more as N grows; only FSDP units smaller than a block would shrink it (not built)."
        )]
    lines += ["", f"Activation checkpointing ({ac_desc}):", "", "| train.activation_checkpointing | max per-rank peak RSS (GB) | vs none |", "| --- | --- | --- |"]
    none_peak = max(ac_rows[0]["per_rank_peak_gb"])
    for r in ac_rows:
        peak = max(r["per_rank_peak_gb"])
        lines.append(f"| {r['layout']} | {peak:.2f} | {peak / none_peak:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("killed")]
    names = [r["layout"] for r in rows]
    x = range(len(rows))
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.bar([i - 0.2 for i in x], [r["model_share_gb"] for r in rows], width=0.4, label="measured per-rank share (peak RSS - baseline)")
    axis.bar([i + 0.2 for i in x], [r["ideal_share_gb"] for r in rows], width=0.4, label="ideal: one-process share / ranks")
    axis.set_xticks(list(x), [f"{n}\n({r['ranks']} ranks)" for n, r in zip(names, rows)])
    axis.set_ylabel("GB per rank")
    axis.set_title("Per-rank memory above the import baseline, by layout")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the Llama-shaped model")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layouts", default=",".join([*LAYOUTS, *SETTINGS]), help="comma-separated names from: " + ", ".join([*LAYOUTS, *SETTINGS]))
    parser.add_argument("--keep-from", help="an earlier memory.json: the layouts (and activation-checkpointing rows) this run does not measure are taken from it")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--before", help="an earlier memory.json (with a 'description' and, optionally, 'breakdowns') to compare against")
    parser.add_argument("--from-json", help="re-render the tables and plot from a memory.json this script wrote, without measuring")
    args = parser.parse_args()

    model = [
        "model=tiny_llama", "model.config.hidden_size=1024", "model.config.intermediate_size=4096", f"model.config.num_hidden_layers={args.layers}",
        "model.config.num_attention_heads=16", "model.config.num_key_value_heads=16", "model.config.vocab_size=32000",
        f"data.seq_len={args.seq_len}", f"train.steps={args.steps}", "train.global_batch_size=8", "train.micro_batch_size=1",
    ]
    ac_common = ["model=tiny_llama", "model.config.hidden_size=256", "model.config.intermediate_size=1024", "model.config.num_hidden_layers=4",
                 "data.seq_len=2048", "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=4"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:  # re-render: the measurements of an earlier run, this script's tables
        saved = json.loads(Path(args.from_json).read_text())
        baseline, results, ac_results = saved["baseline_gb"], saved["layouts"], saved["activation_checkpointing"]
    else:
        kept = json.loads(Path(args.keep_from).read_text()) if args.keep_from else None
        measured = args.layouts.split(",")
        # shares are taken above one baseline and against the one-process run: an earlier run's, with its row
        baseline = kept["baseline_gb"] if kept and "1 process" not in measured else import_baseline_gb()
        with tempfile.TemporaryDirectory() as workdir:
            results = []
            for name in [*LAYOUTS, *SETTINGS]:
                if name not in measured:
                    results += [{**row, "measured_earlier": True} for row in (kept or {}).get("layouts", []) if row["layout"] == name]
                    continue
                layout, overrides = SETTINGS.get(name, (name, []))
                results.append(run_layout(name, LAYOUTS[layout], [*model, *overrides], Path(workdir)))
                print(f"{name}: peaks {results[-1].get('per_rank_peak_gb')}, job {results[-1]['job_peak_gb']} GB", flush=True)
            if kept:
                ac_results = kept["activation_checkpointing"]
            else:
                ac_results = [
                    run_layout(mode, (1, 1, 1), [*ac_common, f"train.activation_checkpointing={mode}"], Path(workdir))
                    for mode in ("none", "selective", "full")
                ]
    rows = layout_table(results, baseline, parameter_count(args.layers))
    model_desc = f"Llama shape, hidden 1024, {args.layers} layers, vocab 32000 (334M parameters at 16 layers), fp32, seq_len {args.seq_len}, micro-batch 1, {args.steps} steps"
    ac_desc = "tiny_llama widened to hidden 256, 4 layers, seq_len 2048, micro-batch 4, 1 process; selective = every 2nd block"
    before = json.loads(Path(args.before).read_text()) if args.before else (saved.get("before") if args.from_json else None)
    text = markdown(rows, ac_results, baseline, model_desc, ac_desc, before)
    print(text)
    (out / "memory.md").write_text("# Memory by layout\n\nGenerated by `python benchmarks/memory.py`.\n\n" + text)
    (out / "memory.json").write_text(json.dumps({"baseline_gb": baseline, "layouts": rows, "activation_checkpointing": ac_results, "before": before}, indent=1))
    plot(rows, out / "memory.png")


if __name__ == "__main__":
    main()
