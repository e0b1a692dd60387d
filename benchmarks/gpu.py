"""The GPU check: one-GPU bf16 training of real model shapes with p3d and a hand-written loop, and p3d's CUDA path.

    bash benchmarks/gpu.sh                 # on a machine with one H100/H200-class GPU; under 8 minutes
    python benchmarks/gpu.py --dry-run     # CPU/gloo, tiny shapes, a few steps: the same path, in seconds

For each model (llama3.2-1b and opt1.3b shapes, random init from conf/model, no download) and each
variant (eager or `train.compile`, with or without full activation checkpointing), p3d trains
`--steps` steps in bf16 (fp32 master weights) on one GPU under `torchrun --nproc_per_node=1`, and the
hand-written loop (transformers' model, torch.autocast bf16, fused AdamW, the same loss, clipping and
batch; blocks compiled / checkpointed alike; no p3d code) trains the same shape. Reported: median
tokens/s after warm-up, MFU against the device's dense bf16 peak (6 x matmul parameters + causal
attention FLOPs per token, as p3d's own MFU), and torch.cuda.max_memory_allocated.

p3d's CUDA path is checked on the way: every p3d run records the device its parameters live on, the
device the trainer binds and the process group's backend (NCCL for CUDA tensors, on one rank), and
a two-rank `parallel.cp=2 parallel.cp_impl=torch` run is tried (PyTorch's ring attention needs a
rank per GPU; with one GPU the outcome is recorded as it comes).

Writes <out>/gpu.md and gpu.json (--dry-run: gpu_dry_run.md / .json, never over the GPU results).
A run past --budget-s skips the remaining measurements, naming them.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = {"eager": (False, False), "eager+ac": (False, True), "compile": (True, False), "compile+ac": (True, True)}


# ---- what a run measures ------------------------------------------------------------------------
def matmul_flops_per_token(hf_config, seq_len: int) -> float:
    """6 x parameters in matmuls (all but embedding lookups; a tied head counts) + 12 L H S for causal attention."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    unique = {id(p): p for p in model.parameters()}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    if head is not None:
        lookups.discard(id(head.weight))
    params = sum(p.numel() for key, p in unique.items() if key not in lookups)
    text = hf_config.get_text_config()
    return 6 * params + 12 * text.num_hidden_layers * text.hidden_size * seq_len


def hf_config_of(model_name: str):
    """The model preset's transformers config (conf/model/<name>.yaml), through p3d's own composition."""
    from p3d.config.compose import compose, to_object
    from p3d.model import build_hf_config

    config = to_object(compose([f"model={model_name}"], []))
    return build_hf_config(config.model)


# ---- workers (each run is its own process: fresh memory counters and compile caches) -----------
def p3d_worker(result_path: Path, overrides: list[str]) -> None:
    """p3d.train as usual; records where the trainer put the model and which backend the group uses."""
    import torch
    import torch.distributed as dist

    import p3d.trainer
    from p3d.train import main

    original_fit = p3d.trainer.Trainer.fit

    def fit(self):
        param = next(self.model.parameters())
        local = param.to_local() if hasattr(param, "to_local") else param
        facts = {
            "trainer_device": str(self.device),
            "parameter_device": str(local.device),
            "backend": str(dist.get_backend()),
            "world_size": dist.get_world_size(),
            "cuda_device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
        }
        original_fit(self)
        if dist.get_rank() == 0:
            facts["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            result_path.write_text(json.dumps(facts))

    p3d.trainer.Trainer.fit = fit
    main(overrides)


def decoder_blocks(model, layers: int):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise SystemExit("no decoder block list found")


def hand_worker(args) -> None:
    """The hand-written one-GPU loop: transformers' model in fp32, autocast bf16, fused AdamW; no p3d code."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    hf_config = hf_config_of(args.model)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    model.train()
    blocks = decoder_blocks(model, hf_config.get_text_config().num_hidden_layers)
    if args.ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for block in blocks:
            block.compile()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95), fused=True)
    generator = torch.Generator().manual_seed(0)
    tokens = args.micro_batch * args.seq_len
    times, losses = [], []
    for _ in range(args.steps):
        batch = torch.randint(0, 256, (args.micro_batch, args.seq_len + 1), generator=generator).to(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum") / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    Path(args.result).write_text(json.dumps({
        "tokens_per_s": tokens / statistics.median(times[args.warmup:]),
        "max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": [loss.item() for loss in losses],
    }))


# ---- the driver -------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def launch(command: list[str], timeout: float) -> tuple[bool, str]:
    """(succeeded, the last lines of stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"), PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(timeout, 1), cwd=REPO)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
    return done.returncode == 0, tail


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def p3d_overrides(model: str, compile_: bool, ac: bool, args, run_dir: Path) -> list[str]:
    return [
        f"model={model}", "data.tokenizer=byte", f"data.seq_len={args.seq_len}", f"train.steps={args.steps}",
        f"train.global_batch_size={args.micro_batch}", f"train.micro_batch_size={args.micro_batch}", "parallel.dp=1",
        "train.dtype=bf16", f"train.compile={str(compile_).lower()}", f"train.activation_checkpointing={'full' if ac else 'none'}",
        "optim.lr=1e-4", "checkpoint=none", "logging.progress=false", f"dist.device={args.device}", f"run.dir={run_dir}",
    ]


def measure_p3d(model: str, variant: str, args, workdir: Path, budget: Budget) -> dict:
    compile_, ac = VARIANTS[variant]
    run_dir = workdir / f"p3d-{model}-{variant}"
    facts_path = workdir / f"p3d-{model}-{variant}.json"
    command = [*torchrun(1), str(Path(__file__).resolve()), "--worker", "p3d", f"--result={facts_path}", "--",
               *p3d_overrides(model, compile_, ac, args, run_dir)]
    ok, tail = launch(command, budget.left())
    if not ok:
        return {"error": tail}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    facts = json.loads(facts_path.read_text())
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[args.warmup:]), **facts,
            "losses": [r["loss"] for r in records]}


