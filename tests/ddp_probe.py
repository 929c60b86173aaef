"""A callback the DDP test adds from the command line: records each rank's batches and final weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class BatchProbe(pl.Callback):
    """Writes ``rank<N>.json`` into ``$DDP_PROBE_DIR`` with the targets seen, the data's training targets
    and a weight checksum."""

    def __init__(self) -> None:
        self.targets: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.targets.append(batch.target.tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        out = Path(os.environ["DDP_PROBE_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"targets": self.targets, "weights": flat[:2000].tolist(),
                                   "world_size": trainer.world_size,
                                   "train_targets": trainer.datamodule.examples("train").targets.tolist()}))
