"""The coverage sweep's counting (benchmarks/model_coverage.py): which types are mixtures of experts, which the
dense share of the results leaves out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "model_coverage.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("model_coverage", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experts_are_found_in_nested_configs_too():
    sweep = _sweep()
    assert sweep.is_mixture_of_experts("dbrx")  # its expert count sits in ffn_config
    assert sweep.is_mixture_of_experts("mixtral") and not sweep.is_mixture_of_experts("llama")
