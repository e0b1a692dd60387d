"""BLOOM: its ALiBi bias (per head, linear in the key's position) is built by the model from the positions
it holds, so under CP's whole_sequence route it is rebuilt for the whole sequence, as the model builds it
without a padding mask."""

import torch

from p3d import compat
from p3d.models.architecture import Architecture, register


def _whole_sequence_alibi(attention, local: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[batch x heads, 1, keys]: slope(head) x key position over the whole sequence."""
    heads = attention.num_heads
    slopes = compat.bloom_alibi_slopes(heads, local.device)
    alibi = slopes[:, None, None] * torch.arange(seq_len, device=local.device)
    return alibi.repeat(local.shape[0] // heads, 1, 1).to(local.dtype)


@register
class Bloom(Architecture):
    model_types = ("bloom",)
    whole_sequence_arguments = {"alibi": _whole_sequence_alibi}
