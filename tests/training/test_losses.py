"""InfoNCE against a naive exp/log reference, including same-target masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unisrec_x.objectives.losses import info_nce, next_item_loss, symmetric_info_nce


def naive_info_nce(q, k, t, same=None):
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / t)
        denom = sum(math.exp(float(q[i] @ k[j]) / t) for j in range(len(q))
                    if j == i or same is None or same[j] != same[i])
        total += -math.log(pos / denom)
    return total / len(q)


def test_info_nce_matches_naive_formula():
    torch.manual_seed(0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    assert float(info_nce(q, k, 0.07)) == pytest.approx(naive_info_nce(q, k, 0.07), rel=1e-5)


def test_same_target_rows_leave_the_denominator():
    torch.manual_seed(1)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    same = torch.tensor([3, 5, 3, 7, 5, 3])
    masked = float(info_nce(q, k, 0.1, same_target=same))
    assert masked == pytest.approx(naive_info_nce(q, k, 0.1, same.tolist()), rel=1e-5)
    assert masked < float(info_nce(q, k, 0.1))  # fewer negatives, lower loss
    # the original code's "logit = 0" trick would still count exp(0) = 1 per false negative
    zeroed = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.1
    clash = (same[:, None] == same[None, :]) & ~torch.eye(6, dtype=torch.bool)
    zero_trick = float(F.cross_entropy(zeroed.masked_fill(clash, 0.0), torch.arange(6)))
    assert abs(zero_trick - masked) > 1e-3


def test_info_nce_is_finite_for_extreme_similarity():
    q = torch.randn(4, 8)
    assert torch.isfinite(info_nce(q, q.clone(), 1e-4))


def test_next_item_loss_targets_are_item_ids():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert float(next_item_loss(logits, torch.tensor([1]))) < 1e-3  # item 1 is column 0


def test_symmetric_info_nce_takes_both_directions():
    """CTRL's alignment: each ID vector finds its text twin among the text vectors, and each text vector its ID twin."""
    ids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])  # not a rotation of ids: the two directions differ
    id_to_text, text_to_id = naive_info_nce(ids, texts, 0.5), naive_info_nce(texts, ids, 0.5)
    assert abs(id_to_text - text_to_id) > 0.05  # 0.692 vs 0.634
    assert float(symmetric_info_nce(ids, texts, 0.5)) == pytest.approx((id_to_text + text_to_id) / 2, rel=1e-5)
    same = torch.tensor([7, 7, 9])  # rows 0 and 1 share a next item: not negatives of each other, either way
    masked = (naive_info_nce(ids, texts, 0.5, same) + naive_info_nce(texts, ids, 0.5, same)) / 2
    assert float(symmetric_info_nce(ids, texts, 0.5, same_target=same)) == pytest.approx(masked, rel=1e-5)
    assert masked != pytest.approx((id_to_text + text_to_id) / 2)
