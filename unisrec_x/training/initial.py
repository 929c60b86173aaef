"""The weights a fit starts from, kept as a candidate for the checkpoint that is tested.

Validation is only run after an epoch, so early stopping can only pick a trained state. With little
target data the starting point can be the best one: on Office with 5% of its users, every trained
text arm tested below the *untrained* text model (N@10 0.0291-0.0294 vs 0.0322; docs/results.md),
whose random adapter keeps the text vectors' cosines. ``--select_initial true`` saves the starting
weights (untrained, or pretrained) as ``initial.ckpt`` and, after fit, validates them once: they are
tested instead of the best epoch when no epoch beat them on validation. Test data is never used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger(__name__)
FILENAME = "initial.ckpt"


class InitialWeights(pl.Callback):
    """Saves the weights training starts from (not on a resumed fit, which started long before)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoints = trainer.checkpoint_callback
        if trainer.global_step == 0 and checkpoints is not None and checkpoints.dirpath:
            trainer.save_checkpoint(Path(checkpoints.dirpath) / FILENAME, weights_only=True)


def tested_checkpoint(trainer: pl.Trainer, module: pl.LightningModule, datamodule, monitor: str) -> str | None:
    """The best epoch's checkpoint, or ``initial.ckpt`` when its validation ``monitor`` is at least as high."""
    checkpoints = trainer.checkpoint_callback
    best = checkpoints.best_model_path if checkpoints else ""
    initial = Path(checkpoints.dirpath) / FILENAME if checkpoints and checkpoints.dirpath else None
    if initial is None or not initial.is_file():
        return best or None
    start = trainer.validate(module, datamodule=datamodule, ckpt_path=str(initial), weights_only=True, verbose=False)
    start_score = start[0][monitor]
    best_score = checkpoints.best_model_score
    if best and best_score is not None and float(best_score) > start_score:
        log.info("tested: %s (validation %s %.4f; the starting weights had %.4f)", best, monitor, float(best_score),
                 start_score)
        return best
    log.info("tested: the starting weights %s (validation %s %.4f; no epoch did better%s)", initial, monitor,
             start_score, "" if best_score is None else f": best {float(best_score):.4f}")
    return str(initial)
