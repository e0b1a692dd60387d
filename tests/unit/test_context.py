"""Sequence sharding for context parallelism."""

from __future__ import annotations

import pytest
import torch

from p3d.config.schema import CPLayout
from p3d.parallel.context import SequenceSharding


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", list(CPLayout))
def test_ranks_partition_the_sequence(cp, layout):
    sharding = SequenceSharding(cp, layout)
    gathered = sharding.gathered_token_indices(64)
    assert sorted(gathered.tolist()) == list(range(64))


def test_balanced_rank_holds_chunks_i_and_mirror():
    sharding = SequenceSharding(4, CPLayout.balanced)
    assert sharding.token_indices(0, 16).tolist() == [0, 1, 14, 15]
    assert sharding.token_indices(1, 16).tolist() == [2, 3, 12, 13]
    assert sharding.token_indices(3, 16).tolist() == [6, 7, 8, 9]


def test_balanced_sharding_evens_out_causal_work():
    """Causal work of a token is its position + 1; balanced ranks do equal work, contiguous do not."""

    def work(layout):
        sharding = SequenceSharding(4, layout)
        return [int((sharding.token_indices(r, 64) + 1).sum()) for r in range(4)]

    assert len(set(work(CPLayout.balanced))) == 1
    contiguous = work(CPLayout.contiguous)
    assert contiguous[-1] > 3 * contiguous[0]


def test_contiguous_rank_holds_one_chunk():
    assert SequenceSharding(2, CPLayout.contiguous).token_indices(1, 8).tolist() == [4, 5, 6, 7]
    assert torch.equal(SequenceSharding(1, CPLayout.balanced).token_indices(0, 8), torch.arange(8))
