"""`python -m p3d.train [key=value ...]` (one process) or `torchrun ... -m p3d.train [key=value ...]`.

Compose -> validate (before any collective) -> process group -> rank 0's run.dir on every rank ->
run.dir's lock -> resume plan (checkpoints verified) -> mesh -> model -> data -> train.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from p3d.checkpoint import Checkpointer, verify_checkpoint
from p3d.config.compose import compose, to_object
from p3d.config.flags import show, split_hydra_flags
from p3d.config.schema import CPLayout, P3DConfig
from p3d.config.validate import ValidatedSetup, validate
from p3d.data import build_eval_sampler, build_sampler, cache_root, data_fingerprint
from p3d.distributed.agree import on_every_rank
from p3d.distributed.env import DistEnv, abandon, init_distributed, shutdown, world_size_from_env
from p3d.distributed.mesh import Meshes
from p3d.errors import ConfigError, RunError, exits_cleanly
from p3d.metrics import MetricsLogger, flops_per_token, peak_tflops
from p3d.models import architecture, experts_modules
from p3d.optim import build_optimizer, build_scheduler
from p3d.parallel.context import ContextParallel, SequenceSharding, uses_p3d_attention
from p3d.parallel.cp_attention import AttentionTimer
from p3d.parallel.expert import describe_experts
from p3d.parallel.parallelize import build_parallel_model
from p3d.parallel.tensor import plan_without_names
from p3d.parallel.vocab import vocabulary_weights
from p3d.resume import ResumePlan, hf_config_json, plan_resume, visible_checkpoints
from p3d.rundir import RunLock, agree_on_run_dir, make_run_dir
from p3d.trainer import Trainer

PLAN_SOURCE_WORDS = {
    "model.tp_plan": "from model.tp_plan",
    "p3d": "p3d's for this model type",
    "transformers": "transformers' own",
    "inferred": "inferred from the modules",
}

USAGE = """usage: python -m p3d.train [--config-dir DIR] [key=value ...]
       torchrun --nproc_per_node=N -m p3d.train [--config-dir DIR] [key=value ...]
       p3d train [--nproc-per-node N] [--config-dir DIR] [-m] [key=value ...]
       (--cfg job|all|hydra [--resolve] [--package KEY], --info, --help: print and exit)

