"""Position-wise windows: the prefix scheme's targets, each once, with the same (or a documented) history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unisrec_x.data.positions import PositionExamples
from unisrec_x.data.sequences import LengthBucketBatchSampler, SequenceExamples

L = 8


def _seqs():
    rng = np.random.default_rng(0)
    lengths = (3, 4, 5, L + 3, L + 4, 9, 30, 61, 2)  # no target, 1, 2, exactly one window, one over, long ones
    return [rng.integers(1, 40, size=n) for n in lengths]


def _pairs(batch):
    """(history, target) for every marked position of a PositionBatch, window by window, left to right."""
    return [(row[:j + 1].tolist(), int(t)) for row, targets in zip(batch.item_seq, batch.target)
            for j, t in enumerate(targets.tolist()) if t]


def _prefix_pairs(seqs):
    batch = SequenceExamples(seqs, "train", max_seq_len=L)[list(range(len(SequenceExamples(seqs, "train", L))))]
    return [(row[:n].tolist(), int(t)) for row, n, t in zip(batch.item_seq, batch.seq_len.tolist(), batch.target)]


def test_stride_one_gives_exactly_the_prefix_examples():
    seqs = _seqs()
    windows = PositionExamples(seqs, max_seq_len=L, window_stride=1)
    assert _pairs(windows[list(range(len(windows)))]) == _prefix_pairs(seqs)
    assert windows.shortened == 0


@pytest.mark.parametrize("stride", [None, 3, L])
def test_longer_strides_keep_the_targets_and_a_suffix_of_each_history(stride):
    seqs = _seqs()
    windows = PositionExamples(seqs, max_seq_len=L, window_stride=stride)
    got, expected = _pairs(windows[list(range(len(windows)))]), _prefix_pairs(seqs)
    assert [t for _, t in got] == [t for _, t in expected]  # every target once, in the same order
    shortest = L - windows.stride + 1
    shorter = 0
    for (history, _), (full, _) in zip(got, expected):
        assert full[len(full) - len(history):] == history  # the most recent items of the prefix history
        assert len(history) >= min(len(full), shortest)
        shorter += len(history) < len(full)
    assert shorter == windows.shortened > 0  # the 61-item sequence has targets past the first window
    assert torch.equal(windows.targets, SequenceExamples(seqs, "train", L).targets)


def test_window_batches_pad_right_and_end_on_a_target():
    seqs = _seqs()
    windows = PositionExamples(seqs, max_seq_len=L, domains=list(range(len(seqs))))
    batch = windows[list(range(len(windows)))]
    width = batch.item_seq.shape[1]
    assert width == L and batch.target.shape == batch.item_seq.shape
    padding = torch.arange(width) >= batch.seq_len.unsqueeze(1)
    assert (batch.item_seq[padding] == 0).all() and (batch.target[padding] == 0).all()
    assert (batch.target[torch.arange(len(windows)), batch.seq_len - 1] > 0).all()  # a window's last position is trained
    assert torch.equal((batch.target > 0).sum(1), windows.target_count)
    assert windows[[0]].item_seq.shape == (1, 1)  # the 4-item sequence: one target, one item of history
    assert set(batch.domain.tolist()) == set(range(1, len(seqs) - 1))  # the 3- and 2-item sequences have no target


def test_weighted_sampler_batches_hold_about_batch_size_targets_every_epoch():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 100, size=n) for n in 5 + rng.geometric(0.15, 3000)]
    windows = PositionExamples(seqs, max_seq_len=20)
    sampler = LengthBucketBatchSampler(windows.hist_len, 500, seed=0, weights=windows.target_count)
    total = int(windows.target_count.sum())
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-total // 500)  # same count every epoch (Lightning, resume)
        assert sorted(i for b in batches for i in b) == list(range(len(windows)))
        sizes = [int(windows.target_count[b].sum()) for b in batches]
        assert max(abs(s - total / len(batches)) for s in sizes) <= 2 * 20
    shards = [list(LengthBucketBatchSampler(windows.hist_len, 500, seed=0, rank=r, world_size=2,
                                            weights=windows.target_count)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) and not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_small_batches_never_come_out_empty():
    seqs = [np.arange(1, 40)] * 3 + [np.arange(1, 6)] * 50  # windows of up to 20 targets, batch_size below that
    windows = PositionExamples(seqs, max_seq_len=20)
    sampler = LengthBucketBatchSampler(windows.hist_len, 8, seed=0, weights=windows.target_count)
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(batches)


def test_stride_out_of_range_is_refused():
    with pytest.raises(ValueError, match="window_stride must be between 1 and max_seq_len=8"):
        PositionExamples(_seqs(), max_seq_len=L, window_stride=9)


def test_the_docstrings_worked_example():
    """PositionExamples' docstring walks through n = 13, L = 4, stride 2: the code must agree with it."""
    examples = PositionExamples([np.arange(100, 113)], max_seq_len=4, window_stride=2)
    batch = examples[list(range(len(examples)))]
    assert (batch.item_seq - 100).tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert batch.target.tolist() == [[101, 102, 103, 104], [0, 0, 105, 106], [0, 0, 107, 108], [0, 0, 109, 110]]
    assert examples.first_target.tolist() == [0, 2, 2, 2] and examples.target_count.tolist() == [4, 2, 2, 2]
    assert examples.shortened == 3
