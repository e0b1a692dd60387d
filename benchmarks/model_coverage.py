"""Which Hugging Face causal LMs p3d trains exactly, on which layouts.

    python benchmarks/model_coverage.py [--arch llama gpt2 ...] [--layouts tp2 cp2 tp2cp2] [--fresh]

For every model type of the installed transformers that has a causal-LM class, p3d builds its tiny
version (`model=tiny model.arch=<type>`), trains it 3 steps on one process, then on each layout
(tp2, cp2, tp2cp2: 2-4 ranks on gloo, forked from this process, which imports p3d once and has
validated the config, so the ranks inherit its imports and the CP probe's findings), and compares
the per-step losses with one process's (fp32, 1e-4). tp2cp2 runs only where tp2 and cp2 are both
exact (otherwise it is refused by validation, or fails as its part does). Each (arch, layout) gets
a status:

    exact    every step's loss within 1e-4 of one process's
    refused  validation refused the config (its one-line reason is kept)
    fails    the run failed, or its losses differ (the reason says how)

Results go to docs/results/models.json (a list of {arch, layout, status, reason, seconds}) and
docs/results/models.md (the table and the counts). Finished entries are cached in
docs/results/models.partial.jsonl, so an interrupted sweep resumes where it stopped (--fresh starts
over). Run it in the background on a shared machine: it takes a while.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TOLERANCE = 1e-4
STEPS = 3
LAYOUTS = {"1": (1, 1, 1), "tp2": (2, 1, 1), "cp2": (1, 1, 2), "tp2cp2": (2, 1, 2), "tp2dp2cp2": (2, 2, 2)}
RUN_TIMEOUT_S = 600
COMBINES = {"tp2cp2": ("tp2", "cp2"), "tp2dp2cp2": ("tp2", "cp2")}  # a layout is only run when its parts are exact
COMMON = [f"train.steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=32", "checkpoint=none", "logging.progress=false"]


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_mixture_of_experts(arch: str) -> bool:
    """Whether the architecture routes tokens to experts (marked MoE in the results; parallel.ep splits their experts)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(arch)
        text = config.get_text_config()
    except Exception:
        return False
    plan = getattr(text, "base_model_tp_plan", None) or {}
    if any(str(style).startswith("moe_") for style in plan.values()):
        return True
    return _has_experts(text)


def _has_experts(config) -> bool:
    """An expert count above one in the config or a config nested in it (DBRX keeps it in `ffn_config`)."""
    from transformers import PretrainedConfig

    expert_fields = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    if any(isinstance(getattr(config, name, None), int) and getattr(config, name) > 1 for name in expert_fields):
        return True
    return any(_has_experts(value) for value in vars(config).values() if isinstance(value, PretrainedConfig))


def overrides_for(arch: str, layout: str, run_dir: Path) -> list[str]:
    tp, dp, cp = LAYOUTS[layout]
    micro = 4 // dp  # every dp rank one micro-batch: no accumulation on any layout
    return ["model=tiny", f"model.arch={arch}", *COMMON, f"train.micro_batch_size={micro}", f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.cp={cp}", f"run.dir={run_dir}"]


def validation_problem(overrides: list[str], world: int) -> str | None:
    """Validation's one line for this config, or None when it is accepted."""
    from p3d.config.compose import compose, to_object
    from p3d.config.validate import validate
    from p3d.errors import ConfigError

    try:
        validate(to_object(compose(overrides)), world)
    except ConfigError as error:
        return error.problems[0]
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(overrides: list[str], world: int, log: Path) -> tuple[int, str]:
    """Fork `world` ranks running p3d.train; (exit code, last lines of their output)."""
    port = free_port()
    children = []
    with open(log, "w") as out:
        for rank in range(world):
            pid = os.fork()
            if pid == 0:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                os._exit(_rank_main(rank, world, port, overrides))
            children.append(pid)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    worst = 0
    pending = set(children)
    while pending:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                for other in pending:
                    os.kill(other, signal.SIGKILL)
                worst = worst or 124
            time.sleep(0.2)
            continue
        pending.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and worst == 0:
            worst = code
            time.sleep(2)
            for other in pending:
                os.kill(other, signal.SIGKILL)
    return worst, log.read_text(errors="replace")


def _rank_main(rank: int, world: int, port: int, overrides: list[str]) -> int:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", P3D_DEBUG="1",
    )
    import torch

    torch.set_num_threads(1)
    import p3d.train

    try:
        p3d.train.main(overrides)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(("[transformers]", "  "))]
    errors = [line for line in lines if "Error" in line or "error" in line or "Exception" in line]
    return (errors or lines or ["no output"])[-1][:300]


