"""Tokenizers: UTF-8 bytes (no files needed) or a transformers tokenizer.

Each one encodes texts to id arrays, encodes a text whose character spans are marked as targets
(chat data: the assistant's turns), and names its identity, which keys the token cache: another
tokenizer never reads a cache built by this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import xxhash

from p3d.config.schema import DataConfig, InitMode, ModelConfig
from p3d.errors import ConfigError

# Files one of which a local directory needs to hold a tokenizer (a checkpoint may carry none).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

Spans = Sequence[tuple[int, int]]  # [start, end) character ranges of a text


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    chat_template: str | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def encode_marked(self, texts: Sequence[str], spans: Sequence[Spans]) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def identity(self) -> dict: ...


def _in_spans(starts: np.ndarray, spans: Spans) -> np.ndarray:
    """Which of the positions `starts` fall inside one of the sorted, disjoint [start, end) spans."""
    if not spans:
        return np.zeros(len(starts), dtype=bool)
    lows = np.asarray([low for low, _ in spans])
    highs = np.asarray([high for _, high in spans])
    index = np.searchsorted(lows, starts, side="right") - 1
    return (index >= 0) & (starts < highs[np.maximum(index, 0)])


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255) and one end-of-document id (256); needs no files."""

    vocab_size = 257
    eos_token_id = 256
    chat_template = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def encode_marked(self, texts: Sequence[str], spans: Sequence[Spans]) -> list[tuple[np.ndarray, np.ndarray]]:
        encoded = []
        for text, marked in zip(texts, spans):
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            byte_spans = [(len(text[:low].encode("utf-8")), len(text[:high].encode("utf-8"))) for low, high in marked]
            encoded.append((ids, _in_spans(np.arange(len(ids)), byte_spans)))
        return encoded

    def identity(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id}


class HFTokenizer:
    """A transformers tokenizer (the model's own, or one named by data.tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos_token_id = eos if eos is not None else 0

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def encode_marked(self, texts: Sequence[str], spans: Sequence[Spans]) -> list[tuple[np.ndarray, np.ndarray]]:
        """A token is a target when its first character lies in a marked span (needs a fast tokenizer's offsets)."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(
                f"data.tokenizer: {type(self.tokenizer).__name__} is a slow tokenizer without character offsets, which "
                f"data.format=chat needs to find the assistant's tokens; use a fast (tokenizers-backed) tokenizer"
            )
        encoded = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        results = []
        for ids, offsets, marked in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
            starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
            results.append((np.asarray(ids, dtype=np.int64), _in_spans(starts, marked)))
        return results

    def identity(self) -> dict:
        """Name, class, size, special ids and a hash of the whole vocabulary and its rules."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            contents = backend.to_str()
        else:
            contents = repr(sorted(self.tokenizer.get_vocab().items()))
        return {
            "kind": "hf",
            "name": getattr(self.tokenizer, "name_or_path", ""),
            "class": type(self.tokenizer).__name__,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "xxh3_128": xxhash.xxh3_128(contents.encode()).hexdigest(),
            "chat_template_xxh3_128": xxhash.xxh3_128(self.chat_template.encode()).hexdigest() if self.chat_template else None,
        }


def build_tokenizer(data_cfg: DataConfig, model_cfg: ModelConfig) -> Tokenizer:
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "auto":
        if model_cfg.init is InitMode.pretrained and model_cfg.pretrained:
            return _load_hf_tokenizer(model_cfg.pretrained, key="model.pretrained", required=False) or ByteTokenizer()
        return ByteTokenizer()
    return _load_hf_tokenizer(data_cfg.tokenizer, key="data.tokenizer", required=True)


def _load_hf_tokenizer(source: str, key: str, required: bool):
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    try:
        if local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
            raise OSError(f"no tokenizer files in {local}")
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(local) if local.exists() else source))
        if tokenizer.vocab_size < 2:
            # transformers 5.23 builds an empty tokenizer from a bare OPT config.json rather than failing
            raise ValueError(f"the tokenizer found has a vocabulary of {tokenizer.vocab_size}")
        return tokenizer
    except (OSError, ValueError, TypeError) as error:
        if not required:
            return None
        raise ConfigError(f"{key}={source}: cannot load a tokenizer ({str(error).splitlines()[0]}); use data.tokenizer=byte or a local dir") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