Pick presets with group=name (model=tiny_opt parallel=tp2dp2cp2 +recipe=tiny_llama_3d) and
override any key with group.key=value (train.steps=100 model.config.num_hidden_layers=4).
`p3d ls` lists presets; docs/config.md lists every key."""


@exits_cleanly
def main(argv: Sequence[str] | None = None) -> None:
    flags, overrides = split_hydra_flags(list(sys.argv[1:] if argv is None else argv))
    if flags.multirun:
        raise ConfigError("-m/--multirun: python -m p3d.train runs one job (under torchrun too); sweep with `p3d train -m ...`")
    if flags.prints_and_exits:
        show(flags, overrides, USAGE)
        return
    cfg = compose(overrides, flags.config_dirs)
    config = to_object(cfg)
    setup = validate(config, world_size_from_env())
    env = init_distributed(config.dist)
    lock = None
    try:
        try:
            run_dir = agree_on_run_dir(cfg, config)
            lock = claim_run_dir(run_dir, env)
            resume_plan = plan_resume_on_every_rank(config, setup)
            meshes = Meshes(setup.dims, env.device.type)
            train(cfg, config, setup, resume_plan, env, meshes)
        except BaseException:
            abandon()
            raise
        shutdown(meshes.world)
    finally:
        if lock is not None:
            lock.release()


def claim_run_dir(run_dir: Path, env: DistEnv) -> RunLock:
    """Rank 0 creates run.dir and takes its lock; every rank stops if it cannot."""
    lock = RunLock(run_dir)

    def claim() -> None:
        if env.is_main:
            make_run_dir(run_dir)
            lock.acquire(notice=lambda text: print(f"p3d: {text}", flush=True))

    on_every_rank(claim, "taking run.dir's lock")
    return lock


def plan_resume_on_every_rank(config: P3DConfig, setup: ValidatedSetup) -> ResumePlan:
    """Every rank must see the same checkpoints (run.dir on storage that all nodes share); then they
    plan together, sharing the checksum reading, and agree on the plan or fail together."""
    views = on_every_rank(lambda: visible_checkpoints(config), "listing the checkpoints")
    differing = next((rank for rank, view in enumerate(views) if view != views[0]), None)
    if differing is not None:
        raise RunError(
            f"run.dir={config.run.dir}: ranks see different checkpoints (rank 0: {_describe_view(views[0])}; rank {differing}: "
            f"{_describe_view(views[differing])}); run.dir and checkpoint.load_from must be on a filesystem that every node shares"
        )
    shared = functools.partial(verify_checkpoint, shared=True)
    (plan, *_) = on_every_rank(lambda: plan_resume(config, setup.hf_config, verify=shared), "planning the resume")
    return plan


def _describe_view(view: tuple) -> str:
    own, load_from = view
    text = f"complete checkpoints [{', '.join(own)}]"
    return text if load_from is None else f"{text}, checkpoint.load_from {'complete' if load_from else 'not complete'}"


def prepare_run_dir(cfg: DictConfig, env: DistEnv) -> Path:
    """Rank 0 writes the resolved config into the run directory (which it created and holds)."""
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    dist.barrier()
    return run_dir


def train(cfg: DictConfig, config: P3DConfig, setup: ValidatedSetup, resume_plan: ResumePlan, env: DistEnv, meshes: Meshes) -> None:
    run_dir = prepare_run_dir(cfg, env)
    metrics = MetricsLogger(run_dir, env.is_main, config.logging, config.train.steps, OmegaConf.to_container(cfg, resolve=True))
    metrics.info(f"{config.model.name} ({setup.hf_config.model_type}) on {setup.dims.describe()}, run dir {run_dir}")
    if uses_p3d_attention(setup.dims.cp, config.data.packing):
        metrics.info(f"context-parallel attention: {architecture(setup.hf_config).attention_route(setup.hf_config).describe(setup.cp_impl)}")
    model = build_parallel_model(config, setup.hf_config, setup.tp_plan, meshes, env.device)
    names = {module: name for name, module in model.named_modules()}
    vocabulary = [names[module] for modules in vocabulary_weights(model) for module in modules]
    if setup.dims.tp > 1:
        applied = plan_without_names(setup.tp_plan, vocabulary)
        metrics.info(f"tensor-parallel plan ({PLAN_SOURCE_WORDS[setup.plan_source]}): " + ", ".join(f"{pattern} {style}" for pattern, style in applied.items()))
    if vocabulary:
        metrics.info(f"vocabulary-parallel over all {setup.dims.world_size} ranks (never gathered): {', '.join(vocabulary)}")
    experts = [module for _, module in experts_modules(model)]
    if experts:
        metrics.info(describe_experts(experts, setup.dims.ep, setup.dims.tp))
    fingerprint = data_fingerprint(config.data)  # of the files as they are when loaded just below
    cache_dir = cache_root(config.data, config.run.root)
    sampler = build_sampler(
        config.data, config.model, config.train.seed, config.train.global_batch_size, config.train.micro_batch_size,
        setup.dims.dp, meshes.dp.get_local_rank(), cache_dir=cache_dir, info=metrics.info,
    )
    eval_sampler = None
    if config.eval.every > 0:
        eval_sampler = build_eval_sampler(
            config.data, config.model, config.train.global_batch_size, config.train.micro_batch_size, setup.dims.dp,
            meshes.dp.get_local_rank(), cache_dir=cache_dir, info=metrics.info,
        )
    optimizer = build_optimizer(model, config.optim, config.train.seed)
    trainer = Trainer(
        config=config,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.optim, config.train.steps),
        sampler=sampler,
        meshes=meshes,
        context_parallel=_context_parallel(config, setup, meshes, env),
        device=env.device,
        metrics=metrics,
        checkpointer=Checkpointer(
            run_dir,
            config.checkpoint,
            env.is_main,
            setup.dims,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            hf_config_json=hf_config_json(setup.hf_config),
            info=metrics.info,
            data_fingerprint=fingerprint,
        ),
        flops_per_token=flops_per_token(model, setup.hf_config, config.data.seq_len),
        peak_tflops=peak_tflops(env.device, config.logging.peak_tflops),
        eval_sampler=eval_sampler,
    )
    trainer.resume(resume_plan)
    trainer.fit()


def _context_parallel(config: P3DConfig, setup: ValidatedSetup, meshes: Meshes, env: DistEnv) -> ContextParallel | None:
    cp = meshes.dims.cp
    if not uses_p3d_attention(cp, config.data.packing):
        return None
    layout = config.parallel.cp_layout if cp > 1 else CPLayout.contiguous  # one rank: nothing to balance
    timer = AttentionTimer(config.logging.attention_timing, env.device)
    return ContextParallel(meshes.cp, SequenceSharding(cp, layout), setup.cp_impl, timer)


if __name__ == "__main__":
    main()