def measure_hand(model: str, variant: str, args, workdir: Path, budget: Budget) -> dict:
    compile_, ac = VARIANTS[variant]
    result = workdir / f"hand-{model}-{variant}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "hand", f"--model={model}", f"--result={result}",
               f"--device={args.device}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seq-len={args.seq_len}",
               f"--micro-batch={args.micro_batch}", *(["--compile"] if compile_ else []), *(["--ac"] if ac else [])]
    ok, tail = launch(command, budget.left())
    return json.loads(result.read_text()) if ok else {"error": tail}


def check_torch_cp(args, workdir: Path, budget: Budget) -> dict:
    """parallel.cp=2 with PyTorch's ring attention: needs two GPUs (a rank per device)."""
    if args.device != "cuda":
        return {"ran": False, "outcome": "not run: no CUDA device (parallel.cp_impl=torch is CUDA only)"}
    import torch

    run_dir = workdir / "p3d-cp-torch"
    overrides = ["model=tiny_llama", "data.seq_len=256", "train.steps=3", "train.global_batch_size=2", "train.micro_batch_size=2",
                 "parallel.cp=2", "parallel.dp=1", "parallel.cp_impl=torch", "train.dtype=bf16", "checkpoint=none", "logging.progress=false",
                 f"run.dir={run_dir}"]
    ok, tail = launch([*torchrun(2), "-m", "p3d.train", *overrides], min(budget.left(), 120))
    gpus = torch.cuda.device_count()
    if ok:
        return {"ran": True, "outcome": f"ran on {gpus} GPU(s): 3 steps of tiny_llama at cp=2 with PyTorch's ring attention"}
    return {"ran": False, "outcome": f"did not run on {gpus} GPU(s) (two ranks need a device each): {tail.splitlines()[-1] if tail else 'no output'}"}


def device_facts(args) -> dict:
    import torch

    from p3d.metrics import PEAK_TFLOPS_BY_DEVICE_NAME

    facts = {"torch": torch.__version__, "device": args.device}
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        facts.update(name=name, count=torch.cuda.device_count(),
                     peak_bf16_tflops=next((value for key, value in PEAK_TFLOPS_BY_DEVICE_NAME.items() if key in name), None))
    else:
        facts.update(name="CPU (dry run)", count=0, peak_bf16_tflops=None)
    return facts


