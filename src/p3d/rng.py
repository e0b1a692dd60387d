"""Random-number state of one process: torch (CPU and this rank's CUDA device), Python, NumPy.

Checkpoints store it per rank, so a run with dropout resumes exactly on the same layout. Each
rank's generators start from a seed derived from `train.seed`, the step and the rank; the same
derivation re-seeds a run that resumes on another layout, where saved states cannot map 1:1.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch


def derived_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"rng:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # NumPy takes seeds below 2**32


def seed_all(seed: int, step: int, rank: int) -> None:
    value = derived_seed(seed, step, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


def capture() -> dict:
    """This process's generator states, as tensors and plain values (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_state(value):
    """random.setstate needs tuples; a saved state may come back with lists."""
    version, internal, gauss = value
    return version, tuple(internal), gauss


def save(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture(), path)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)
