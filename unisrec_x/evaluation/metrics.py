"""Full-ranking metrics under RecBole's protocol for sequential models.

Every item is a candidate (padding excluded); items already in the history are *not*
masked, as RecBole does for sequential recommenders. With one target per row
(leave-one-out), Recall@K equals Hit@K.
"""

from __future__ import annotations

from typing import Sequence

import torch

METRICS = ("recall", "ndcg", "mrr", "hit")


def target_ranks(logits: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among all candidates: (B, N), (B,) -> (B,).

    Ties count against the target (a candidate scoring equal is ranked ahead), so a model
    that gives every item the same score gets no credit instead of a perfect one. A NaN score
    (the target's or a candidate's) also counts against the target: a model that outputs NaN
    ranks its targets last, instead of first (``NaN >= x`` is false).
    """
    target_score = logits.gather(1, target_index.unsqueeze(1))  # (B, 1)
    return (~(logits < target_score)).sum(dim=1) - 1


def metrics_at_k(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-row metric values for each K: ``{"ndcg@10": (B,), ...}``."""
    ranks = ranks.double()
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.double()
        out[f"hit@{k}"] = hit.double()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0)
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), 0.0)
    return out


class RankingMetrics:
    """Accumulates ranks (and, when given, each row's target item) over an evaluation pass;
    ``compute()`` gives the means, over every row or over a slice of them."""

    def __init__(self, ks: Sequence[int] = (10, 50)) -> None:
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self._ranks: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target_index: torch.Tensor) -> None:
        """logits (B, N) over candidates; target_index (B,) column of each row's target."""
        self.update_ranks(target_ranks(logits, target_index))

    def update_ranks(self, ranks: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """0-based target ranks (B,), e.g. from ``ranking.chunked_target_ranks``; ``targets`` (B,) item ids
        let ``compute`` slice rows by their target (e.g. rarely seen items)."""
        self._ranks.append(ranks.cpu())
        if targets is not None:
            self._targets.append(targets.cpu())

    @property
    def ranks(self) -> torch.Tensor:
        return torch.cat(self._ranks) if self._ranks else torch.zeros(0, dtype=torch.long)

    @property
    def targets(self) -> torch.Tensor:
        """The target item of every row seen, in order (only when every update passed ``targets``)."""
        if len(self._targets) != len(self._ranks):
            raise RuntimeError("targets were not given with every update_ranks call")
        return torch.cat(self._targets) if self._targets else torch.zeros(0, dtype=torch.long)

    def compute(self, rows: torch.Tensor | None = None) -> dict[str, float]:
        """Mean of each metric over all rows, or over the rows where the (R,) bool mask ``rows`` is set."""
        ranks = self.ranks if rows is None else self.ranks[rows]
        if len(ranks) == 0:
            raise RuntimeError("no evaluation rows were seen" if rows is None else "the slice holds no rows")
        return {name: float(values.mean()) for name, values in metrics_at_k(ranks, self.ks).items()}

    def compute_long_tail(self, train_counts: torch.Tensor, max_count: int) -> dict[str, float]:
        """Metrics over the rows whose target occurs at most ``max_count`` times among the training
        targets (``train_counts``: (N + 1,) per item id), plus ``rows``: how many there were (0: no metrics)."""
        rows = train_counts[self.targets] <= max_count
        if not bool(rows.any()):
            return {"rows": 0.0}
        return {**self.compute(rows), "rows": float(rows.sum())}
