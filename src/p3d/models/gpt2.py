"""GPT-2: transformers ships no tensor-parallel plan; its linears are Conv1D ([in, out] weights).

The attention's `c_attn` computes [q | k | v] in one projection: packed in 3 parts, so each rank
gets its heads of all three, and the attention splits them with `split_size`, which is tp-local
like the head count.
"""

from p3d.models.architecture import HEAD_COUNT_ATTRIBUTES, Architecture, register


@register
class GPT2(Architecture):
    model_types = ("gpt2",)
    tp_plan = {
        "transformer.wte": "embedding_rowwise",
        "transformer.h.*.attn.c_attn": "packed_colwise:3",
        "transformer.h.*.attn.c_proj": "rowwise",
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
        "lm_head": "colwise_gather_output",
    }
    localised_attributes = HEAD_COUNT_ATTRIBUTES + ("split_size",)
