"""A small mixture of experts at ep1, ep2 and ep4 on 4 ranks: tokens/s, peak memory, expert weight bytes.

    python benchmarks/moe.py [--steps 8] [--out docs/results] [--render-only]

The model is Mixtral's architecture with 8 experts of 2 per token (hidden 256, expert MLP 1024,
4 layers, vocabulary 264); the layouts are dp4 (experts FSDP-sharded over 4 ranks, each rank
gathers all 8 to compute), dp4 ep2 and dp4 ep4, plus one process for reference. Each layout runs
`p3d.train` (torchrun, gloo, CPU): tokens/s is the median of the steps after a warm-up, peak memory
each rank's peak RSS (summary.json). The expert weight bytes per rank are measured on the model
p3d builds (the same code, one forward on random tokens): what a rank stores (its FSDP shard) and
what it holds while its experts compute (read inside the experts' forward, after FSDP's all-gather).
Writes <out>/moe.md, moe.json and moe.png.

    torchrun --nproc_per_node=N benchmarks/moe.py --measure-bytes OUT.json key=value ...
is the per-rank measurement the driver starts.
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

LAYOUTS = {"1 process": (1, 1), "ep1 (dp4)": (4, 1), "ep2 (dp4)": (4, 2), "ep4 (dp4)": (4, 4)}  # name: (world, ep)
MODEL = [
    "model=tiny", "model.arch=mixtral", "model.config.hidden_size=256", "model.config.intermediate_size=1024",
    "model.config.num_hidden_layers=4", "model.config.num_local_experts=8", "model.config.num_experts_per_tok=2",
]


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def layout_overrides(world: int, ep: int) -> list[str]:
    return [f"parallel.dp={world}", f"parallel.ep={ep}"]


def train(world: int, ep: int, steps: int, warmup: int, work: Path) -> dict:
    run_dir = work / f"train-{world}-{ep}"
    overrides = [
        *MODEL, *layout_overrides(world, ep), f"train.steps={steps}", "train.global_batch_size=8",
        f"train.micro_batch_size={8 // world}", "data.seq_len=256", "checkpoint=none", f"run.dir={run_dir}",
    ]
    run([*torchrun(world), "-m", "p3d.train", *overrides])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[warmup:]),
        "peak_mem_gb_per_rank": summary["peak_mem_gb_per_rank"],
        "losses": [r["loss"] for r in records],
    }


def expert_bytes(world: int, ep: int, work: Path) -> dict:
    out = work / f"bytes-{world}-{ep}.json"
    run([*torchrun(world), __file__, "--measure-bytes", str(out), *MODEL, *layout_overrides(world, ep), "train.micro_batch_size=1"])
    return json.loads(out.read_text())


def measure_bytes(out_path: str, overrides: list[str]) -> None:
    """One rank: build the model as p3d.train does, run one forward, record the experts' weight bytes."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from p3d.config.compose import compose, to_object
    from p3d.config.validate import validate
    from p3d.distributed.env import init_distributed, shutdown, world_size_from_env
    from p3d.distributed.mesh import Meshes
    from p3d.models import experts_modules
    from p3d.parallel.expert import expert_weight_bytes
    from p3d.parallel.parallelize import build_parallel_model

    config = to_object(compose(overrides))
    setup = validate(config, world_size_from_env())
    env = init_distributed(config.dist)
    meshes = Meshes(setup.dims, env.device.type)
    model = build_parallel_model(config, setup.hf_config, setup.tp_plan, meshes, env.device)
    experts = [module for _, module in experts_modules(model)]
    stored = sum(expert_weight_bytes(module)[0] for module in experts)
    computing: list[int] = []

    def record(module, args):  # registered after FSDP's own pre-forward hook (the all-gather): runs after it
        computing.append(sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in module.parameters(recurse=False)))

    for module in experts:
        module.register_forward_pre_hook(record)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 64)), use_cache=False)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"stored": stored, "computing": sum(computing)})
    if env.is_main:
        whole = sum(expert_weight_bytes(module)[1] for module in experts)
        Path(out_path).write_text(json.dumps({"whole": whole, "per_rank": per_rank}))
    shutdown(meshes.world)


def render(results: dict) -> str:
    whole = results["1 process"]["bytes"]["whole"]
    lines = [
        "# A small mixture of experts at ep1, ep2, ep4 (measured under load)",
        "",
        "Mixtral architecture, 8 experts (2 per token), hidden 256, expert MLP 1024, 4 layers; 8 sequences of 256",
        "tokens per step; gloo on this machine's 2 shared CPU cores, **measured under load** (other jobs ran at the",
        "same time), so the tokens/s show the cost of the layouts here, not what they gain on accelerators.",
        f"Expert weights of the whole model: {whole / 2**20:.2f} MiB (fp32). Bytes are rank 0's (all ranks are equal).",
        "",
        "| layout | tokens/s | highest peak memory of a rank (GB) | expert weights stored per rank (MiB) | expert weights held to compute (MiB) | held / ep1's |",
        "|---|---|---|---|---|---|",
    ]
    ep1 = results["ep1 (dp4)"]["bytes"]["per_rank"][0]["computing"]
    reference = results["1 process"]["losses"]
    worst = max(abs(a - b) for entry in results.values() for a, b in zip(entry["losses"], reference))
    for name, entry in results.items():
        rank0 = entry["bytes"]["per_rank"][0]
        peaks = entry["peak_mem_gb_per_rank"]
        lines.append(
            f"| {name} | {entry['tokens_per_s']:,.0f} | {max(peaks):.2f} | {rank0['stored'] / 2**20:.2f} | "
            f"{rank0['computing'] / 2**20:.2f} | {rank0['computing'] / ep1:.2f} |"
        )
    lines += [
        "",
        "Stored: the rank's shard of the expert weights (at dp4 FSDP shards them over the ranks that hold the same",
        "experts: 4 at ep1, 2 at ep2, 1 at ep4, so the stored share is the same). Held to compute: what the rank has",
        "after FSDP's all-gather, inside the experts' forward: every expert at ep1, its ep-th of them at ep2 and ep4.",
        f"Largest difference of a step's loss from one process's, over all layouts and {len(reference)} steps: {worst:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.bar(names, [results[name]["tokens_per_s"] for name in names], color="tab:blue")
    left.set_title("tokens/s (measured under load)")
    right.bar(names, [results[name]["bytes"]["per_rank"][0]["computing"] / 2**20 for name in names], color="tab:orange", label="held to compute")
    right.bar(names, [results[name]["bytes"]["per_rank"][0]["stored"] / 2**20 for name in names], color="tab:green", label="stored", width=0.4)
    right.set_title("expert weights per rank (MiB)")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--render-only", action="store_true", help="redraw moe.md and moe.png from <out>/moe.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads((out / "moe.json").read_text())
        (out / "moe.md").write_text(render(results))
        plot(results, out / "moe.png")
        return
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name, (world, ep) in LAYOUTS.items():
            print(f"{name} ...", flush=True)
            results[name] = {**train(world, ep, args.steps, args.warmup, Path(work)), "bytes": expert_bytes(world, ep, Path(work))}
    (out / "moe.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "moe.md").write_text(render(results))
    plot(results, out / "moe.png")
    print(render(results))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-bytes":
        measure_bytes(sys.argv[2], sys.argv[3:])
    else:
        main()
