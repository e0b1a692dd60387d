"""Under `accelerate launch`: errors name accelerate's flags, and accelerate's own settings (which p3d would ignore) are refused."""

from __future__ import annotations

import pytest

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.distributed.env import ACCELERATE_SETTINGS, accelerate_problems, launch_example


def test_the_launch_example_speaks_the_launchers_words(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launch_example(4) == "torchrun --nproc_per_node=4"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what every `accelerate launch` sets
    assert launch_example(4).startswith("accelerate launch --multi_gpu --num_processes=4")


@pytest.mark.parametrize(
    "variable, value, words",
    [
        ("ACCELERATE_MIXED_PRECISION", "bf16", "accelerate launch --mixed_precision bf16: p3d does not use accelerate's settings"),
        ("ACCELERATE_MIXED_PRECISION", "fp8", "--mixed_precision fp8"),
        ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "--dynamo_backend INDUCTOR: p3d does not use accelerate's settings; drop it (or set it off in `accelerate config`) and use train.compile=true"),
        ("ACCELERATE_USE_FSDP", "true", "accelerate launch --use_fsdp: p3d does not"),
        ("ACCELERATE_USE_DEEPSPEED", "true", "accelerate launch --use_deepspeed: p3d does not"),
    ],
)
def test_accelerate_settings_that_p3d_would_ignore_are_refused(monkeypatch, variable, value, words):
    for name, *_ in ACCELERATE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    (problem,) = accelerate_problems()
    assert words in problem


def test_accelerate_launch_with_its_settings_off_passes(monkeypatch):
    for name, value in {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "True"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert accelerate_problems() == []
    validate(to_object(compose(["model=tiny_llama"])), 1)  # and the whole config validates under it
