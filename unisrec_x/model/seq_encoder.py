"""SASRec-style causal Transformer over item vectors; the last position is the sequence vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class TransformerLayer(nn.Module):
    """Post-norm block as in RecBole's SASRec: attention and GELU feed-forward, each followed by
    dropout, residual and LayerNorm. Attention runs through ``scaled_dot_product_attention``."""

    def __init__(self, hidden_dim: int, n_heads: int, inner_dim: int, dropout: float, attn_dropout: float,
                 layer_norm_eps: float) -> None:
        super().__init__()
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.attn_out = nn.Linear(hidden_dim, hidden_dim)
        self.attn_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.ff_in = nn.Linear(hidden_dim, inner_dim)
        self.ff_out = nn.Linear(inner_dim, hidden_dim)
        self.ff_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D). Position t sees positions <= t only."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # Histories are right-padded, so under the causal mask a real position only ever sees
        # real positions: no key-padding mask is needed (padding outputs are never read).
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(batch, length, dim)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        return self.ff_norm(x + self.dropout(self.ff_out(F.gelu(self.ff_in(x)))))


class SequenceEncoder(nn.Module):
    """Learned positions + causal Transformer; returns the output at each history's last item."""

    def __init__(self, hidden_dim: int = 300, n_layers: int = 2, n_heads: int = 2, inner_dim: int = 256,
                 dropout: float = 0.5, attn_dropout: float = 0.5, max_seq_len: int = 50,
                 layer_norm_eps: float = 1e-12, last_item_residual: bool = False, history_decay: float = 0.0,
                 learn_history_decay: bool = False) -> None:
        """
        Args:
            hidden_dim: item- and sequence-vector size.
            n_layers: Transformer blocks.
            n_heads: attention heads.
            inner_dim: feed-forward width.
            dropout: on the input and after each sub-layer.
            attn_dropout: on attention weights.
            max_seq_len: longest history (number of learned positions).
            layer_norm_eps: LayerNorm epsilon (1e-12 as in RecBole/UniSRec).
            last_item_residual: the output at position t is ``unit(transformer) + w * unit(item_t)``
                with a learned ``w`` (initially 1): the vector of the history's last item reaches the
                query directly, so an untrained or domain-shifted Transformer still ranks items by
                their similarity to the last one (the text-kNN baseline) instead of by noise. For
                cosine scoring, where only directions count.
            history_decay: with ``last_item_residual``, the residual at position t becomes
                ``w * unit(sum_{j<=t} decay**(t-j) * unit(item_j))``: the decayed history the floor ranker
                (``evaluation/baselines.py::floor``) queries with, instead of the last item alone. 0 is
                the last item alone (exactly the plain residual); at most 1.
            learn_history_decay: the decay is a parameter (starting at ``history_decay``, kept in [0, 1]
                in the forward pass), saved with the model; else a constant.
        """
        super().__init__()
        if not 0.0 <= history_decay <= 1.0:
            raise ValueError(f"history_decay must lie in [0, 1], got {history_decay}")
        if (history_decay > 0 or learn_history_decay) and not last_item_residual:
            raise ValueError("history_decay weighs the history in the last-item residual: set last_item_residual=True")
        self.position = nn.Embedding(max_seq_len, hidden_dim)
        self.input_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_dim, n_heads, inner_dim, dropout, attn_dropout, layer_norm_eps) for _ in range(n_layers))
        self.apply(_init_weights)
        self.residual_weight = nn.Parameter(torch.ones(())) if last_item_residual else None
        self.fixed_history_decay = float(history_decay)
        self.learned_history_decay = nn.Parameter(torch.tensor(float(history_decay))) if learn_history_decay else None

    def forward(self, item_emb: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """item_emb (B, L, D), seq_len (B,) -> sequence vectors (B, D)."""
        x = self.hidden_states(item_emb)
        return x[torch.arange(x.shape[0], device=x.device), seq_len - 1]  # (B, L, D) -> (B, D)

    def hidden_states(self, item_emb: torch.Tensor) -> torch.Tensor:
        """item_emb (B, L, D) -> output at every position (B, L, D).

        Under the causal mask position t is the sequence vector of the history ending at t, so
        one pass gives every prefix's vector (position-wise training, SASRec-style).
        """
        length = item_emb.shape[1]
        if length > self.position.num_embeddings:
            raise ValueError(f"history of length {length} is longer than max_seq_len {self.position.num_embeddings}")
        x = self.dropout(self.input_norm(item_emb + self.position.weight[:length]))
        for layer in self.layers:
            x = layer(x)
        if self.residual_weight is not None:
            x = F.normalize(x, dim=-1) + self.residual_weight * self._residual(F.normalize(item_emb, dim=-1))
        return x

    def _residual(self, unit_items: torch.Tensor) -> torch.Tensor:
        """Unit item vectors (B, L, D) -> the residual's direction at every position (B, L, D): the item
        itself, or the unit decayed sum of the history up to it (causal, so every prefix gets its own)."""
        if self.learned_history_decay is not None:
            decay = _unit_interval(self.learned_history_decay)
        elif self.fixed_history_decay > 0:
            decay = torch.tensor(self.fixed_history_decay, dtype=unit_items.dtype, device=unit_items.device)
        else:
            return unit_items  # the plain last-item residual, untouched
        weights = decay_matrix(decay.to(unit_items.dtype), unit_items.shape[1])  # (L, L)
        return F.normalize(torch.matmul(weights, unit_items), dim=-1)  # (L, L) @ (B, L, D) -> (B, L, D)

    def outputs_at(self, item_emb: torch.Tensor, at: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
        """item_emb (B, L, D), at (B, L) bool -> the outputs at the marked positions (M, D), row-major.

        Training batches hold a fixed number of *targets*, not positions: a batch of late windows of
        long sequences (a few new targets each, all L positions encoded) held 25k positions against
        ~8k for a batch of first windows, and its activations set the process's peak memory. With
        ``chunk_tokens``, while gradients are on, rows are encoded at most ``chunk_tokens`` positions
        at a time, each chunk checkpointed (its activations are dropped after the forward pass and
        recomputed in backward, one chunk at a time): the same outputs and gradients, with memory
        bounded by the chunk, at the cost of one more forward pass of the batches that exceed it.
        """
        rows = rows_per_chunk(chunk_tokens, len(at), at.shape[1])
        if rows >= len(at) or not torch.is_grad_enabled():
            return self._outputs_at(item_emb, at)
        return torch.cat([checkpoint(self._outputs_at, item_emb[start:start + rows], at[start:start + rows],
                                     use_reentrant=False) for start in range(0, len(at), rows)])

    def _outputs_at(self, item_emb: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(item_emb)[at]


def decay_matrix(decay: torch.Tensor, length: int) -> torch.Tensor:
    """(L, L) lower-triangular ``W[t, j] = decay**(t - j)`` for j <= t, else 0.

    The powers are a running product, not ``pow``: a learned decay that starts at 0 (the plain residual)
    must get a finite gradient, and ``pow`` at 0 is inf for the masked (negative) ages, whose gradient
    through ``where`` is NaN (and ``pow(0, 0)``'s is NaN in some torch versions).
    """
    powers = torch.cat([torch.ones_like(decay).reshape(1), decay.expand([length - 1])]).cumprod(0)  # (L,)
    age = torch.arange(length, device=decay.device)
    age = age.unsqueeze(1) - age.unsqueeze(0)  # (L, L): t - j
    return torch.where(age >= 0, powers[age.clamp(min=0)], torch.zeros_like(decay))


def _unit_interval(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` clamped to [0, 1] with the gradient of the identity: a learned decay pushed below 0 (the
    plain residual) still hears when the loss wants it back, where a plain clamp would leave it stuck."""
    return raw + (raw.clamp(0.0, 1.0) - raw).detach()


def rows_per_chunk(chunk_tokens: int | None, rows: int, length: int) -> int:
    """Batch rows of ``length`` positions that fit ``chunk_tokens`` positions (at least one); all
    ``rows`` when there is no bound. Shared by the checkpointed chunks here and the micro-batches."""
    return rows if chunk_tokens is None else max(1, chunk_tokens // max(1, length))


def _init_weights(module: nn.Module) -> None:
    """RecBole/UniSRec init: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
