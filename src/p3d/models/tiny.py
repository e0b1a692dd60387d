"""A tiny random version of any architecture: its own default config with every size shrunk.

`model=tiny model.arch=<model_type>` starts from that architecture's own default config (nothing of
another preset leaks in) and shrinks the sizes it has: hidden 64, MLP 128, 2 layers, 4 heads of 16
(2 kv heads where the default groups them), a 264-token vocabulary (the byte tokenizer's 257 ids fit),
experts 4 (2 per token; DeepSeek-style: 2 groups, one dense layer first, latent ranks 32), sliding windows 16 tokens (so a 32-token test sequence exercises them),
dropout 0. Layer-type patterns keep one layer of each type (with KV sharing, Gemma 3n: one that computes
and one that reuses keys/values of each type); values given per layer follow the layer count. Fields that depend on the hidden size,
the MLP width or the head size by default (OPT's word_embed_proj_dim, Gemma's query_pre_attn_scalar)
follow them. Special-token ids the smaller vocabulary no longer holds are dropped.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from transformers import PretrainedConfig

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 2, 4, 2, 16, 264
EXPERTS, EXPERTS_PER_TOKEN, EXPERT_INTERMEDIATE, WINDOW, MAX_POSITIONS = 4, 2, 32, 16, 2048
LATENT_RANK, ROPE_HEAD_DIM = 32, 8  # multi-head latent attention (DeepSeek): kv/q compression rank, rotary share of a head

# What a few architectures need beyond the generic shrinking, to build at all or to shard over tp=2.
TINY_TWEAKS: dict[str, dict[str, Any]] = {
    # transformers' default config has no rotary parameters per layer type, which its model reads
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "falcon": {"multi_query": False},  # one shared kv head cannot be split over tp; 4 kv heads can
    "gpt_bigcode": {"multi_query": False},
    "big_bird": {"attention_type": "original_full"},  # as a decoder BigBird must attend in full (block_sparse raises)
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one global and one local layer
    "mamba2": {"num_heads": 8},
    "moshi": {"ffn_dim": 4 * INTERMEDIATE},  # its fc1 is gate|up fused: each half (256 / 2) wider than hidden, as real sizes are
    # its hybrid layers share one transformer, which transformers ties from the first to the others: two of them
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "xmod": {"default_language": "en_XX"},  # its language adapters need one (the config's first language; a user sets theirs)
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},  # num_heads * head_dim must equal hidden_size * expand
}

_EXACT = {
    "num_hidden_layers": LAYERS,
    "num_layers": LAYERS,
    "n_layer": LAYERS,
    "n_layers": LAYERS,
    "vocab_size": VOCAB,
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS_PER_TOKEN,
    "moe_topk": EXPERTS_PER_TOKEN,
    "top_k": EXPERTS_PER_TOKEN,
    "moe_intermediate_size": EXPERT_INTERMEDIATE,
    "shared_expert_intermediate_size": EXPERT_INTERMEDIATE,
    "expert_intermediate_size": EXPERT_INTERMEDIATE,
    # DeepSeek-style routing: experts in 2 groups of 2 (its router takes the top 2 of each group), the best
    # group chosen; one dense layer first, so that the second one is a mixture of experts.
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    # Multi-head latent attention: compressed q and kv, each head's rotary and non-rotary parts.
    "kv_lora_rank": LATENT_RANK,
    "q_lora_rank": LATENT_RANK,
    "qk_rope_head_dim": ROPE_HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM - ROPE_HEAD_DIM,
    "v_head_dim": HEAD_DIM,
}
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_PER_TOKEN_FIELDS = ("num_experts_per_tok", "moe_topk", "top_k")
_HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads", "encoder_attention_heads")
_KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
_LAYER_FIELDS = ("decoder_layers", "encoder_layers", "num_decoder_layers", "num_encoder_layers")
_INTERMEDIATE_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim", "d_ff", "ffn_inner_hidden_size")
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
_WINDOW_FIELDS = ("sliding_window", "attention_window", "window_size")
_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")
_SIZE_WORDS = ("size", "dim", "embd", "hidden", "inner", "width", "scalar", "d_model", "d_ff")


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    try:
        return config.get_text_config()
    except ValueError:  # several text configs (encoder-decoder audio models): the decoder's is not well defined
        return config


def _field_values(config: PretrainedConfig) -> dict[str, Any]:
    names = [f.name for f in fields(config)] if is_dataclass(config) else list(vars(config))
    values = {}
    for name in names:
        values[name] = _safe_getattr(config, name)
    return values


def _safe_getattr(config: PretrainedConfig, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except Exception:  # per-layer attributes (Gemma 4) refuse a single value
        return None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


def shrink(defaults: PretrainedConfig, keep_features: bool = False, layers: int | None = None) -> dict[str, Any]:
    """Config values that make `defaults` (an architecture's default config) tiny, as constructor kwargs.
    `keep_features`: change sizes only (the CP probe), not dropout or `is_decoder`. `layers`: the layer count
    wanted (the default 2), which a layer-type pattern follows."""
    values = _field_values(defaults)
    hidden = _safe_getattr(defaults, "hidden_size")
    heads = next((values[name] for name in _HEAD_FIELDS if _int(values.get(name))), None)
    head_dim = values.get("head_dim") if _int(values.get("head_dim")) else (hidden // heads if _int(hidden) and heads else None)
    intermediate = next((values[name] for name in _INTERMEDIATE_FIELDS if _int(values.get(name))), None)
    has_experts = any(_int(values.get(name)) for name in EXPERT_COUNT_FIELDS)
    tiny: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, PretrainedConfig):
            tiny[name] = {**_without_per_layer_values(value.to_dict(), _layer_count(_field_values(value))), **shrink(value, keep_features)}
        elif name in _EXACT and _int(value):
            tiny[name] = _EXACT[name]
        elif name in EXPERTS_PER_TOKEN_FIELDS and value is None and has_experts:
            tiny[name] = EXPERTS_PER_TOKEN  # a default of None (DeepSeek-V2) makes its router's top-k fail
        elif name in _INTERMEDIATE_FIELDS and isinstance(value, (list, tuple)) and value and all(_int(one) for one in value):
            tiny[name] = INTERMEDIATE  # one per layer (Gemma 3n): one for all layers
        elif name.startswith("vocab_size") and _int(value) and value > VOCAB:
            tiny[name] = VOCAB  # other tables over the vocabulary (Gemma 3n's per-layer input embeddings)
        elif name in _LAYER_FIELDS and _int(value):
            tiny[name] = min(value, LAYERS)
        elif name in _TOKEN_FIELDS and _int(value) and value >= VOCAB:
            tiny[name] = VOCAB - 1  # some configs insist on an int; the byte tokenizer never emits this id
        elif name in _TOKEN_FIELDS and isinstance(value, (list, tuple)) and any(_int(one) and one >= VOCAB for one in value):
            tiny[name] = sorted({one if one < VOCAB else VOCAB - 1 for one in value if _int(one)})
        elif name in _HEAD_FIELDS and _int(value):
            tiny[name] = HEADS
        elif name in _KV_HEAD_FIELDS and (value is None or _int(value)):
            tiny[name] = KV_HEADS if _int(value) and heads and value < heads else HEADS
        elif name == "head_dim" and (value is None or _int(value)):
            tiny[name] = HEAD_DIM
        elif name in _POSITION_FIELDS and _int(value):
            tiny[name] = min(value, MAX_POSITIONS)
        elif name in _WINDOW_FIELDS and _int(value) and value > 0:
            tiny[name] = min(value, WINDOW)
        elif "rotary" in name and _int(value) and head_dim:  # rotary dims cover the same share of the smaller heads
            tiny[name] = max(2, 2 * round(HEAD_DIM * value / head_dim / 2))
        elif name == "is_decoder" and value is False and not keep_features:
            tiny[name] = True  # BERT-style models are causal LMs only as decoders
        elif "drop" in name and isinstance(value, float):
            if not keep_features:
                tiny[name] = 0.0
        elif _int(value) and any(word in name for word in _SIZE_WORDS) and value > 1:
            if value == hidden:
                tiny[name] = HIDDEN
            elif value == intermediate:
                tiny[name] = INTERMEDIATE
            elif value == head_dim:
                tiny[name] = HEAD_DIM
            elif value == 2 * (intermediate or 0):
                tiny[name] = 2 * INTERMEDIATE
    if _int(hidden) and "hidden_size" in values:
        tiny.setdefault("hidden_size", HIDDEN)
    tiny.update(_layer_types(values, layers or LAYERS, getattr(defaults, "attribute_map", {}).get("layer_types", "layer_types")))
    tiny.update(TINY_TWEAKS.get(defaults.model_type, {}))
    return tiny


def _layer_types(values: dict[str, Any], layers: int, field: str = "layer_types") -> dict[str, Any]:
    """One layer of each type (in their first order, repeated), so a tiny model still has e.g. sliding and full layers.
    `field`: where the config keeps them (Zamba's `layers_block_type`, which `layer_types` maps to)."""
    layer_types = values.get(field)
    if not isinstance(layer_types, (list, tuple)) or not layer_types:
        return {}
    kinds = list(dict.fromkeys(layer_types))
    count = max(layers, len(kinds))
    shared = {}
    if _int(values.get("num_kv_shared_layers")) and values["num_kv_shared_layers"] > 0:
        # the last layers reuse the keys/values of the last earlier layer of their type (Gemma 3n): one of each
        # type computes them, one of each reuses them
        count = max(count, 2 * len(kinds))
        shared = {"num_kv_shared_layers": len(kinds)}
    chosen = (kinds * count)[:count]
    counts = {name: count for name in LAYER_COUNT_FIELDS if name in values}
    return {field: chosen, **counts, **shared}


def _layer_count(values: dict[str, Any]) -> int | None:
    return next((values[name] for name in LAYER_COUNT_FIELDS if _int(values.get(name))), None)


def _without_per_layer_values(values: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """A nested config's values less those given per layer (lists of `layers` entries, dicts keyed by layer
    index: Gemma 3n's intermediate sizes, Gemma 4's per_layer_config), which its constructor derives again
    for the smaller layer count."""
    if not layers or layers <= LAYERS:  # a layer count that does not shrink: nothing to derive again
        return values
    return {name: value for name, value in values.items() if not _per_layer(value, layers)}


def _per_layer(value: Any, layers: int) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == layers
    if isinstance(value, dict) and value:
        return all(str(key).isdigit() and int(key) < layers for key in value)
    return False


def out_of_vocabulary_token_ids(config: PretrainedConfig) -> dict[str, int]:
    """Special-token ids of the (text) config that its vocabulary does not hold."""
    text = text_config(config)
    vocab = getattr(text, "vocab_size", None)
    if not _int(vocab):
        return {}
    found = {}
    for name in _TOKEN_FIELDS:
        value = getattr(text, name, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        if any(_int(one) and not 0 <= one < vocab for one in ids):
            found[name] = value
    return found
