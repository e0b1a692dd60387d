"""X-MOD: a RoBERTa whose blocks end in per-language adapters (small MLPs on the whole hidden state, after
the block's output projection), which the inferred plan cannot tell from the block's MLP. Its plan is
RoBERTa's (the attention gathered: its output module holds a norm); the adapters stay whole on every rank."""

from p3d.models.architecture import Architecture, register

_LAYERS = "roberta.encoder.layer.*"


@register
class Xmod(Architecture):
    model_types = ("xmod",)
    tp_plan = {
        **{f"{_LAYERS}.attention.self.{projection}": "colwise_gather_output" for projection in ("query", "key", "value")},
        f"{_LAYERS}.attention.output.dense": "rowwise_split_input",
        f"{_LAYERS}.intermediate.dense": "colwise",
        f"{_LAYERS}.output.dense": "rowwise",
        "lm_head.decoder": "colwise_gather_output",
        "roberta.embeddings.word_embeddings": "embedding_rowwise",
    }
