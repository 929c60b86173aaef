"""Exact micro-batching inside one optimiser step: bounded activation memory, no recomputation.

Training batches hold a fixed number of *targets*, not positions: on Scientific a batch of late
windows of long sequences (a few new targets each, all 50 positions encoded) held 25k positions
against ~8k for a batch of first windows, and its activations set the process's peak memory.
A next-item loss is a mean over targets, each depending on its own rows and on the item table
only, so the batch can be run in row chunks, each chunk's backward right after its forward, with
the chunks' gradients summed: the step's gradient is the whole batch's. Lightning's automatic
optimisation owns ``backward`` (and zeroes gradients between ``training_step`` and it), so the
summed gradients are handed back as a surrogate loss whose value is the batch's loss and whose
gradient is the sum; the item table, computed once per step, is backpropagated once through it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def micro_batched_loss(chunk_loss_sum: Callable[[slice, torch.Tensor], torch.Tensor], rows: int, chunk_rows: int,
                       shared: torch.Tensor, params: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """The mean loss over ``count`` targets, computed ``chunk_rows`` batch rows at a time.

    Args:
        chunk_loss_sum: (row slice, shared) -> the summed loss of the targets in those rows, computed
            from ``shared`` as given (a detached copy here) and from ``params``.
        rows: batch rows.
        chunk_rows: rows per chunk.
        shared: a tensor every chunk reads (the item table), with its autograd graph.
        params: parameters the chunks use directly (others are reached through ``shared``).
        count: targets in the batch (the mean's denominator).

    Returns:
        A scalar equal to ``sum over chunks / count``; its backward gives every parameter the
        gradient the unchunked loss would, running ``shared``'s graph once. Not for float16 loss
        scaling: the chunks' gradients are taken unscaled (``SeqRecModule`` does not micro-batch then).
    """
    leaf = shared.detach().requires_grad_(shared.requires_grad)
    inputs = ([leaf] if leaf.requires_grad else []) + list(params)  # what the chunks are differentiated by
    originals = ([shared] if leaf.requires_grad else []) + list(params)  # what their gradients belong to
    grads: list[torch.Tensor | None] = [None] * len(inputs)
    value = torch.zeros((), device=shared.device)
    for start in range(0, rows, chunk_rows):
        part = chunk_loss_sum(slice(start, start + chunk_rows), leaf) / count
        if not part.requires_grad:  # no targets in these rows
            continue
        for i, grad in enumerate(torch.autograd.grad(part, inputs, allow_unused=True)):
            if grad is not None:  # summed in float32: a bfloat16 table's chunks would lose precision
                grads[i] = grad.float() if grads[i] is None else grads[i] + grad.float()
        value = value + part.detach()
    pairs = [(x, g) for x, g in zip(originals, grads) if g is not None]
    if not pairs:
        return value
    surrogate = sum((x.float() * g).sum() for x, g in pairs)  # d/dx = g
    return value + (surrogate - surrogate.detach())  # exactly `value`
