"""XLM: its layers are not blocks but parallel lists (`attentions`, `ffns`, and their norms), so the
inferred plan, which looks for attention and MLP inside one block, finds neither; this is its plan.
The head (`pred_layer.proj`) is tied to the input embedding: both split over the vocabulary."""

from p3d.models.architecture import Architecture, register


@register
class XLM(Architecture):
    model_types = ("xlm",)
    tp_plan = {
        **{f"transformer.attentions.*.{projection}": "colwise" for projection in ("q_lin", "k_lin", "v_lin")},
        "transformer.attentions.*.out_lin": "rowwise",
        "transformer.ffns.*.lin1": "colwise",
        "transformer.ffns.*.lin2": "rowwise",
        "pred_layer.proj": "colwise_gather_output",
        "transformer.embeddings": "embedding_rowwise",
    }
