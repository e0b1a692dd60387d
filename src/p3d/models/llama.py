"""Llama: transformers' plan; sequence parallelism's parity is tested on it."""

from p3d.models.architecture import Architecture, register


@register
class Llama(Architecture):
    model_types = ("llama",)
    sequence_parallel_verified = True
