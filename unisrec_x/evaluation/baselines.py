"""Training-free baselines on the same split and protocol as the models (full ranking, ties against the target).

A claimed gain must stand beside them: popularity (how often each item is a training target)
and text-kNN (the cosine between the text vector of the history's last item and every item's).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from unisrec_x.data.sequences import SeqBatch
from unisrec_x.evaluation.metrics import RankingMetrics
from unisrec_x.evaluation.ranking import chunked_target_ranks


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
    counts = torch.bincount(train_targets, minlength=num_items + 1)[1:].float()  # (N,)
    metrics = RankingMetrics(ks)
    for batch in batches:
        query = torch.ones(len(batch.target), 1)
        metrics.update_ranks(chunked_target_ranks(query, counts.unsqueeze(1), batch.target - 1), batch.target)
    return _results(metrics, long_tail)


#: (training targets per item id (N + 1,), largest count that is still long-tail), as ``SeqRecModule``'s slice
LongTail = tuple[torch.Tensor, int]


def _results(metrics: RankingMetrics, long_tail: LongTail | None) -> dict[str, float]:
    """All rows' metrics, plus ``long_tail/*`` over the rarely trained targets when asked."""
    out = metrics.compute()
    if long_tail is not None:
        out.update({f"long_tail/{k}": v for k, v in metrics.compute_long_tail(*long_tail).items()})
    return out
