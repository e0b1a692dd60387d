"""Qwen3-MoE: its config class has no `head_dim` field, but its attention reads one (`getattr(config,
"head_dim", hidden_size // heads)`), and Qwen3-30B-A3B's config.json sets it (128, not 2048 / 32)."""

from p3d.models.architecture import Architecture, register


@register
class Qwen3Moe(Architecture):
    model_types = ("qwen3_moe",)
    extra_config_fields = ("head_dim",)
