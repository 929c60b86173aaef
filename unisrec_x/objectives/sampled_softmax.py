"""Sampled softmax with log-Q correction, for catalogs where a full softmax costs too much.

Candidates per step are the batch's own targets (in-batch negatives, drawn by popularity)
plus ``num_negatives`` items drawn uniformly or by popularity. Each candidate's logit is
lowered by the log of its expected count among the candidates (Yi et al., RecSys 2019;
mixed negative sampling), so popular items are not over-penalised and the loss stays a
consistent estimate of the full softmax.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

NegativeSampling = Literal["uniform", "popularity"]


class NegativeSampler:
    """Draws negatives and knows each item's log expected count among a step's candidates."""

    def __init__(self, target_counts: torch.Tensor, num_negatives: int, sampling: NegativeSampling = "uniform") -> None:
        """
        Args:
            target_counts: (N + 1,) how often each item is a training target (row 0 = padding, unused).
            num_negatives: extra negatives per step, shared by the whole batch.
            sampling: ``uniform`` over items 1..N, or ``popularity`` (proportional to ``target_counts``).
        """
        if sampling not in ("uniform", "popularity"):
            raise ValueError(f"negative sampling must be 'uniform' or 'popularity', got {sampling!r}")
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        counts = target_counts.double().clone()
        counts[0] = 0
        if counts.sum() <= 0:
            raise ValueError("no training targets to estimate item popularity from")
        self.num_items, self.num_negatives, self.sampling = len(counts) - 1, num_negatives, sampling
        self.popularity = counts / counts.sum()
        uniform = torch.full_like(counts, 1.0 / self.num_items)
        uniform[0] = 0
        self.negative_prob = self.popularity if sampling == "popularity" else uniform

    def sample(self, device: torch.device | None = None) -> torch.Tensor:
        """``num_negatives`` item ids (with replacement), from the global RNG (so runs resume exactly)."""
        if self.sampling == "uniform":
            ids = torch.randint(1, self.num_items + 1, (self.num_negatives,))
        else:
            ids = torch.multinomial(self.popularity.float(), self.num_negatives, replacement=True)
        return ids.to(device)

    def log_expected_count(self, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """log(B * p_pop(i) + M * q_neg(i)) for candidate ids (any shape)."""
        ids_cpu = ids.cpu()
        expected = batch_size * self.popularity[ids_cpu] + self.num_negatives * self.negative_prob[ids_cpu]
        return expected.clamp_min(1e-12).log().to(ids.device, torch.float32)


def sampled_softmax_loss(logits: torch.Tensor, candidate_ids: torch.Tensor, target: torch.Tensor,
                         log_q: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of row i against candidate column i (its own target).

    Args:
        logits: (B, B + M) scores of each row against [batch targets | sampled negatives].
        candidate_ids: (B + M,) the candidates' item ids.
        target: (B,) each row's target id.
        log_q: (B + M,) log expected count of each candidate (the log-Q correction).
    """
    batch = len(target)
    same = candidate_ids.unsqueeze(0) == target.unsqueeze(1)  # (B, B + M): the target again, not a negative
    same[torch.arange(batch), torch.arange(batch)] = False
    corrected = (logits - log_q.unsqueeze(0)).masked_fill(same, float("-inf"))
    return F.cross_entropy(corrected, torch.arange(batch, device=logits.device))
