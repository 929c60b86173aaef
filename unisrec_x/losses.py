"""Training objectives, written with ``F.cross_entropy`` on (masked) logits for stability."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_item_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Full softmax over the catalog: logits (B, N) for items 1..N, target (B,) item ids."""
    return F.cross_entropy(logits, target - 1)


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
