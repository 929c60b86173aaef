"""Position-wise training examples: one window of a sequence per example, a target at every position.

The prefix scheme (``sequences.SequenceExamples``) encodes a history once per target: a user with
n items is encoded n - 3 times. Under the causal mask the encoder output at position t depends
only on items <= t, so one pass over a window gives every prefix's sequence vector (SASRec's
training). The (history, target) pairs are the prefix scheme's (targets 1..n-3 of each sequence,
each exactly once); only histories longer than ``max_seq_len`` can differ, see ``window_stride``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from unisrec_x.data.sequences import gather_padded

#: ``prefixes``: one example per (history, next item); ``positions``: one per window, a target at every position
TrainingExamples = Literal["prefixes", "positions"]


class PositionBatch(NamedTuple):
    """Windows (right-padded with 0) and the next item at each position (0 = no loss there)."""

    item_seq: torch.Tensor  # (B, L) item ids, 0 = padding after the last item
    seq_len: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, L) next item at each position, 0 = no target (padding, or trained in another window)
    domain: torch.Tensor  # (B,) domain index of each window's sequence


class PositionExamples(torch.utils.data.Dataset):
    """Training windows; indexing with a list of window indices gives a ``PositionBatch``.

    A sequence of n items has train targets at positions 1..T (T = n - 3; the last two items are
    valid and test). Its first window is items 0..min(T, L) - 1 with a target at every position, so
    while T <= L (L = ``max_seq_len``) every target sees exactly the prefix scheme's history. Longer
    sequences get further windows of L items, each ending ``stride`` items after the previous one
    (the last ends at T) and training only the targets the previous windows did not: a target
    there sees between L - stride + 1 and L items of history, where the prefix scheme gives it L.

    Worked example: a sequence of n = 13 items ``s0 .. s12`` with L = 4 and stride 2. The last two
    (s11 valid, s12 test) are held out, so the targets are s1 .. s10, at positions t = 1 .. T = 10
    (n - 3: position t is the target predicted from ``s0 .. s(t-1)``). Windows end at L, L + stride, ...
    and the last at T: ends 4, 6, 8, 10 (``extra`` = ceil((T - L) / stride) = 3 after the first).

    ======  ==================  =====================  ==============================
    window  items (width = 4)   targets trained        history each target sees
    ======  ==================  =====================  ==============================
    0       s0 s1 s2 s3         s1 s2 s3 s4            1, 2, 3, 4 items (= prefixes)
    1       s2 s3 s4 s5         s5 s6                  3, 4 items
    2       s4 s5 s6 s7         s7 s8                  3, 4 items
    3       s6 s7 s8 s9         s9 s10                 3, 4 items
    ======  ==================  =====================  ==============================

    In the code: ``end`` = 4, 6, 8, 10; ``prev_end`` = 0, 4, 6, 8; ``width`` = min(end, L) = 4;
    the window starts at item ``end - width`` (0, 2, 4, 6); ``target_count`` = end - prev_end
    (4, 2, 2, 2) and ``first_target`` = width - target_count (0, 2, 2, 2): positions before it
    were trained by an earlier window. Every target is trained exactly once; ``shortened`` counts
    the 3 whose history (3 items) is shorter than the prefix scheme's (4). A sequence of n <= 3
    items has no training target and no window.
    """

    def __init__(self, sequences: Sequence[np.ndarray], max_seq_len: int = 50, window_stride: int | None = None,
                 domains: Sequence[int] | None = None) -> None:
        """
        Args:
            sequences: full item-id sequences, oldest first.
            max_seq_len: window length L, the longest history.
            window_stride: how far each window after a sequence's first moves on: 1 gives every target
                exactly the prefix scheme's history (one pass per target beyond the first L), L tiles
                the sequence as SASRec does (a window's first target then sees one item). Default
                L // 2: every target sees at least half of L, at ~2 passes per L targets.
            domains: domain index per sequence (all 0 when omitted).
        """
        stride = max(1, max_seq_len // 2) if window_stride is None else window_stride
        if not 1 <= stride <= max_seq_len:
            raise ValueError(f"window_stride must be between 1 and max_seq_len={max_seq_len}, got {stride}")
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        self.items = torch.from_numpy(np.concatenate(sequences) if len(sequences) else np.zeros(0, np.int64))
        starts = np.zeros(len(sequences), dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
        n_targets = np.maximum(lengths - 3, 0)
        usable = np.flatnonzero(n_targets > 0)
        # The first window of each sequence, then `extra` windows ending at L + stride, L + 2 stride, ..., T.
        extra = -(-np.maximum(n_targets[usable] - max_seq_len, 0) // stride)
        seq_idx = np.repeat(usable, 1 + extra)
        k = np.arange(len(seq_idx)) - np.repeat(np.cumsum(1 + extra) - (1 + extra), 1 + extra)  # window number
        total = n_targets[seq_idx]
        end = np.minimum(max_seq_len + k * stride, total)  # last target position of the window
        prev_end = np.where(k > 0, max_seq_len + (k - 1) * stride, 0)
        width = np.minimum(end, max_seq_len)
        self.max_seq_len, self.stride = max_seq_len, stride
        self.seq_idx = torch.from_numpy(seq_idx)
        self.start = torch.from_numpy(starts[seq_idx] + end - width)  # flat position of the window's first item
        self.hist_len = torch.from_numpy(width)  # window length = padded width it needs
        self.first_target = torch.from_numpy(width - (end - prev_end))  # positions before this are not trained here
        self.target_count = torch.from_numpy(end - prev_end)
        # targets with a shorter history than the prefix scheme's: all but the last of each later window
        self.shortened = int((end - prev_end - 1)[k > 0].sum())
        domain_arr = np.zeros(len(sequences), np.int64) if domains is None else np.asarray(domains, np.int64)
        self.domain = torch.from_numpy(domain_arr[seq_idx])
        # Flat positions of every train target (as the prefix scheme's target_index), for item popularity.
        counts = n_targets[usable]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        self.target_index = torch.from_numpy(np.repeat(starts[usable], counts) + within + 1)

    def __len__(self) -> int:
        return len(self.start)

    @property
    def targets(self) -> torch.Tensor:
        """Every train target (M,), the same items as the prefix scheme's: item popularity for sampled softmax."""
        return self.items[self.target_index]

    def __getitem__(self, index: Sequence[int] | torch.Tensor) -> PositionBatch:
        index = torch.as_tensor(index, dtype=torch.long)
        seq_len = self.hist_len[index]
        item_seq, positions, valid = gather_padded(self.items, self.start[index], seq_len)
        offsets = torch.arange(item_seq.shape[1])
        trained = valid & (offsets >= self.first_target[index].unsqueeze(1))
        target = torch.where(trained, self.items[(positions + 1).clamp(max=len(self.items) - 1)], 0)
        return PositionBatch(item_seq, seq_len, target, self.domain[index])
