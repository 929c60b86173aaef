"""Full-catalog ranking in bounded memory: target ranks and top-K over item chunks.

Scoring a batch against every item at once holds a (batch x catalog) matrix: 4 GB for 1,024
users and 1M items. Both functions here walk the catalog in chunks of ``chunk_size``
candidates, so memory is (batch x chunk) whatever the catalog size, and the results equal
the one-matrix computation (``metrics.target_ranks``, ``torch.topk``).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 65_536


def chunked_target_ranks(query: torch.Tensor, candidates: torch.Tensor, target_index: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """0-based rank of each row's target, ties and NaN counted against it (as ``metrics.target_ranks``).

    Args:
        query: (B, D) with ``score = query @ candidates.T``.
        candidates: (N, D).
        target_index: (B,) row of each target in ``candidates``.
        chunk_size: candidates scored at a time.
    """
    rows = torch.arange(len(query), device=query.device)
    # The target's score comes from the same matmul shape as the scores it is compared with, so an
    # item with an identical vector ties exactly, as in the one-matrix path (an elementwise dot
    # product rounds differently). Each row is scored against one chunk here: 1/chunks of a pass.
    target_score = torch.empty(len(query), dtype=query.dtype, device=query.device)
    for start in range(0, len(candidates), chunk_size):
        inside = (target_index >= start) & (target_index < start + chunk_size)
        if inside.any():
            scores = query[inside] @ candidates[start:start + chunk_size].T
            target_score[inside] = scores.gather(1, (target_index[inside] - start).unsqueeze(1)).squeeze(1)
    ranks = torch.zeros(len(query), dtype=torch.long, device=query.device)
    for start in range(0, len(candidates), chunk_size):
        scores = query @ candidates[start:start + chunk_size].T  # (B, chunk)
        ahead = ~(scores < target_score.unsqueeze(1))  # ties and NaN count against the target
        inside = (target_index >= start) & (target_index < start + scores.shape[1])
        # The target never counts against itself, whatever rounding its two computations got.
        ahead[rows[inside], target_index[inside] - start] = False
        ranks += ahead.sum(dim=1)
    return ranks


def chunked_topk(query: torch.Tensor, candidates: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` candidates per row: (scores (B, k), indices (B, k)), best first.

    Args:
        query: (B, D); candidates: (N, D).
        k: how many to return (at most N).
        chunk_size: candidates scored at a time; a running top-k is merged with each chunk's.
        exclude: optional (B, M) candidate indices never to return (e.g. the history); -1 = none.
    """
    if not 0 < k <= len(candidates):
        raise ValueError(f"k must be between 1 and the catalog size {len(candidates)}, got {k}")
    best_scores = torch.full((len(query), 0), float("-inf"), device=query.device)
    best_index = torch.zeros((len(query), 0), dtype=torch.long, device=query.device)
    for start in range(0, len(candidates), chunk_size):
        scores = query @ candidates[start:start + chunk_size].T
        if exclude is not None:
            local = exclude - start
            valid = (local >= 0) & (local < scores.shape[1])
            scores[torch.nonzero(valid, as_tuple=True)[0], local[valid]] = float("-inf")
        index = torch.arange(start, start + scores.shape[1], device=query.device).expand_as(scores)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_index = torch.cat([best_index, index], dim=1)
        top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_index = top.values, merged_index.gather(1, top.indices)
    return best_scores, best_index
