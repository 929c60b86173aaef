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
        """(..., in_dim) -> (..., out_dim): ``sum_e gate_e(x) * W_e (dropout_e(x) - b_e)``.

        All experts run as one batched product, and the shift is applied after it
        (``W_e (d - b_e) = W_e d - W_e b_e``): a training step adapts the whole catalog, and the
        per-expert form allocated ~480 MB per Scientific step (its stacked outputs, each expert's
        shifted input and its gradient), page-faulted anew each step under the fixed mmap threshold.
        Each expert keeps its own dropout mask, as in the per-expert form.
        """
        rows = x.reshape(-1, x.shape[-1])  # (R, in)
        weight = torch.stack([expert.linear.weight for expert in self.experts])  # (E, out, in)
        shift = torch.stack([expert.linear.weight @ expert.bias for expert in self.experts])  # (E, out)
        if self.training and any(expert.dropout.p > 0 for expert in self.experts):  # each its own mask and rate
            inputs = torch.stack([expert.dropout(rows) for expert in self.experts])  # (E, R, in)
            expert_out = torch.bmm(inputs, weight.transpose(1, 2))  # (E, R, out)
        else:
            expert_out = torch.matmul(rows, weight.transpose(1, 2))  # (E, R, out)
        gates = self.gates(rows)  # (R, E)
        mixed = torch.einsum("re,ero->ro", gates, expert_out) - gates @ shift
        return mixed.reshape(*x.shape[:-1], mixed.shape[-1])