def run_one(arch: str, layout: str, scratch: Path, reference: list[float] | None, one_process_reason: str = "", parts: tuple[dict, ...] = ()) -> dict:
    """`parts`: the entries of the layouts this one combines (tp2 and cp2 for tp2cp2): if one of them is not
    exact, this one is not run either (validation still is, for its own one-line refusal)."""
    tp, dp, cp = LAYOUTS[layout]
    world = tp * dp * cp
    run_dir = scratch / f"{arch}-{layout}"
    overrides = overrides_for(arch, layout, run_dir)
    started = time.monotonic()
    entry = {"arch": arch, "layout": layout}
    try:
        problem = validation_problem(overrides, world)
    except Exception as error:  # noqa: BLE001 - any crash of validation is a failure to record
        problem = None
        entry.update(status="fails", reason=f"validation crashed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
    if "status" not in entry and problem is not None:
        entry.update(status="refused", reason=problem)
    if "status" not in entry and layout != "1" and reference is None:
        entry.update(status="fails", reason=f"the one-process run fails ({one_process_reason})")
    failed_part = next((part for part in parts if part.get("status") != "exact"), None)
    if "status" not in entry and failed_part is not None:
        entry.update(status="fails", reason=f"not run: {failed_part['layout']} {failed_part['status']} ({failed_part.get('reason', '')})")
    if "status" not in entry:
        code, output = run_ranks(overrides, world, scratch / f"{arch}-{layout}.log")
        got = losses(run_dir)
        if code != 0:
            entry.update(status="fails", reason=f"exit {code}: {last_error_line(output)}")
        elif len(got) != STEPS:
            entry.update(status="fails", reason=f"{len(got)} of {STEPS} steps logged")
        elif layout == "1":
            entry.update(status="exact", reason="", losses=got)
        else:
            worst = max(abs(a - b) for a, b in zip(got, reference))
            if worst <= TOLERANCE:
                entry.update(status="exact", reason=f"max |loss difference| {worst:.1e}")
            else:
                entry.update(status="fails", reason=f"losses differ from one process's by up to {worst:.2e}")
    entry["seconds"] = round(time.monotonic() - started, 1)
    return entry


def render_markdown(entries: list[dict], layouts: list[str], moe: set[str], subset: bool = False) -> str:
    by_arch: dict[str, dict[str, dict]] = {}
    for entry in entries:
        by_arch.setdefault(entry["arch"], {})[entry["layout"]] = entry
    dense = [arch for arch in by_arch if arch not in moe]
    scope = "These causal-LM model types" if subset else "Every causal-LM model type"
    command = "python benchmarks/model_coverage.py" + (" --arch " + " ".join(sorted(by_arch)) if subset else "") + " --layouts " + " ".join(layout for layout in layouts if layout != "1")
    lines = ["# Model coverage", "", f"{scope} of transformers {_transformers_version()}, each as its tiny version (`model=tiny model.arch=<type>`):",
             f"{STEPS} steps in fp32, per-step losses compared with one process's (tolerance {TOLERANCE:g}). Generated by",
             f"`{command}`; the timings were measured on a shared 2-core machine under load (other jobs running).", "", "## Counts", ""]
    parallel_layouts = [layout for layout in layouts if layout != "1"]
    lines.append("| layout | exact | refused | fails | exact among dense (non-MoE) types |")
    lines.append("|---|---|---|---|---|")
    for layout in layouts:
        statuses = [by_arch[arch].get(layout, {}).get("status") for arch in by_arch]
        dense_exact = sum(1 for arch in dense if by_arch[arch].get(layout, {}).get("status") == "exact")
        lines.append(f"| {layout} | {statuses.count('exact')} | {statuses.count('refused')} | {statuses.count('fails')} | {dense_exact} / {len(dense)} |")
    both = [arch for arch in dense if all(by_arch[arch].get(layout, {}).get("status") == "exact" for layout in ("tp2", "cp2"))]
    lines += ["", f"Dense types exact on both tp2 and cp2: **{len(both)} of {len(dense)}** ({100 * len(both) / max(len(dense), 1):.0f}%).", ""]
    slowest = sorted((entry for entry in entries if entry.get("seconds")), key=lambda entry: -entry["seconds"])[:5]
    lines += ["Slowest runs: " + ", ".join(f"{entry['arch']} {entry['layout']} ({entry['seconds']:.0f} s)" for entry in slowest), ""]
    lines += ["## By architecture", "", "| arch | " + " | ".join(layouts) + " | reasons |", "|---|" + "---|" * len(layouts) + "---|"]
    for arch in sorted(by_arch):
        cells, reasons = [], []
        for layout in layouts:
            entry = by_arch[arch].get(layout)
            status = entry["status"] if entry else "-"
            cells.append(status)
            if entry and status != "exact" and entry.get("reason") and entry["reason"] not in reasons:
                reasons.append(entry["reason"])
        name = f"{arch} (MoE)" if arch in moe else arch
        reason = "; ".join(reason.replace("|", "\\|") for reason in reasons)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reason} |")
    del parallel_layouts
    return "\n".join(lines) + "\n"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="*", help="only these model types (default: every causal-LM type)")
    parser.add_argument("--layouts", nargs="*", default=["tp2", "cp2", "tp2cp2"], choices=[layout for layout in LAYOUTS if layout != "1"])
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, help="the partial results to resume from (default: <out>/models.partial.jsonl)")
    parser.add_argument("--report-only", action="store_true", help="write models.json and models.md from the cached results, run nothing")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import p3d.train  # noqa: F401  (imported once, before the ranks are forked)

    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.cache or args.out / "models.partial.jsonl"
    if args.fresh and cache_path.exists():
        cache_path.unlink()
    cached = [json.loads(line) for line in cache_path.read_text().splitlines()] if cache_path.exists() else []
    done = {(entry["arch"], entry["layout"]): entry for entry in cached}
    archs = args.arch or causal_lm_types()
    layouts = ["1", *args.layouts]
    if args.report_only:
        archs = [arch for arch in archs if any(key[0] == arch for key in done)]
        layouts = [layout for layout in LAYOUTS if any(key[1] == layout for key in done)]
    with tempfile.TemporaryDirectory(prefix="p3d-coverage-") as scratch_dir:
        scratch = Path(scratch_dir)
        for arch in archs:
            reference = done.get((arch, "1"), {}).get("losses")
            for layout in layouts:
                if (arch, layout) in done or args.report_only:
                    continue
                parts = tuple(done[arch, part] for part in COMBINES.get(layout, ()) if (arch, part) in done)
                entry = run_one(arch, layout, scratch, reference, done.get((arch, "1"), {}).get("reason", ""), parts)
                if layout == "1":
                    reference = entry.get("losses")
                done[arch, layout] = entry
                with open(cache_path, "a") as cache:
                    cache.write(json.dumps(entry) + "\n")
                print(f"{arch:28s} {layout:7s} {entry['status']:8s} {entry['seconds']:6.1f}s {entry.get('reason', '')[:120]}", flush=True)
    entries = [entry for entry in done.values() if entry["arch"] in archs]
    moe = {arch for arch in {entry["arch"] for entry in entries} if is_mixture_of_experts(arch)}
    public = [{key: entry[key] for key in ("arch", "layout", "status", "reason", "seconds")} for entry in entries if entry["layout"] != "1"]
    for entry in public:
        entry["moe"] = entry["arch"] in moe
    (args.out / "models.json").write_text(json.dumps(sorted(public, key=lambda e: (e["arch"], e["layout"])), indent=1) + "\n")
    (args.out / "models.md").write_text(render_markdown(entries, layouts, moe, subset=bool(args.arch)))


if __name__ == "__main__":
    main()