def report(result: dict) -> str:
    facts = result["device"]
    lines = [
        f"Device: {facts['name']} (x{facts['count']}), torch {facts['torch']}, bf16 peak {facts['peak_bf16_tflops'] or 'n/a'} TFLOP/s; "
        f"measured {result['when']}; {result['steps']} steps ({result['warmup']} warm-up), micro batch {result['micro_batch']} x {result['seq_len']} tokens, "
        f"bf16 compute with fp32 master weights, fused AdamW; total {result['seconds']:.0f} s.",
        "",
        "| model | variant | program | tokens/s | MFU | max allocated GB | p3d / hand-written |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        for program in ("p3d", "hand"):
            run = row[program]
            label = "p3d" if program == "p3d" else "hand-written"
            if "error" in run or "skipped" in run:
                lines.append(f"| {row['model']} | {row['variant']} | {label} | {run.get('skipped') or 'failed: ' + run['error'].splitlines()[-1][:160]} | | | |")
                continue
            mfu = f"{run['mfu']:.1%}" if run.get("mfu") is not None else "n/a"
            memory = f"{run['max_memory_allocated_gb']:.1f}" if run.get("max_memory_allocated_gb") is not None else "n/a"
            ratio = f"{row['ratio']:.2f}" if program == "p3d" and row.get("ratio") else ""
            lines.append(f"| {row['model']} | {row['variant']} | {label} | {run['tokens_per_s']:,.0f} | {mfu} | {memory} | {ratio} |")
    cuda = result["cuda_path"]
    lines += ["", "p3d's CUDA path:", ""]
    lines.append(f"- device binding and process group (every p3d run above, one rank under torchrun): {cuda['binding']}")
    lines.append(f"- `parallel.cp_impl=torch`: {cuda['torch_cp']['outcome']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    if "--worker" in sys.argv:
        worker = argparse.ArgumentParser()
        worker.add_argument("--worker", choices=["p3d", "hand"])
        worker.add_argument("--result", type=Path)
        for name in ("model", "device"):
            worker.add_argument(f"--{name}")
        for name in ("steps", "warmup", "seq-len", "micro-batch"):
            worker.add_argument(f"--{name}", type=int)
        worker.add_argument("--compile", action="store_true")
        worker.add_argument("--ac", action="store_true")
        known, rest = worker.parse_known_args()
        if known.worker == "p3d":
            p3d_worker(known.result, [item for item in rest if item != "--"])
        else:
            hand_worker(known)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU/gloo, tiny models, a few steps: checks the script path and the report")
    parser.add_argument("--models", default=None, help="model presets (default llama3.2-1b,opt1.3b; dry run tiny_llama,tiny_opt)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=450, help="skip what is left after this many seconds")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    dry = args.dry_run
    args.device = "cpu" if dry else "cuda"
    args.models = args.models or ("tiny_llama,tiny_opt" if dry else "llama3.2-1b,opt1.3b")
    args.steps = args.steps or (3 if dry else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 4)
    args.seq_len = args.seq_len or (32 if dry else 2048)
    args.micro_batch = args.micro_batch or (2 if dry else 4)
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    if not dry:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run on a GPU machine, or use --dry-run")
    started = time.monotonic()
    budget = Budget(args.budget_s)
    facts = device_facts(args)
    rows, bindings = [], set()
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models.split(","):
            flops = matmul_flops_per_token(hf_config_of(model), args.seq_len)
            for variant in args.variants.split(","):
                row = {"model": model, "variant": variant}
                for program, measure in (("p3d", measure_p3d), ("hand", measure_hand)):
                    if budget.left() < 20:
                        row[program] = {"skipped": f"skipped: past the {args.budget_s:.0f} s budget"}
                        continue
                    run = measure(model, variant, args, Path(workdir), budget)
                    if "tokens_per_s" in run and facts["peak_bf16_tflops"]:
                        run["mfu"] = run["tokens_per_s"] * flops / (facts["peak_bf16_tflops"] * 1e12)
                    row[program] = run
                    print(f"{model} {variant} {program}: {run.get('tokens_per_s', run.get('error') or run.get('skipped'))}", flush=True)
                if "trainer_device" in row["p3d"]:
                    bindings.add(f"trainer device {row['p3d']['trainer_device']}, parameters on {row['p3d']['parameter_device']}, "
                                  f"backend {row['p3d']['backend']}, world size {row['p3d']['world_size']}")
                if "tokens_per_s" in row["p3d"] and "tokens_per_s" in row["hand"]:
                    row["ratio"] = row["p3d"]["tokens_per_s"] / row["hand"]["tokens_per_s"]
                rows.append(row)
        torch_cp = check_torch_cp(args, Path(workdir), budget) if budget.left() > 30 or not dry else {"ran": False, "outcome": "skipped: time budget"}
    result = {
        "dry_run": dry, "device": facts, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps, "warmup": args.warmup,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "rows": rows, "seconds": time.monotonic() - started,
        "cuda_path": {"binding": "; ".join(sorted(bindings)) or "no p3d run completed", "torch_cp": torch_cp},
    }
    text = report(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_dry_run" if dry else "gpu"
    title = "# GPU check (CPU dry run: tiny shapes, not GPU figures)" if dry else "# GPU check: one-GPU bf16 training, p3d against a hand-written loop"
    (out / f"{stem}.md").write_text(f"{title}\n\nGenerated by `{'python benchmarks/gpu.py --dry-run' if dry else 'bash benchmarks/gpu.sh'}`.\n\n{text}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    failed = [f"{row['model']} {row['variant']} {program}" for row in rows for program in ("p3d", "hand") if "error" in row[program]]
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)} (see {out / f'{stem}.md'})")


if __name__ == "__main__":
    main()
