"""Metrics: hand-computed cases and parity with RecBole's own metric classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unisrec_x.evaluation.metrics import RankingMetrics, target_ranks

if not hasattr(np, "float"):  # RecBole 1.2.1's metric code still uses the removed aliases
    np.float, np.bool = float, bool  # type: ignore[attr-defined]


def test_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # target col 2 -> rank 1
                           [0.2, 0.8, 0.1, 0.0],   # target col 1 -> rank 0
                           [0.4, 0.3, 0.2, 0.1]])  # target col 3 -> rank 3
    m = RankingMetrics(ks=[1, 2])
    m.update(logits, torch.tensor([2, 1, 3]))
    out = m.compute()
    assert out["recall@1"] == pytest.approx(1 / 3) and out["recall@2"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert out["mrr@2"] == pytest.approx((1 / 2 + 1) / 3)


def test_ties_count_against_the_target():
    assert target_ranks(torch.zeros(2, 5), torch.tensor([0, 4])).tolist() == [4, 4]


def test_nan_scores_rank_the_target_last_in_both_paths():
    """A NaN score must never look like a hit: ``NaN >= x`` is false, which once gave NaN models N@10 = 1."""
    from unisrec_x.evaluation.ranking import chunked_target_ranks

    nan = float("nan")
    logits = torch.tensor([[nan, nan, nan, nan],      # all NaN
                           [0.9, nan, 0.1, 0.2],      # the target (col 2) is beaten by 0.9 and the NaN
                           [0.1, 0.2, 0.3, 0.4]])     # finite: target col 3 is first
    target = torch.tensor([0, 2, 3])
    assert target_ranks(logits, target).tolist() == [3, 3, 0]
    # the chunked path: a NaN query row scores NaN against every candidate
    query = torch.tensor([[nan, 1.0], [1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    assert chunked_target_ranks(query, candidates, torch.tensor([1, 0]), chunk_size=2).tolist() == [2, 0]


def test_parity_with_recbole_evaluator():
    from recbole.evaluator.collector import DataStruct
    from recbole.evaluator.metrics import MRR, NDCG, Hit, Recall

    torch.manual_seed(0)
    ks = [5, 10, 50]
    logits, target = torch.randn(700, 400), torch.randint(0, 400, (700,))
    ours = RankingMetrics(ks)
    for start in range(0, 700, 128):  # batched, as in an evaluation loop
        ours.update(logits[start:start + 128], target[start:start + 128])
    ours = ours.compute()

    topk = torch.topk(logits, max(ks), dim=1).indices
    flags = (topk == target.unsqueeze(1)).int()
    data = DataStruct()
    data.set("rec.topk", torch.cat([flags, torch.ones(700, 1, dtype=torch.int)], dim=1))
    config = {"topk": ks, "metric_decimal_place": 12}
    theirs = {}
    for metric in (Recall, NDCG, MRR, Hit):
        theirs.update(metric(config).calculate_metric(data))
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
