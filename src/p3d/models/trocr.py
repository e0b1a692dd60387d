"""TrOCR's decoder: its attention reshapes its output with the width of its input (a local variable, not an
attribute p3d could make tp-local), so under tensor parallelism the attention is gathered (each rank all
heads: exact, not split) and the MLP and head are split as the inferred plan would."""

from p3d.models.architecture import Architecture, register

_LAYERS = "model.decoder.layers.*"


@register
class TrOCR(Architecture):
    model_types = ("trocr",)
    tp_plan = {
        **{f"{_LAYERS}.{attention}.{projection}": "colwise_gather_output" for attention in ("self_attn", "encoder_attn") for projection in ("q_proj", "k_proj", "v_proj")},
        **{f"{_LAYERS}.{attention}.out_proj": "rowwise_split_input" for attention in ("self_attn", "encoder_attn")},
        f"{_LAYERS}.fc1": "colwise",
        f"{_LAYERS}.fc2": "rowwise",
        "output_projection": "colwise_gather_output",
        "model.decoder.embed_tokens": "embedding_rowwise",
    }
