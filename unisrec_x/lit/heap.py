"""HeapTrim: hand freed heap back to the system after every training step and each evaluation."""

from __future__ import annotations

import lightning.pytorch as pl

from unisrec_x.allocator import trim_heap

#: training steps between trims (benchmarks/ours.py trims its loops the same way)
EVERY_N_STEPS = 1


def trim_after_step(step: int, every_n_steps: int = EVERY_N_STEPS) -> None:
    """Trim after training step ``step`` (0-based) when it ends a period of ``every_n_steps``."""
    if (step + 1) % every_n_steps == 0:
        trim_heap()


class HeapTrim(pl.Callback):
    """Bounds the resident set of a long fit under the CLI's fixed mmap threshold (``allocator.py``).

    Each trim costs the page faults of re-touching what it released, once per step rather than
    once per tensor (a 128 KiB threshold's cost: 30-40% of a fit's time). Trimming every 4 steps
    let the heap regrow by ~500 MB between trims on Scientific (peak 1,269 MB after 5 epochs).
    """

    def __init__(self, every_n_steps: int = EVERY_N_STEPS) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        trim_after_step(batch_idx, self.every_n_steps)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trim_heap()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trim_heap()
