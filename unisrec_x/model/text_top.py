"""A trainable top for the frozen text encoder: its last ``k`` Transformer layers and the pooling, torch only.

A frozen encoder fixes what "similar" means before any interaction is seen (issue 29). Training only its
top ``k`` layers keeps a step cheap: the frozen layers' token states are computed once per item and cached
(``items/token_states.py``), so a step runs ``k`` layers over the items it touches. Every item's vector
is kept in a table refreshed from the top (``UniSRec.refresh_text_table``), with the items a step trains
on computed fresh (``UniSRec.fresh_text``), so full-catalog scoring never runs the top over the catalog.

``EncoderLayer`` is BERT's post-LayerNorm layer with the parameter names of ``transformers``' ``BertLayer``,
so an encoder's layer weights load into it as they are (``TextTop.load_layers``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, dropout: float) -> torch.Tensor:
        rows, length, dim = x.shape
        split = lambda t: t.view(rows, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=keep[:, None, None, :], dropout_p=dropout)
        return out.transpose(1, 2).reshape(rows, length, dim)


class _Residual(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (BERT's ``*Output`` blocks)."""

    def __init__(self, in_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, dropout: float) -> torch.Tensor:
        return self.LayerNorm(F.dropout(self.dense(x), dropout, self.training) + residual)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        setattr(self, "self", _SelfAttention(dim, heads))  # BertAttention's name for it
        self.output = _Residual(dim, dim, eps)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, inner_dim)


class EncoderLayer(nn.Module):
    """One BERT layer (self-attention, feed-forward, post-LayerNorm, exact GELU) over padded token states."""

    def __init__(self, dim: int, heads: int, inner_dim: int, eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"text dim {dim} is not divisible by {heads} heads")
        self.attention = _Attention(dim, heads, eps)
        self.intermediate = _Intermediate(dim, inner_dim)
        self.output = _Residual(inner_dim, dim, eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (U, T, dim), keep (U, T) bool (False = padding) -> (U, T, dim)."""
        dropout = self.dropout if self.training else 0.0
        attended = getattr(self.attention, "self")(x, keep, dropout)
        x = self.attention.output(attended, x, dropout)
        return self.output(F.gelu(self.intermediate.dense(x)), x, dropout)


class TextTop(nn.Module):
    """The encoder's top layers and pooling, over cached token states (ragged: one run of tokens per item)."""

    def __init__(self, dim: int, layers: int, heads: int, inner_dim: int, pooling: str = "cls", eps: float = 1e-12,
                 dropout: float = 0.1, chunk_tokens: int = 4096) -> None:
        """
        Args:
            dim, heads, inner_dim, eps: the encoder's hidden size, attention heads, feed-forward size and
                LayerNorm epsilon (the layers' weights come from it: ``load_layers``).
            layers: how many of the encoder's last layers train (``k``).
            pooling: ``cls`` (the first token) or ``mean`` (over non-padding tokens), as the frozen features.
            dropout: BERT's hidden and attention dropout while training.
            chunk_tokens: padded tokens run at a time. Items go in order of length, a chunk as many as fit
                (an item longer than this alone), so a chunk pads to little even where a few texts are
                long: a fixed count of items padded to its longest ran ~6x the tokens a step needs on Games.
        """
        super().__init__()
        if layers < 1:
            raise ValueError(f"a text top has at least one layer, got {layers}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, inner_dim, eps, dropout) for _ in range(layers))
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.pooling, self.chunk_tokens, self.dim = pooling, chunk_tokens, dim
        # False until the encoder's own weights (or a checkpoint's) are in: a fit loads them once, a
        # resumed or pretrained start keeps what it loaded
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.flat: torch.Tensor | None = None  # (tokens, dim) float16 token states, memory-mapped; data
        self.offsets: torch.Tensor | None = None  # (items + 2,) int64: item i's tokens are flat[offsets[i]:offsets[i+1]]

    def load_layers(self, states: list[dict[str, torch.Tensor]]) -> None:
        """The encoder's last ``k`` layers' weights (``BertLayer.state_dict()`` each, lowest first)."""
        if len(states) != len(self.layers):
            raise ValueError(f"{len(states)} layer weights for a top of {len(self.layers)} layers")
        for layer, state in zip(self.layers, states):
            layer.load_state_dict(state, strict=True)
        self.initialised.fill_(True)

    def set_states(self, flat: torch.Tensor, offsets: torch.Tensor) -> None:
        """Install the frozen layers' token states: ``flat`` (tokens, dim), ``offsets`` (items + 2,) with item 0
        (padding) empty."""
        if flat.ndim != 2 or flat.shape[1] != self.dim:
            raise ValueError(f"token states have shape {tuple(flat.shape)}, expected (tokens, {self.dim})")
        if offsets.ndim != 1 or len(offsets) < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != len(flat):
            raise ValueError(f"token state offsets must run from 0 to {len(flat)}, one more than the items")
        self.flat, self.offsets = flat, offsets.to(torch.long)

    @property
    def num_rows(self) -> int:
        """Items with token states, padding included."""
        return 0 if self.offsets is None else len(self.offsets) - 1

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Vectors of the items ``ids`` (U,) from their cached token states -> (U, dim); the padding item and
        any item without tokens get zeros."""
        if self.flat is None:
            raise RuntimeError("the text top has no token states: call set_states first")
        ids = ids.cpu()
        lengths = self.offsets[ids + 1] - self.offsets[ids]
        device = self.layers[0].output.dense.weight.device
        out = torch.zeros(len(ids), self.dim, device=device)
        order = torch.argsort(lengths, stable=True)
        order = order[lengths[order] > 0]
        parts = []
        for rows in self._chunks(order, lengths[order]):
            length = int(lengths[rows].max())
            steps = torch.arange(length)
            keep = steps < lengths[rows].unsqueeze(1)  # (R, T)
            index = torch.where(keep, self.offsets[ids[rows]].unsqueeze(1) + steps, 0)
            states = self.flat[index].to(device, torch.float32) * keep.unsqueeze(-1).to(device)
            parts.append((rows.to(device), self(states, keep.to(device))))
        if parts:  # one scatter, so autograd keeps a single graph per chunk
            rows = torch.cat([r for r, _ in parts])
            out = out.index_copy(0, rows, torch.cat([v for _, v in parts]))
        return out

    def _chunks(self, order: torch.Tensor, sorted_lengths: torch.Tensor) -> list[torch.Tensor]:
        """``order`` (rows by ascending length) cut so that each chunk's rows x its longest <= ``chunk_tokens``."""
        chunks, start, lengths = [], 0, sorted_lengths.tolist()
        for end, length in enumerate(lengths):
            if end > start and (end - start + 1) * length > self.chunk_tokens:
                chunks.append(order[start:end])
                start = end
        if start < len(lengths):
            chunks.append(order[start:])
        return chunks

    def forward(self, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Padded token states (U, T, dim) with ``keep`` (U, T) -> pooled vectors (U, dim)."""
        for layer in self.layers:
            states = layer(states, keep)
        if self.pooling == "cls":
            return states[:, 0]
        weights = keep.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """Every item's vector, padding row included (items + 1, dim), in evaluation mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self.encode(torch.arange(self.num_rows))
        finally:
            self.train(was_training)

