"""GIT: a text decoder (`git.encoder.layer`) beside an image encoder whose layers p3d must not take for it.

Its causal-LM forward without pixel values runs the text layers only; both lists have the same length,
so the generic choice (the longest list of one class) cannot tell them apart.
"""

from torch import nn

from p3d.models.architecture import Architecture, register


@register
class Git(Architecture):
    model_types = ("git",)

    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.git.encoder.layer)
