"""SeqRecModule: next-item training with full softmax, full-ranking evaluation."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from unisrec_x.data.sequences import SeqBatch
from unisrec_x.errors import DataError
from unisrec_x.lit.checkpoint import load_pretrained
from unisrec_x.lit.guards import check_finite
from unisrec_x.losses import next_item_loss
from unisrec_x.metrics import RankingMetrics
from unisrec_x.model.unisrec import UniSRec


class SeqRecModule(pl.LightningModule):
    """Trains any ``UniSRec`` variant (SASRec-ID, inductive, transductive) on next-item prediction."""

    def __init__(self, net: UniSRec, ks: list[int] | None = None, pretrained: str | None = None,
                 freeze_encoder: bool = False) -> None:
        """
        Args:
            net: the model; architecture arguments live on it, declared once for all stages.
            ks: cut-offs for Recall/NDCG/MRR/Hit (default 10 and 50).
            pretrained: checkpoint of a pretrained model to start from (its item-ID embedding, if any, is not used).
            freeze_encoder: keep the sequence encoder (Transformer, positions) fixed and train only the
                adapter (and ID embedding): the paper's parameter-efficient fine-tuning.
        """
        super().__init__()
        self.save_hyperparameters()
        self.net = net
        if pretrained:
            load_pretrained(net, pretrained)
        if freeze_encoder:
            net.encoder.requires_grad_(False)
        self.metrics = RankingMetrics(ks or [10, 50])
        self._eval_table: torch.Tensor | None = None

    @property
    def datamodule(self):
        """The trainer's DataModule, or ``None`` outside a trainer (e.g. in unit tests)."""
        return getattr(self._trainer, "datamodule", None)

    def setup(self, stage: str) -> None:
        if self.net.use_text and self.datamodule is not None:
            self.net.set_item_features(self.datamodule.item_features)

    def training_step(self, batch: SeqBatch, batch_idx: int) -> torch.Tensor:
        table = self.net.item_table()  # (N + 1, D), once per step
        seq_repr = self.net.encode_sequences(batch.item_seq, batch.seq_len, table)
        loss = next_item_loss(self.net.score(seq_repr, table), batch.target)
        check_finite(loss, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch.target))
        return loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another shape with a message naming the sizes, not a torch traceback."""
        own = self.state_dict()
        for key, value in checkpoint.get("state_dict", {}).items():
            if key in own and own[key].shape != value.shape:
                what = "item count" if "item_embedding" in key else "dimensions"
                raise DataError(f"checkpoint has another {what}: {key} is {tuple(value.shape)} there, "
                                 f"{tuple(own[key].shape)} in this model (data: {self.net.num_items} items)")

    def _eval_step(self, batch: SeqBatch) -> None:
        if self._eval_table is None:  # item vectors do not change during an evaluation pass
            self._eval_table = self.net.item_table()
        seq_repr = self.net.encode_sequences(batch.item_seq, batch.seq_len, self._eval_table)
        self.metrics.update(self.net.score(seq_repr, self._eval_table), batch.target - 1)

    def _eval_end(self, prefix: str) -> None:
        values = self.metrics.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=False, sync_dist=True)
        self.metrics.reset()
        self._eval_table = None

    def validation_step(self, batch: SeqBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: SeqBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
