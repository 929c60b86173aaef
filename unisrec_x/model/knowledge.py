"""Knowledge adapter after KAR (Xi et al., 2023): per-field text vectors -> one augmented item vector.

KAR encodes each kind of knowledge once and maps it through a hybrid-expert adaptor: experts shared by
every kind plus experts of each kind's own, mixed by a gate, so what the fields have in common is learnt
once while each keeps a map of its own. Here the kinds are an item's text fields (title, categories,
brand, ...), each encoded separately by the frozen text encoder; a second gate mixes the fields into one
vector. The vectors are precomputed per item, so serving pays one table lookup.
"""

from __future__ import annotations

import torch
from torch import nn

from unisrec_x.model.whitening import ParametricWhitening


class KnowledgeAdapter(nn.Module):
    """Hybrid-expert adapter: per field a gated mix of shared and own whitening experts, then a gate over fields.

    A field whose vector is all zero (its text is empty) is absent: the gate over fields skips it, and an
    item with no field at all (the padding row) gets a zero vector.
    """

    def __init__(self, in_dim: int, out_dim: int, fields: int, shared_experts: int = 2, field_experts: int = 1,
                 dropout: float = 0.2) -> None:
        """
        Args:
            in_dim: text-vector size of each field.
            out_dim: item-vector size.
            fields: number of text fields per item.
            shared_experts: whitening experts every field uses (KAR's shared experts).
            field_experts: whitening experts of each field's own (KAR's dedicated experts).
            dropout: input dropout, one mask per item and field shared by that field's experts.
        """
        super().__init__()
        if fields < 1:
            raise ValueError(f"the knowledge adapter needs at least one field, got {fields}")
        if shared_experts < 0 or field_experts < 0 or shared_experts + field_experts < 1:
            raise ValueError(f"each field needs at least one expert: shared_experts={shared_experts}, "
                             f"field_experts={field_experts}")
        self.fields, self.shared_count, self.own_count = fields, shared_experts, field_experts
        self.dropout = nn.Dropout(dropout)
        self.shared = nn.ModuleList(ParametricWhitening(in_dim, out_dim, 0.0) for _ in range(shared_experts))
        self.own = nn.ModuleList(ParametricWhitening(in_dim, out_dim, 0.0) for _ in range(fields * field_experts))
        experts = shared_experts + field_experts
        self.expert_gate = nn.Parameter(torch.zeros(fields, in_dim, experts))  # per field: its experts' weights
        self.field_gate = nn.Linear(fields * in_dim, fields)  # from all fields at once: which to trust per item
        nn.init.zeros_(self.field_gate.weight)
        nn.init.zeros_(self.field_gate.bias)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, F, in) -> expert weights (R, F, shared + own), each field's summing to 1, and field weights
        (R, F) summing to 1 over the fields present (all 0 where none is)."""
        experts = torch.einsum("rfi,fie->rfe", x, self.expert_gate).softmax(dim=-1)
        present = x.ne(0).any(dim=-1)  # (R, F)
        logits = self.field_gate(x.flatten(1))  # (R, F), float16 under autocast: its own dtype's floor
        logits = logits.masked_fill(~present, torch.finfo(logits.dtype).min)
        fields = logits.softmax(dim=-1) * present.any(dim=-1, keepdim=True)  # finite even with no field present
        return experts, fields

    def _expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(R, F, in) -> every field through its experts (R, F, shared + own, out), as batched products with the
        shift applied after them (``W (x - b) = W x - W b``), as in ``MoEAdapter``."""
        parts = []
        if self.shared_count:
            weight = torch.stack([e.linear.weight for e in self.shared])  # (S, out, in)
            shift = torch.stack([e.linear.weight @ e.bias for e in self.shared])  # (S, out)
            parts.append(torch.einsum("rfi,soi->rfso", x, weight) - shift)
        if self.own_count:
            weight = torch.stack([e.linear.weight for e in self.own]).unflatten(0, (self.fields, self.own_count))
            shift = torch.stack([e.linear.weight @ e.bias for e in self.own]).unflatten(0, (self.fields, self.own_count))
            parts.append(torch.einsum("rfi,feoi->rfeo", x, weight) - shift)  # field f only through its own
        return torch.cat(parts, dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., F, in) -> (..., out): ``sum_f g_f(x) sum_e h_fe(x_f) PW_e(x_f)``, ``e`` over the shared experts
        and field ``f``'s own."""
        rows = x.reshape(-1, *x.shape[-2:])  # (R, F, in)
        experts, fields = self.gates(rows)
        outputs = self._expert_outputs(self.dropout(rows))  # (R, F, E, out)
        per_field = torch.einsum("rfe,rfeo->rfo", experts, outputs)
        mixed = torch.einsum("rf,rfo->ro", fields, per_field)
        return mixed.reshape(*x.shape[:-2], mixed.shape[-1])
