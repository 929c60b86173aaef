"""Mixture-of-experts adapter (UniSRec Eq. 3-4): several whitening experts, softmax gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unisrec_x.model.whitening import ParametricWhitening


class MoEAdapter(nn.Module):
    """Maps text vectors into the shared item space as a gated sum of whitening experts.

    Several experts let different domains use different whitenings; the gate picks per item.
    Gaussian noise on the gate logits during training (as in the official code) keeps all
    experts in use.
    """

    def __init__(self, in_dim: int, out_dim: int, n_experts: int = 8, dropout: float = 0.2,
                 gate_noise: bool = True, noise_epsilon: float = 1e-2) -> None:
        """
        Args:
            in_dim: text-vector size.
            out_dim: item-vector size.
            n_experts: number of whitening experts.
            dropout: input dropout inside each expert.
            gate_noise: add learned-scale Gaussian noise to the gate logits while training.
            noise_epsilon: floor of the noise scale.
        """
        super().__init__()
        self.experts = nn.ModuleList(ParametricWhitening(in_dim, out_dim, dropout) for _ in range(n_experts))
        self.gate = nn.Parameter(torch.zeros(in_dim, n_experts))
        self.gate_noise = nn.Parameter(torch.zeros(in_dim, n_experts)) if gate_noise else None
        self.noise_epsilon = noise_epsilon

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., n_experts) mixture weights summing to 1."""
        logits = x @ self.gate
        if self.gate_noise is not None and self.training:
            scale = F.softplus(x @ self.gate_noise) + self.noise_epsilon
            logits = logits + torch.randn_like(logits) * scale
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        expert_out = torch.stack([expert(x) for expert in self.experts], dim=-2)  # (..., E, out_dim)
        return (self.gates(x).unsqueeze(-1) * expert_out).sum(dim=-2)
