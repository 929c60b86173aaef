"""Parametric whitening (UniSRec Eq. 2): a learnable shift then a linear map."""

from __future__ import annotations

import torch
from torch import nn


class ParametricWhitening(nn.Module):
    """``PW(x) = W (dropout(x) - b)``: whitens frozen text vectors without the pre-computed
    statistics of BERT-whitening, so the transform can adapt to each domain."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2) -> None:
        """
        Args:
            in_dim: text-vector size (the encoder's hidden size).
            out_dim: item-vector size.
            dropout: applied to the input vector.
        """
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(in_dim))
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.linear.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.linear(self.dropout(x) - self.bias)
