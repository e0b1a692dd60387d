"""Which tokens of a sequence each context-parallel rank holds.

The sequence is cut into equal chunks. Balanced: 2*cp chunks, rank i holds chunks i and
2*cp-1-i, so every rank has the same share of causal work (an early chunk attends to few
keys, its mirror to many). Contiguous: cp chunks, rank i holds chunk i, and the last rank does
most of the work. Tokens keep their global index: inputs, labels, positions and document ids
are all taken through the same permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p3d.config.schema import CPLayout


@dataclass(frozen=True)
class ChunkRange:
    """A run of consecutive tokens held by one rank."""

    global_start: int  # index of its first token in the whole sequence
    local_start: int  # index of its first token among the rank's own tokens
    length: int


@dataclass(frozen=True)
class SequenceSharding:
    cp: int
    layout: CPLayout

    @property
    def chunks(self) -> int:
        return 2 * self.cp if self.layout is CPLayout.balanced else self.cp

    def chunk_ids(self, cp_rank: int) -> list[int]:
        return [cp_rank, 2 * self.cp - 1 - cp_rank] if self.layout is CPLayout.balanced else [cp_rank]

    def chunk_ranges(self, cp_rank: int, seq_len: int) -> list[ChunkRange]:
        """The rank's tokens as runs of consecutive global indices, in the order the rank stores them."""
        size = seq_len // self.chunks
        return [ChunkRange(chunk * size, slot * size, size) for slot, chunk in enumerate(self.chunk_ids(cp_rank))]

    def token_indices(self, cp_rank: int, seq_len: int) -> torch.Tensor:
        """Global indices of the tokens held by `cp_rank`, in the order the rank stores them."""
        runs = self.chunk_ranges(cp_rank, seq_len)
        return torch.cat([torch.arange(run.global_start, run.global_start + run.length) for run in runs])

    def gathered_token_indices(self, seq_len: int) -> torch.Tensor:
        """Global indices in all-gather order (rank 0's tokens, then rank 1's, ...)."""
        return torch.cat([self.token_indices(rank, seq_len) for rank in range(self.cp)])
