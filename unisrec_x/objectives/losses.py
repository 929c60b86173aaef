"""Training objectives, written with ``F.cross_entropy`` on (masked) logits for stability."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def next_item_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Full softmax over the catalog: logits (B, N) for items 1..N, target (B,) item ids."""
    return F.cross_entropy(logits, target - 1)


def chunked_next_item_loss(score: Callable[[torch.Tensor], torch.Tensor], seq_repr: torch.Tensor,
                           target: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """``next_item_loss(score(seq_repr), target)`` with at most ``chunk_rows`` x N logits alive at once.

    A position-wise batch has M targets (every position of every window), and M x N logits may not
    fit. Each chunk's loss is checkpointed: its logits are dropped after the forward pass and
    recomputed in backward, so neither pass holds more than one chunk's. Up to ``chunk_rows`` rows
    this is exactly ``next_item_loss``.

    Args:
        score: sequence vectors (R, D) -> logits (R, N) for items 1..N (``UniSRec.score`` with its table).
        seq_repr: (M, D) one sequence vector per target.
        target: (M,) item ids.
        chunk_rows: rows of logits computed at a time.
    """
    if len(target) <= chunk_rows:
        return next_item_loss(score(seq_repr), target)
    total = sum(checkpoint(_summed_next_item_loss, score, seq_repr[start:start + chunk_rows],
                           target[start:start + chunk_rows], use_reentrant=False)
                for start in range(0, len(target), chunk_rows))
    return total / len(target)  # the mean over all targets, as next_item_loss


def _summed_next_item_loss(score: Callable[[torch.Tensor], torch.Tensor], seq_repr: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
    return next_item_loss(score(seq_repr), target) * len(target)


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float,
             same_target: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch InfoNCE: row i of ``query`` should match row i of ``keys`` against the others.

    Args:
        query: (B, D); L2-normalised here.
        keys: (B, D); L2-normalised here.
        temperature: logits are cosine / temperature.
        same_target: optional (B,) ids; other rows sharing row i's id are false negatives and
            are removed from row i's denominator (UniSRec zeroes their logits instead, which
            still counts them as exp(0) = 1 each).
    """
    logits = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T / temperature  # (B, B)
    if same_target is not None:
        clash = same_target.unsqueeze(0) == same_target.unsqueeze(1)
        clash.fill_diagonal_(False)
        logits = logits.masked_fill(clash, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def symmetric_info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float,
                       same_target: torch.Tensor | None = None) -> torch.Tensor:
    """Two views of the same rows pulled together both ways, as CTRL aligns its tabular and textual views
    (Li et al., 2023): the mean of ``info_nce(first, second)`` (each row of ``first`` finds its twin among
    ``second``'s rows) and ``info_nce(second, first)``; ``same_target`` masks false negatives in both."""
    return (info_nce(first, second, temperature, same_target) + info_nce(second, first, temperature, same_target)) / 2
