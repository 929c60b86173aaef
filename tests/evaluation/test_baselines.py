"""Training-free baselines against brute-force scoring of the same rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unisrec_x.evaluation.baselines import popularity, text_knn
from unisrec_x.data.sequences import SequenceExamples
from unisrec_x.evaluation.metrics import RankingMetrics


def _examples(num_items: int = 40, users: int = 60) -> SequenceExamples:
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, num_items + 1, (int(n),), generator=gen).numpy()
                 for n in torch.randint(3, 12, (users,), generator=gen)]
    return SequenceExamples(sequences, "test")


def test_text_knn_equals_brute_force_cosine_ranking():
    data = _examples()
    features = torch.randn(41, 16)
    features[0] = 0
    batch = data[list(range(len(data)))]
    last = batch.item_seq[torch.arange(len(batch.target)), batch.seq_len - 1]
    logits = F.cosine_similarity(features[last].unsqueeze(1), features[1:].unsqueeze(0), dim=-1)  # (B, N)
    expected = RankingMetrics()
    expected.update(logits, batch.target - 1)
    chunks = [data[list(range(s, min(s + 7, len(data))))] for s in range(0, len(data), 7)]
    assert text_knn(features, chunks) == pytest.approx(expected.compute(), abs=1e-9)


def test_popularity_ranks_by_training_counts_with_ties_against_the_target():
    data = _examples()
    batch = data[list(range(len(data)))]
    out = popularity(torch.tensor([1, 1, 2]), 40, [batch], ks=[1, 2])
    hits1 = (batch.target == 1).float().mean().item()
    hits2 = ((batch.target == 1) | (batch.target == 2)).float().mean().item()
    assert out["recall@1"] == pytest.approx(hits1) and out["recall@2"] == pytest.approx(hits2)


def test_long_tail_slice_is_the_metric_over_rarely_trained_targets_only():
    data = _examples()
    batch = data[list(range(len(data)))]
    features = torch.randn(41, 16)
    features[0] = 0
    train_counts = torch.randint(0, 12, (41,), generator=torch.Generator().manual_seed(1))
    out = text_knn(features, [batch], long_tail=(train_counts, 5))
    rare = train_counts[batch.target] <= 5
    assert 0 < int(rare.sum()) < len(batch.target)  # a real slice, not all or nothing
    last = batch.item_seq[torch.arange(len(batch.target)), batch.seq_len - 1]
    logits = F.cosine_similarity(features[last].unsqueeze(1), features[1:].unsqueeze(0), dim=-1)
    expected = RankingMetrics()
    expected.update(logits[rare], (batch.target - 1)[rare])
    assert out["long_tail/rows"] == int(rare.sum())
    assert {k: out[f"long_tail/{k}"] for k in expected.compute()} == pytest.approx(expected.compute(), abs=1e-9)
    assert out["ndcg@10"] != pytest.approx(out["long_tail/ndcg@10"])  # the slice is not the whole
