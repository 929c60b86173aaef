"""Callbacks (and the checkpoint writer) that keep long runs trustworthy: exact resume, checkpoints that are
whole or absent, and a stop on non-finite losses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from unisrec_x.runtime.paths import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a sibling file, syncs it and renames it into place. Lightning's own writer goes
    through a temporary file under the system's temp folder and *copies* it over when that is another file system,
    so a kill mid-copy left a truncated ``last.ckpt`` (and an hour-long run started over); a killed write here
    leaves the previous checkpoint whole and only a ``.<name>.tmp-<pid>`` file beside it (removed when the experiment
    runner resumes the run). Remote paths (``s3://...``) go through Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's writer, as Lightning's
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


class RNGStateCheckpoint(pl.Callback):
    """Saves the torch RNG state in checkpoints so dropout, gate noise and item drop continue
    exactly where an interrupted run left off (a tensor: safe under ``weights_only``)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


class ResumingModelCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state, and that keeps the run's
    best score when a resumed run logs into a new folder.

    ``--ckpt_path`` resumes into a new ``version_N`` folder, and Lightning then drops the best score
    so far ("dirpath has changed"): the first validation after the resume counts as best even when
    it only ties an earlier one, so the test would run on other weights than an uninterrupted run's.
    The checkpoint is of this very run, so its scores are kept. Files in the old folder are never
    deleted (Lightning removes only files inside the current one, and never the one resumed from).
    """

    #: also rewrite ``last.ckpt`` every this many training steps (``--last_every_n_steps``): a run whose
    #: validations are hours apart (a pretraining with a trained text top on a CPU) then loses minutes to a kill
    last_every_n_steps: int | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (self.last_every_n_steps and trainer.global_step % self.last_every_n_steps == 0
                and not _validates_after_this_batch(trainer)):
            saved_step = self._last_global_step_saved
            self._refresh_last(trainer)
            # Lightning saves once per step: a validation at this very step (should the test above not know)
            # would otherwise keep neither its best checkpoint nor its state in last.ckpt
            self._last_global_step_saved = saved_step

    # Lightning (2.6) rewrites last.ckpt only when a top-k checkpoint was saved at the same step, so
    # after a validation that does not improve, last.ckpt is stale and a resume loses that work.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped if saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class KeptWeights(ModelCheckpoint):
    """Weights kept every ``every_n_train_steps`` steps, never deleted (``--keep_every_n_steps``). ``last.ckpt``
    is written a moment before a kept file at the same step; a run killed in between resumes at that step, so
    the kept file is written then, at the start of the resumed run (its state is exactly that step's)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        step = trainer.global_step
        if step and self._every_n_train_steps and step % self._every_n_train_steps == 0 and self.dirpath:
            path = Path(self.format_checkpoint_name({"step": torch.tensor(step)}))
            if not path.exists():
                trainer.save_checkpoint(path, weights_only=True)


def _validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether a validation follows this training batch (Lightning's own test, private in 2.6). Its save covers
    the step; a ``last.ckpt`` written just before it would make a run killed during it resume past it (Lightning
    counts a checkpoint taken at a batch's end as "that step's validation is done")."""
    try:
        return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except AttributeError:  # another Lightning: save anyway (the step then resumes without that validation)
        return False


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the last good checkpoint is left untouched."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop before a NaN/inf loss reaches the weights (called ahead of backward)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss is {value} at global step {step}; stopping before it corrupts the weights. "
            "The last checkpoint on disk is from before this step (try a lower learning rate).")
