"""The floor: a training-free score a model can carry beside its own (issue 28).

``floor(item) = cos(unit(sum_j decay**j * unit(text(h_-j))), unit(text(item))) + beta * log(1 + count(item))``,
``h_-0`` the history's last item and ``count`` the item's count among the training targets. On Scientific
with 5% of the users it ranks above every trained model, which learns from a few hundred histories what
the text vectors and the counts already say. Both terms are dot products, so the floor rides along as
extra coordinates of queries (``floor_query``) and candidates (``floor_candidates``): the baseline ranks by
them alone, and a model that carries the floor ranks by ``its own score + weight * floor`` with the same
chunked dot product in evaluation, serving and exports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decayed_history(unit: torch.Tensor, item_seq: torch.Tensor, seq_len: torch.Tensor, decay: float) -> torch.Tensor:
    """(B, d): the sum of the histories' unit text vectors ``unit[item_seq]`` (right-padded with 0), the last
    weighted 1, each earlier one ``decay`` times less."""
    positions = torch.arange(item_seq.shape[1], device=item_seq.device)
    age = (seq_len.unsqueeze(1) - 1 - positions).to(unit.dtype)  # (B, L): 0 at the last item
    weight = torch.where(age >= 0, torch.pow(torch.tensor(float(decay), dtype=unit.dtype), age.clamp(min=0)), 0.0)
    return (weight.unsqueeze(-1) * unit[item_seq]).sum(dim=1)


def floor_query(unit: torch.Tensor, item_seq: torch.Tensor, seq_len: torch.Tensor, decay: float,
                beta: float) -> torch.Tensor:
    """(B, d + 1): the unit decayed history, then ``beta`` (the prior's weight)."""
    query = F.normalize(decayed_history(unit, item_seq, seq_len, decay), dim=-1)
    return torch.cat([query, query.new_full((len(query), 1), float(beta))], dim=1)


def floor_candidates(unit_rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(R, d + 1): the rows' unit text vectors, then ``log(1 + count)`` of their items (``counts`` (R,))."""
    return torch.cat([unit_rows, torch.log1p(counts.to(unit_rows)).unsqueeze(1)], dim=1)
