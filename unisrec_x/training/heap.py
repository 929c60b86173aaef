"""HeapTrim: hand freed heap back to the system when the resident set has grown, and after each evaluation."""

from __future__ import annotations

import os

import lightning.pytorch as pl

from unisrec_x.runtime.allocator import trim_heap

#: growth of the resident set (over its level one step after the last trim) that triggers a trim
GROWTH_MB = 128
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float | None:
    """This process's resident set in MB (``/proc/self/statm``, ~10 us); ``None`` where there is no procfs."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return None


class GrowthTrim:
    """Trims the heap once the resident set has grown ``growth_mb`` past its *warm* level.

    The warm level is the resident set one step after a trim: the live tensors plus the freed
    activations that every step reuses. Trimming those away each step costs their page faults
    again the next step (20-25% of training throughput on Scientific); what needs returning is the
    slow creep of fragments between live blocks (0.5 -> 1.2 GB over 5 epochs untrimmed). So the
    resident set *between steps* stays within ``growth_mb`` of the warm level (a step's own peak comes
    on top), and steps without creep cost one read of ``/proc/self/statm``. Without procfs it trims
    every step.
    """

    def __init__(self, growth_mb: float = GROWTH_MB) -> None:
        self.growth_mb = growth_mb
        self.warm_mb: float | None = None
        self.trims = 0

    def after_step(self) -> bool:
        """Call after each training step; ``True`` when it trimmed."""
        rss = resident_mb()
        if rss is None or (self.warm_mb is not None and rss > self.warm_mb + self.growth_mb):
            self.reset()
            return True
        if self.warm_mb is None:
            self.warm_mb = rss
        return False

    def reset(self) -> None:
        """Trim now; the next step sets the warm level again."""
        trim_heap()
        self.trims += 1
        self.warm_mb = None


class HeapTrim(pl.Callback):
    """Bounds the resident set of a long fit under the CLI's fixed mmap threshold (``allocator.py``).

    Training steps trim by growth (``GrowthTrim``); validation and test end with a trim, since
    their batches (full-catalog score matrices) leave blocks that training does not reuse.
    """

    def __init__(self, growth_mb: float = GROWTH_MB) -> None:
        self.policy = GrowthTrim(growth_mb)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.policy.after_step()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.reset()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.reset()
