"""Merged domains: offsets keep items apart, sequences stay in their domain, batches mix domains."""

from __future__ import annotations

import numpy as np
import torch

from unisrec_x.data.domain import Domain
from unisrec_x.data.multidomain import merge_domains
from unisrec_x.data.sequences import LengthBucketBatchSampler, SequenceExamples


def _domain(name, n_items, seqs):
    return Domain(name, [f"{name}{i}" for i in range(n_items)], [f"text {name} {i}" for i in range(n_items)],
                  [f"u{i}" for i in range(len(seqs))], [np.array(s) for s in seqs])


def test_offsets_and_item_domain():
    a = _domain("a", 3, [[1, 2, 3], [3, 2, 1, 2]])
    b = _domain("b", 4, [[4, 1, 2, 3, 4]])
    merged = merge_domains([a, b])
    assert merged.num_items == 7 and merged.offsets.tolist() == [0, 3]
    assert merged.sequences[2].tolist() == [7, 4, 5, 6, 7]
    assert merged.item_domain.tolist() == [-1, 0, 0, 0, 1, 1, 1, 1]
    for seq, d in zip(merged.sequences, merged.sequence_domain):  # a sequence never leaves its domain
        assert set(merged.item_domain[seq]) == {d}


def test_batches_mix_domains_and_carry_domain_index():
    rng = np.random.default_rng(0)
    a = _domain("a", 50, [rng.integers(1, 51, 8) for _ in range(200)])
    b = _domain("b", 60, [rng.integers(1, 61, 8) for _ in range(200)])
    merged = merge_domains([a, b])
    data = SequenceExamples(merged.sequences, "train", 50, merged.sequence_domain)
    batch = data[next(iter(LengthBucketBatchSampler(data.hist_len, 128, pool_batches=1, seed=0)))]
    assert set(batch.domain.tolist()) == {0, 1}
    item_domain = torch.from_numpy(merged.item_domain)
    assert (item_domain[batch.target] == batch.domain).all()
