"""Out-of-memory recovery: the token budget is halved and the part retried, with the same results."""

import numpy as np
import pytest
import torch

from virnuc_ds.pipeline.embed_part import MIN_TOKS_PER_BATCH, embed_stage


class FlakyEmbedder:
    """Raises CUDA's out-of-memory error while its budget is above `fits`, like a too-large batch."""

    def __init__(self, fits: int, toks_per_batch: int = 65536):
        self.fits, self.toks_per_batch, self.calls = fits, toks_per_batch, 0

    def embed(self, sequences):
        self.calls += 1
        if self.toks_per_batch > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return torch.tensor([[float(len(s)), 1.0] for s in sequences])


def test_out_of_memory_halves_the_budget_until_it_fits():
    emb = FlakyEmbedder(fits=10000)
    rows, failures = embed_stage(emb, "esm2", ["a", "b"], ["MK", "MKV"], frozenset(), 2)
    np.testing.assert_array_equal(rows, [[2, 1], [3, 1]])
    assert failures == [] and emb.toks_per_batch == 8192 and emb.calls == 4


def test_out_of_memory_at_the_smallest_budget_is_raised_not_hidden():
    emb = FlakyEmbedder(fits=10, toks_per_batch=4096)
    with pytest.raises(torch.OutOfMemoryError):
        embed_stage(emb, "esm2", ["a"], ["MK"], frozenset(), 2)
    assert emb.toks_per_batch == MIN_TOKS_PER_BATCH
