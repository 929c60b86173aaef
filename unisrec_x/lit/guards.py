"""Callbacks that keep long runs trustworthy: exact resume and a stop on non-finite losses."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch


class RNGStateCheckpoint(pl.Callback):
    """Saves the torch RNG state in checkpoints so dropout, gate noise and item drop continue
    exactly where an interrupted run left off (a tensor: safe under ``weights_only``)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the last good checkpoint is left untouched."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop before a NaN/inf loss reaches the weights (called ahead of backward)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss is {value} at global step {step}; stopping before it corrupts the weights. "
            "The last checkpoint on disk is from before this step (try a lower learning rate).")
