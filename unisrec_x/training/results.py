"""Write a run's test metrics as JSON next to its logs, atomically."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

from unisrec_x.runtime.paths import atomic_write_bytes

log = logging.getLogger(__name__)


def run_dir(trainer: pl.Trainer) -> Path:
    """The logger's version folder (where metrics.csv lives), or the root dir without a logger."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def peak_rss_mb() -> int:
    """Peak resident memory of this process so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024)


def best_validation(trainer: pl.Trainer) -> dict[str, float] | None:
    """The monitored validation score of the best epoch (what early stopping chose on), or ``None`` when nothing
    was fitted: a record keeps it so that choices between settings can be made on validation, never on test."""
    checkpoints = trainer.checkpoint_callback
    score = getattr(checkpoints, "best_model_score", None)
    if score is None or not getattr(checkpoints, "monitor", None):
        return None
    return {checkpoints.monitor: round(float(score), 6)}


class TestMetricsWriter(pl.Callback):
    """After ``test``, writes ``test_metrics.json``: metrics, the checkpoint they came from, timings."""

    def __init__(self, filename: str = "test_metrics.json") -> None:
        self.filename = filename
        self._fit_start: float | None = None
        self.fit_seconds: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            self.fit_seconds = time.perf_counter() - self._fit_start

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k.removeprefix("test/"): round(float(v), 6) for k, v in trainer.callback_metrics.items()
                   if k.startswith("test/")}
        payload = {"metrics": metrics, "checkpoint": trainer.ckpt_path, "epochs_trained": trainer.current_epoch,
                   "best_validation": best_validation(trainer),
                   **({"floor_blend": pl_module.floor_blend_choice} if getattr(pl_module, "floor_blend_choice", None)
                      else {}),
                   "fit_seconds": None if self.fit_seconds is None else round(self.fit_seconds, 1),
                   "peak_rss_mb": peak_rss_mb()}
        path = run_dir(trainer) / self.filename
        atomic_write_bytes(path, json.dumps(payload, indent=2).encode())
        log.info("test metrics written to %s", path)
