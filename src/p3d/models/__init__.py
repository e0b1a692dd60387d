"""The one place that knows architectures: everything else asks `architecture(config)`.

`architecture.py` answers generically from transformers (decoder blocks, its own TP plan, head-count
attributes); `infer.py` finds a TP plan in the module structure of models that ship none; `tiny.py`
shrinks any architecture's config; `probe.py` finds what a model's attention needs under context
parallelism by running its tiny version once. A model type that needs more has a small file here
(`gpt2.py`: Conv1D weights and a fused q|k|v projection; `opt.py`: post-norm blocks; `bloom.py`: its
ALiBi under CP; `git.py`: which layers are the decoder; `trocr.py`: an attention that reshapes by its
input width; `xlm.py`: layers kept in parallel lists; `xmod.py`: per-language adapters).
"""

from p3d.models import bloom, git, gpt2, llama, opt, qwen3_moe, trocr, xlm, xmod  # noqa: F401  (each registers its model types)
from p3d.models.architecture import PLAN_SOURCES, Architecture, PlanChoice, architecture


def decoder_blocks(model) -> list:
    """The model's repeated transformer blocks (FSDP units, activation checkpointing, sequence parallelism)."""
    return architecture(model.config).decoder_blocks(model)


def experts_modules(model) -> list:
    """The model's fused experts modules as (name, module) (expert parallelism, FSDP units, expert load)."""
    return architecture(model.config).experts_modules(model)


__all__ = ["PLAN_SOURCES", "Architecture", "PlanChoice", "architecture", "decoder_blocks", "experts_modules"]
