"""Views for the sequence-sequence contrastive task (UniSRec Sec. 3.3). Pure functions."""

from __future__ import annotations

import random

import torch


def item_drop(item_seq: torch.Tensor, seq_len: torch.Tensor, keep_prob: float = 0.8,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each item with ``keep_prob`` (always the first), close the gaps, keep right padding.

    item_seq (B, L), seq_len (B,) -> (B, L) view and its lengths (>= 1).
    """
    batch, length = item_seq.shape
    positions = torch.arange(length, device=item_seq.device)
    valid = positions < seq_len.unsqueeze(1)
    keep = (torch.rand(batch, length, generator=generator, device=item_seq.device) < keep_prob) & valid
    keep[:, 0] = True  # a view is never empty and starts where the history starts
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept items first, in order
    view = torch.where(keep.gather(1, order), item_seq.gather(1, order), 0)
    return view, keep.sum(dim=1)


def word_drop_positions(seq_len: torch.Tensor, length: int, swap_prob: float = 0.2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) mask of history positions whose text vector is swapped for its word-dropped version."""
    positions = torch.arange(length, device=seq_len.device)
    draw = torch.rand(len(seq_len), length, generator=generator, device=seq_len.device) < swap_prob
    return draw & (positions < seq_len.unsqueeze(1))


def drop_words(text: str, drop_prob: float, rng: random.Random) -> str:
    """The text with each word removed with ``drop_prob`` (never all of them)."""
    words = text.split()
    kept = [w for w in words if rng.random() >= drop_prob]
    return " ".join(kept or words[:1])
