"""OPT: its plan is inferred from its modules; sequence parallelism needs its pre-norm variant."""

from p3d.models.architecture import Architecture, register


@register
class OPT(Architecture):
    model_types = ("opt",)
    sequence_parallel_verified = True

    def sequence_parallel_problems(self, config) -> list[str]:
        if getattr(config.get_text_config(), "do_layer_norm_before", True) is False:
            return ["parallel.sequence_parallel=true needs pre-norm blocks (model.config.do_layer_norm_before=false is post-norm); set it to false"]
        return super().sequence_parallel_problems(config)
