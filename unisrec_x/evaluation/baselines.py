"""Training-free baselines on the same split and protocol as the models (full ranking, ties against the target).

A claimed gain must stand beside them: popularity (how often each item is a training target),
text-kNN (the cosine between the text vector of the history's last item and every item's), and
the *floor*: text-kNN of a decayed history plus a popularity prior, with its two knobs chosen on
validation rows (``floor_grid``), the strongest training-free ranker here (issue 28).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from unisrec_x.data.sequences import SeqBatch
from unisrec_x.evaluation.metrics import RankingMetrics
from unisrec_x.evaluation.ranking import chunked_target_ranks
from unisrec_x.model.floor import floor_candidates, floor_query


def text_knn(item_features: torch.Tensor, batches: Iterable[SeqBatch], ks: Sequence[int] = (10, 50),
             long_tail: LongTail | None = None) -> dict[str, float]:
    """Metrics of ranking every item by the cosine of its text vector to the last history item's.

    ``item_features`` is (N + 1, d) with row 0 = padding, as ``SeqRecDataModule.item_features``.
    """
    unit = F.normalize(item_features.float(), dim=-1)
    metrics = RankingMetrics(ks)
    for batch in batches:
        last = batch.item_seq.gather(1, (batch.seq_len - 1).unsqueeze(1)).squeeze(1)  # (B,)
        metrics.update_ranks(chunked_target_ranks(unit[last], unit[1:], batch.target - 1), batch.target)
    return _results(metrics, long_tail)


def popularity(train_targets: torch.Tensor, num_items: int, batches: Iterable[SeqBatch],
               ks: Sequence[int] = (10, 50), long_tail: LongTail | None = None) -> dict[str, float]:
    """Metrics of ranking every item by its count among the training targets (the same list for everyone)."""
    counts = training_counts(train_targets, num_items)[1:].float()  # (N,)
    metrics = RankingMetrics(ks)
    for batch in batches:
        query = torch.ones(len(batch.target), 1)
        metrics.update_ranks(chunked_target_ranks(query, counts.unsqueeze(1), batch.target - 1), batch.target)
    return _results(metrics, long_tail)


class FloorKnobs(NamedTuple):
    """The floor's two knobs: ``decay`` weighs the history's items (last 1, the one before ``decay``,
    then ``decay**2``, ...; 0 = the last item only) and ``beta`` the popularity prior."""

    decay: float
    beta: float


FLOOR_DECAYS = (0.0, 0.25, 0.5, 0.75)
FLOOR_BETAS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12)


def floor(item_features: torch.Tensor, counts: torch.Tensor | None, batches: Iterable[SeqBatch], knobs: FloorKnobs,
          ks: Sequence[int] = (10, 50), long_tail: LongTail | None = None) -> dict[str, float]:
    """Metrics of ``score(item) = cos(sum_j decay**j * unit(text(h_-j)), text(item)) + beta * log(1 + count(item))``.

    ``h_-0`` is the history's last item; ``counts`` (N + 1,) holds each item id's count among the regime's
    training targets (``training_counts``; ``None``, as zero-shot has, means no prior). Query and candidates
    are ``model/floor.py``'s, which a model that carries the floor adds to its own.
    """
    unit = F.normalize(item_features.float(), dim=-1)
    counts = torch.zeros(len(unit)) if counts is None else counts
    candidates = floor_candidates(unit[1:], counts[1:])  # (N, d + 1)
    metrics = RankingMetrics(ks)
    for batch in batches:
        query = floor_query(unit, batch.item_seq, batch.seq_len, knobs.decay, knobs.beta)  # (B, d + 1)
        metrics.update_ranks(chunked_target_ranks(query, candidates, batch.target - 1), batch.target)
    return _results(metrics, long_tail)


def floor_grid(item_features: torch.Tensor, counts: torch.Tensor | None, batches: Sequence[SeqBatch],
               decays: Sequence[float] = FLOOR_DECAYS, betas: Sequence[float] = FLOOR_BETAS,
               metric: str = "ndcg@10") -> tuple[FloorKnobs, dict[tuple[float, float], float]]:
    """The knobs with the best ``metric`` on ``batches`` (validation rows: never the test split), and
    every setting's value. Without counts only the decay is searched (beta 0)."""
    scores = {}
    for decay in decays:
        for beta in (betas if counts is not None else (0.0,)):
            scores[(decay, beta)] = floor(item_features, counts, batches, FloorKnobs(decay, beta))[metric]
    best = max(scores, key=lambda knob: (scores[knob], -knob[1], -knob[0]))  # ties: the simpler setting
    return FloorKnobs(*best), scores


def training_counts(train_targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """(N + 1,) each item id's count among ``train_targets`` (row 0 = padding): the floor's prior, the long tail's
    measure."""
    return torch.bincount(train_targets, minlength=num_items + 1)


#: (training targets per item id (N + 1,), largest count that is still long-tail), as ``SeqRecModule``'s slice
LongTail = tuple[torch.Tensor, int]


def _results(metrics: RankingMetrics, long_tail: LongTail | None) -> dict[str, float]:
    """All rows' metrics, plus ``long_tail/*`` over the rarely trained targets when asked."""
    out = metrics.compute()
    if long_tail is not None:
        out.update({f"long_tail/{k}": v for k, v in metrics.compute_long_tail(*long_tail).items()})
    return out
