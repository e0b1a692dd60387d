"""What p3d needs to know about one model type, answered generically from transformers.

The generic `Architecture` covers any Hugging Face causal LM: its decoder blocks, its tensor-parallel
plan (p3d's own for the type, else transformers' `_tp_plan`, else one inferred from the module
structure), the module attributes that hold head counts, what its attention needs under context
parallelism (probed on its tiny copy, probe.py), and the checkpoint keys
that are buffers the model recomputes.
A model type that needs more (a plan of p3d's own, another attribute, a sequence-parallel check)
subclasses it in a small file of this package and registers there; tiny-config tweaks are in tiny.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

from torch import nn
from transformers import PretrainedConfig

from p3d.models import infer
from p3d.models.tiny import EXPERT_COUNT_FIELDS, EXPERTS_PER_TOKEN_FIELDS
from p3d.parallel.context import AttentionRoute
from p3d.parallel.expert import expert_count, experts_problems
from p3d.parallel.tensor import check_plan, match_plan

# Attention modules that keep their head counts as attributes and reshape with them (OPT's
# `view(bsz, -1, self.num_heads, head_dim)`) must see the tp-local counts, or the reshape silently
# mixes sequence and heads.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_heads", "n_head", "n_kv_heads")
# Widths such modules reshape their output with (XGLM's and MVP's `reshape(bsz, tgt_len, self.embed_dim)`):
# tp-local only where the width is that of the heads (head count x head_dim), not the model's.
HEAD_WIDTH_ATTRIBUTES = ("embed_dim",)

# Buffers some checkpoints carry that the model recomputes (rotary frequencies, position ids, masks).
RECOMPUTED_CHECKPOINT_KEYS = ("rotary_emb.inv_freq", ".position_ids", ".masked_bias", ".attn.bias")

PLAN_SOURCES = ("model.tp_plan", "p3d", "transformers", "inferred")


@dataclass(frozen=True)
class PlanChoice:
    """A tensor-parallel plan {module pattern: style} and where it comes from (one of PLAN_SOURCES)."""

    plan: dict[str, str]
    source: str
    problem: str | None = None  # why no plan could be found (then `plan` is empty)


class Architecture:
    """The generic answers; subclasses override what their model type does differently."""

    model_types: ClassVar[tuple[str, ...]] = ()  # the model types a subclass describes
    tp_plan: ClassVar[Mapping[str, str] | None] = None  # a plan p3d ships (module patterns of the causal-LM model)
    localised_attributes: ClassVar[tuple[str, ...]] = HEAD_COUNT_ATTRIBUTES
    localised_widths: ClassVar[tuple[str, ...]] = HEAD_WIDTH_ATTRIBUTES
    sequence_parallel_verified: ClassVar[bool] = False  # loss parity with parallel.sequence_parallel=true is tested
    extra_config_fields: ClassVar[tuple[str, ...]] = ()  # fields the modeling code reads that its config class lacks
    # the attention's arguments that CP's whole_sequence route rebuilds for the whole sequence: {name: rebuild}
    whole_sequence_arguments: ClassVar[Mapping[str, Callable]] = {}

    def __init__(self, model_type: str):
        self.model_type = model_type

    # ---- structure -------------------------------------------------------------------------
    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated transformer blocks: the `_no_split_modules` classes that are entries of a ModuleList,
        else the entries of the longest ModuleList of one class (models that list no such classes)."""
        block_classes = set(getattr(model, "_no_split_modules", None) or ())
        blocks = []
        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                blocks += [child for child in module if type(child).__name__ in block_classes]
        if blocks:
            return blocks
        uniform = [list(module) for module in model.modules() if isinstance(module, nn.ModuleList) and len({type(child) for child in module}) == 1]
        return max(uniform, key=len, default=[])

    def experts_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The mixture-of-experts layers' fused experts modules (3-D weights, one slice per expert; called as
        experts(hidden_states, top_k_index, top_k_weights) after the model's own router), by name."""
        return [(name, module) for name, module in model.named_modules() if expert_count(module) is not None]

    def active_expert_share(self, config: PretrainedConfig) -> float:
        """The share of a layer's experts each token runs through (experts per token / experts)."""
        text = config.get_text_config()
        experts = next((value for name in EXPERT_COUNT_FIELDS if isinstance(value := getattr(text, name, None), int)), None)
        per_token = next((value for name in EXPERTS_PER_TOKEN_FIELDS if isinstance(value := getattr(text, name, None), int)), None)
        return per_token / experts if experts and per_token else 1.0

    def expert_parallel_problems(self, model: nn.Module, ep: int) -> list[str]:
        """Why the experts cannot be split over `ep` ranks (empty if they can)."""
        if ep == 1:
            return []
        found = self.experts_modules(model)
        if not found:
            return [f"parallel.ep={ep}: model.arch={self.model_type} has no mixture-of-experts layers p3d can split (fused experts modules); use parallel.ep=1"]
        name, module = found[0]
        return experts_problems(name, module, ep, f"parallel.ep={ep}")

    def norms(self, block: nn.Module) -> list[str]:
        """Names (inside the block) of its normalisation layers, which sequence parallelism runs per token."""
        return [name for name, module in block.named_modules() if type(module).__name__.endswith(("LayerNorm", "RMSNorm"))]

    # ---- tensor parallelism ------------------------------------------------------------------
    def plan(self, model: nn.Module) -> PlanChoice:
        """The plan p3d ships for this type, else transformers' own, else one inferred from the modules."""
        if self.tp_plan:
            return PlanChoice(dict(self.tp_plan), "p3d")
        own = dict(getattr(model, "_tp_plan", None) or {})
        if own:
            return PlanChoice(_with_tied_embedding(_entries_for_this_variant(own, model), model), "transformers")
        inferred = infer.infer_plan(model, self.decoder_blocks(model))
        return PlanChoice(inferred.plan, "inferred", inferred.problem)

    def tensor_parallel_problems(self, model: nn.Module, choice: PlanChoice, plan: dict[str, str], tp: int) -> list[str]:
        """Why `plan` cannot shard `model` exactly over `tp` ranks (empty if it can)."""
        if tp == 1:
            return []
        if not plan:
            why = choice.problem or f"{type(model).__name__} has no tensor-parallel plan"
            return [f"model.tp_plan: {why}; give one in the model YAML (module pattern: style)"]
        return self.head_problems(model.config, tp) + check_plan(plan, model, tp)

    def head_problems(self, config: PretrainedConfig, tp: int) -> list[str]:
        text = config.get_text_config()
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        problems = []
        if isinstance(heads, int) and heads % tp:
            problems.append(f"parallel.tp={tp} does not divide model.config.num_attention_heads={heads}: choose a tp that divides it")
        if isinstance(kv_heads, int) and kv_heads != heads and kv_heads % tp:
            problems.append(f"parallel.tp={tp} does not divide model.config.num_key_value_heads={kv_heads}: choose a tp that divides it")
        return problems

    def position_problems(self, config: PretrainedConfig, seq_len: int) -> list[str]:
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if isinstance(limit, int) and 0 < limit < seq_len:  # XLNet's -1: no limit
            return [f"data.seq_len={seq_len} exceeds model.config.max_position_embeddings={limit}"]
        return []

    def sequence_parallel_problems(self, config: PretrainedConfig) -> list[str]:
        """Why sequence parallelism cannot be exact for this config (empty if it can)."""
        if not self.sequence_parallel_verified:
            verified = ", ".join(sorted(t for arch in REGISTRY.values() if arch.sequence_parallel_verified for t in arch.model_types))
            return [
                f"parallel.sequence_parallel=true: not verified for model type '{self.model_type}' "
                f"(verified: {verified}); set parallel.sequence_parallel=false"
            ]
        return []

    # ---- context parallelism ---------------------------------------------------------------
    def context_parallel_problems(self, config: PretrainedConfig, why: str, fix: str, with_documents: bool) -> list[str]:
        """Why p3d's attention (under `why`: CP or packed documents) would not give this model's results."""
        from p3d.models import probe

        return probe.context_parallel_problems(config, why, fix, with_documents)

    def attention_route(self, config: PretrainedConfig) -> AttentionRoute:
        """How CP runs the model's attention: p3d's through the interface, its SDPA call or `_attn` method, or the
        model's own code with the keys or the whole sequence gathered (found by probe.py)."""
        from p3d.models import probe

        found = probe.probe(config, with_documents=False)
        return AttentionRoute(found.route, found.causal_by_mask, dict(found.token_arguments), dict(self.whole_sequence_arguments))

    def self_attentions(self, model: nn.Module) -> list[infer.SelfAttention]:
        """Each block's self-attention module (with its key and value projections where they are separate), for
        the routes of context parallelism that keep the model's own attention; blocks without one are left out."""
        return [found for block in self.decoder_blocks(model) if (found := infer.self_attention(block)) is not None]

    def attention_is_plain_causal(self, config: PretrainedConfig) -> bool:
        from p3d.models import probe

        return probe.probe(config, with_documents=False).plain_causal

    # ---- checkpoints -------------------------------------------------------------------------
    def is_recomputed_checkpoint_key(self, key: str) -> bool:
        """Whether a checkpoint tensor the model has no parameter for is a buffer it recomputes."""
        return key.endswith(RECOMPUTED_CHECKPOINT_KEYS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"


def _entries_for_this_variant(plan: dict[str, str], model: nn.Module) -> dict[str, str]:
    """transformers' plan covers every variant of the architecture (DeepSeek-V2's q_proj without a query
    compression, q_b_proj with one): keep the entries that name a module or parameter of this model."""
    return {pattern: style for pattern, style in plan.items() if match_plan({pattern: style}, model) or match_plan({pattern: style}, model, parameters=True)}


def _with_tied_embedding(plan: dict[str, str], model: nn.Module) -> dict[str, str]:
    """transformers' plan may shard a tied head over the vocabulary and leave the input embedding out (LFM2):
    the tie needs that embedding sharded over the vocabulary too (as p3d's inferred plans do)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return plan
    names = {module: name for name, module in model.named_modules()}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    matched = match_plan(plan, model)
    head_sharded = head is not None and matched.get(names.get(head)) in ("colwise", "colwise_gather_output")
    if head_sharded and isinstance(embedding, nn.Embedding) and names.get(embedding) not in matched:
        return {**plan, names[embedding]: "embedding_rowwise"}
    return plan


REGISTRY: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: `cls` describes its `model_types`."""
    for model_type in cls.model_types:
        REGISTRY[model_type] = cls(model_type)
    return cls


def architecture(config_or_type: PretrainedConfig | str) -> Architecture:
    """What p3d knows about this model type (the generic answers unless a file here says more)."""
    if isinstance(config_or_type, str):
        model_type = config_or_type
    else:
        model_type = config_or_type.model_type
    return REGISTRY.get(model_type) or Architecture(model_type)
