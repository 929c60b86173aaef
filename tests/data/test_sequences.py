"""Examples and batches: the same prefixes RecBole would build, padded only as far as needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unisrec_x.data.sequences import LengthBucketBatchSampler, SequenceExamples


def _seqs():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 30, size=n) for n in (3, 4, 9, 60, 5)]


def test_examples_match_naive_prefixes():
    seqs = _seqs()
    for split in ("train", "valid", "test"):
        data = SequenceExamples(seqs, split, max_seq_len=50)
        naive = []
        for s in seqs:
            n = len(s)
            targets = range(1, n - 2) if split == "train" else [n - 2 if split == "valid" else n - 1]
            naive += [(list(s[max(0, t - 50):t]), s[t]) for t in targets]
        batch = data[list(range(len(data)))]
        got = [(row[:length].tolist(), target) for row, length, target in zip(batch.item_seq, batch.seq_len.tolist(), batch.target.tolist())]
        assert got == naive
        assert (batch.item_seq[torch.arange(batch.item_seq.shape[1]) >= batch.seq_len.unsqueeze(1)] == 0).all()


def test_batch_pads_to_its_own_longest_history():
    data = SequenceExamples(_seqs(), "valid", max_seq_len=50)
    assert data[[0, 1]].item_seq.shape == (2, 2)  # histories of length 1 and 2
    assert data[[3]].item_seq.shape == (1, 50)  # 58 past items truncated to 50


def test_bucket_sampler_covers_each_example_once_and_buckets_lengths():
    lengths = torch.randint(1, 50, (5000,))
    sampler = LengthBucketBatchSampler(lengths, batch_size=64, pool_batches=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(5000))
    spread = np.mean([lengths[b].max().item() - lengths[b].min().item() for b in batches])
    assert spread < 10  # random batches would span almost the whole 1..49 range
    sampler.set_epoch(1)
    assert [b for b in sampler] != batches  # reshuffled per epoch


def test_sampler_shards_are_disjoint_and_equal_across_ranks():
    lengths = torch.randint(1, 50, (1000,))
    shards = [list(LengthBucketBatchSampler(lengths, 32, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    assert not set(i for b in shards[0] for i in b) & set(i for b in shards[1] for i in b)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("examples", [10, 31 * 32, 32 * 32, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_ddp_shards_train_every_batch_with_the_same_count_on_every_rank(world_size, examples, weighted):
    # cutting the epoch to a multiple of world_size dropped len(batches) % world_size batches every epoch
    lengths = torch.randint(1, 50, (examples,), generator=torch.Generator().manual_seed(examples))
    weights = torch.full_like(lengths, 2) if weighted else None  # windows of 2 targets: 2 * examples / 32 batches
    make = lambda rank, world: LengthBucketBatchSampler(lengths, 32, pool_batches=1, seed=3, rank=rank,  # noqa: E731
                                                        world_size=world, weights=weights)
    epoch = [tuple(b) for b in make(0, 1)]
    shards = [[tuple(b) for b in make(rank, world_size)] for rank in range(world_size)]
    assert [len(s) for s in shards] == [len(make(rank, world_size)) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-len(epoch) // world_size)
    assert {b for s in shards for b in s} == set(epoch)  # every batch of the epoch is trained
    assert sorted(i for b in set(epoch) for i in b) == list(range(examples))
    if len(epoch) % world_size:  # (10 examples: 1 batch; 992: 31 or 62; 1000 weighted: 63) filled from the epoch's start
        repeated = [b for s in shards for b in s][len(epoch):]
        assert repeated == [epoch[i % len(epoch)] for i in range(len(repeated))]


def _scientific_sized_lengths():
    """History lengths of every training prefix of 8,442 users with ~4 train targets each (Scientific: 34,101)."""
    rng = np.random.default_rng(0)
    targets = 1 + rng.geometric(1 / 3.04, size=8442)
    return torch.from_numpy(np.minimum(np.concatenate([np.arange(1, t + 1) for t in targets]), 50))


def _profile(lengths, batches):
    """Each batch's histogram of history lengths, as a sorted list: which length slices the epoch was cut into."""
    return sorted(tuple(torch.bincount(lengths[b], minlength=51).tolist()) for b in batches)


def test_default_pools_cut_other_batches_every_epoch():
    lengths = _scientific_sized_lengths()
    whole_epoch_pool = LengthBucketBatchSampler(lengths, 2048, pool_batches=50, seed=0)  # the old setting
    epochs = []
    for epoch in (0, 1):
        whole_epoch_pool.set_epoch(epoch)
        epochs.append(list(whole_epoch_pool))
    # one pool holds the whole epoch: it is sorted, and every epoch has the same length slices
    assert _profile(lengths, epochs[0]) == _profile(lengths, epochs[1])
    assert sum(lengths[b].max().item() == 1 for b in epochs[0]) == 4  # 4 batches of 1-item histories only
    sampler = LengthBucketBatchSampler(lengths, 2048, seed=0)  # default pools of a few batches
    first, second = list(sampler), (sampler.set_epoch(1), list(sampler))[1]
    assert _profile(lengths, first) != _profile(lengths, second)
    assert not {frozenset(b) for b in first} & {frozenset(b) for b in second}
    for epoch in (first, second):
        # the 1-item histories are spread over more batches (one run of them per pool), fewer batches hold only them
        assert sum(lengths[b].min().item() == 1 for b in epoch) > 5
        assert sum(lengths[b].max().item() == 1 for b in epoch) < 4
        assert sorted(i for b in epoch for i in b) == list(range(len(lengths)))
        # still bucketed: most batches pad to far less than the longest history
        assert np.median([lengths[b].max().item() for b in epoch]) <= 10
