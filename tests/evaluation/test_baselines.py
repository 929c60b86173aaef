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


def test_floor_scores_equal_a_hand_computation_on_a_tiny_dataset():
    """Three items on the unit circle, one history (1, 2) -> target 3: every score by hand."""
    from unisrec_x.data.sequences import SeqBatch
    from unisrec_x.evaluation.baselines import FloorKnobs, floor, training_counts

    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # row 0 = padding; any lengths
    batch = SeqBatch(torch.tensor([[1, 2, 0]]), torch.tensor([2]), torch.tensor([3]), torch.tensor([0]))
    counts = training_counts(torch.tensor([1, 1, 1, 3]), 3)  # item 1 three times, item 3 once, item 2 never
    # history vector: 1 * unit(item 2) + 0.5 * unit(item 1) = (0.5, 1) -> unit (0.4472, 0.8944)
    # cosines: item 1 0.4472, item 2 0.8944, item 3 (0.4472 + 0.8944) / sqrt(2) = 0.9487
    # + beta 0.3 * log(1 + count): item 1 + 0.3 * log 4 = 0.4159 -> 0.8631, item 2 + 0, item 3 + 0.3 * log 2 = 0.2079
    # -> 1.1566: ranking 3 (1.1566), 2 (0.8944), 1 (0.8631): the target is first
    assert floor(features, counts, [batch], FloorKnobs(0.5, 0.3), ks=[1])["recall@1"] == 1.0
    # a prior of 2.0 lifts item 1 to 0.4472 + 2 log 4 = 3.22 above item 3's 0.9487 + 2 log 2 = 2.33: target second
    out = floor(features, counts, [batch], FloorKnobs(0.5, 2.0), ks=[1, 2])
    assert out["recall@1"] == 0.0 and out["recall@2"] == 1.0
    assert out["mrr@2"] == pytest.approx(0.5)
    # decay 0 is text-kNN of the last item (item 2): cosines 0, 1, 0.7071 -> target second without a prior
    assert floor(features, None, [batch], FloorKnobs(0.0, 0.0), ks=[1, 2])["mrr@2"] == pytest.approx(0.5)


def test_floor_with_decay_zero_and_no_prior_is_text_knn():
    data = _examples()
    features = torch.randn(41, 16)
    features[0] = 0
    from unisrec_x.evaluation.baselines import FloorKnobs, floor

    batch = data[list(range(len(data)))]
    assert floor(features, None, [batch], FloorKnobs(0.0, 0.0)) == pytest.approx(text_knn(features, [batch]), abs=1e-9)


def test_floor_grid_picks_the_best_validation_setting():
    from unisrec_x.evaluation.baselines import floor, floor_grid, training_counts

    data = _examples()
    features = torch.randn(41, 16)
    features[0] = 0
    batch = data[list(range(len(data)))]
    counts = training_counts(torch.randint(1, 41, (200,), generator=torch.Generator().manual_seed(2)), 40)
    knobs, scores = floor_grid(features, counts, [batch], decays=(0.0, 0.5), betas=(0.0, 0.05, 0.5))
    assert len(scores) == 6 and scores[tuple(knobs)] == max(scores.values())
    assert scores[tuple(knobs)] == floor(features, counts, [batch], knobs)["ndcg@10"]
    zero_shot, only_decay = floor_grid(features, None, [batch], decays=(0.0, 0.5))
    assert zero_shot.beta == 0.0 and set(only_decay) == {(0.0, 0.0), (0.5, 0.0)}
