"""AlignModule: CTRL's first stage for SASRec-ID, an ID model aligned with a text model on the same histories.

CTRL (Li et al., 2023) aligns a collaborative (ID) model with a language model by contrastive learning on the
same samples, then fine-tunes the ID model alone and serves it without the language model. Here the ID model is
a SASRec-ID ``UniSRec`` (``net``) and the text model a text ``UniSRec`` over the frozen encoder's vectors
(``text_net``), built from ``net``'s arguments (sizes linked from the data, architecture declared once) with the
text view's own (``text_net_args``). Each step pulls the two views together, both ways (``symmetric_info_nce``):

- sequences: each history's vector from either net, against the batch's other histories (rows that share a
  next item are not each other's negatives), and
- items: each of the batch's items' vectors from either net, against the batch's other items; or
  (``align_items="catalog"``) as many items drawn from the whole catalog, so that items no training
  history holds (most of the catalog when few users train) get an ID vector placed by their text too.

The ID model is ``net``, so the checkpoint's ``net.*`` weights and ``hyper_parameters.net`` are a plain
SASRec-ID: the fine-tune reads them (``SeqRecModule(pretrained=..., pretrained_same_domain=True)``) and serving
reads an aligned checkpoint as any SASRec-ID; the text model's weights sit under ``text_net.*`` and go no
further. Validation is the ID model's next-item ranking (inherited, so early stopping and checkpointing work as
everywhere), plus ``val/align_seq``: the sequence term on the validation histories, how close the views are.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from unisrec_x.data.positions import PositionBatch
from unisrec_x.data.sequences import SeqBatch
from unisrec_x.evaluation.ranking import DEFAULT_CHUNK
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.objectives.losses import symmetric_info_nce
from unisrec_x.training.checkpoint import load_pretrained
from unisrec_x.training.guards import check_finite
from unisrec_x.training.module import SeqRecModule


class AlignModule(SeqRecModule):
    """Sequence- and item-level InfoNCE between an ID model and a text model (CTRL's alignment stage)."""

    def __init__(self, net: UniSRec, text_net_args: dict[str, Any] | None = None, temperature: float = 0.07,
                 sequence_weight: float = 1.0, item_weight: float = 1.0, next_item_weight: float = 0.0,
                 align_items_max: int | None = 4096, align_items: Literal["batch", "catalog"] = "batch",
                 text_pretrained: str | None = None, freeze_text_net: bool = False,
                 ks: list[int] | None = None, eval_chunk_size: int = DEFAULT_CHUNK, loss_chunk_rows: int = 4096,
                 encoder_chunk_tokens: int | None = 4096) -> None:
        """
        Args:
            net: the ID model: a ``UniSRec`` with ``use_item_id`` and nothing read from text (``use_text``,
                ``use_codes`` and ``knowledge_fields`` off), so that the model served needs no text.
            text_net_args: ``UniSRec`` arguments where the text model differs from ``net`` (e.g.
                ``{last_item_residual: true, n_experts: 4}``). It is ``net``'s architecture made the text view
                (``TEXT_VIEW``: text alone, cosine, no popularity prior), reading the frozen encoder's vectors of the
                same data; its sizes from the data and ``hidden_dim`` (the views are compared vector to vector)
                are ``net``'s.
            temperature: of both InfoNCE terms (logits are cosine / temperature).
            sequence_weight: weight of the sequence-level term.
            item_weight: weight of the item-level term.
            next_item_weight: weight of the ID model's usual next-item loss (full softmax) added to the
                alignment. 0 (CTRL): the alignment alone; next-item training is the fine-tune's.
            align_items_max: the item term takes at most this many of the batch's items (a random draw), bounding
                its items x items logits; ``None``: all of them.
            align_items: whose items the item term aligns: the ``batch``'s (CTRL: the samples' own), or the
                ``catalog``'s: a random draw of ``align_items_max`` items of the whole catalog each step
                (``None``: every item), interacted with or not.
            text_pretrained: start the text model from this checkpoint (a text UniSRec, e.g. pretrained on other
                domains by ``configs/pretrain/pretrain.yaml``); default: a random adapter and Transformer.
            freeze_text_net: keep the text model fixed (no gradient, no dropout): only the ID model moves toward
                it. Default: both train, as CTRL trains its language model during the alignment.
            ks, eval_chunk_size, loss_chunk_rows, encoder_chunk_tokens: as in ``SeqRecModule``.
        """
        if not net.use_item_id or net.use_text or net.use_codes or net.knowledge is not None:
            raise ValueError("net is the ID model that is served without text: use a UniSRec with use_item_id=True and "
                             "use_text=False, use_codes=False, knowledge_fields=None (SASRec-ID)")
        weights = {"sequence_weight": sequence_weight, "item_weight": item_weight, "next_item_weight": next_item_weight}
        if any(w < 0 for w in weights.values()) or not sequence_weight + item_weight > 0:
            raise ValueError(f"loss weights must be >= 0 with sequence_weight + item_weight > 0, got {weights}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if align_items not in ("batch", "catalog"):
            raise ValueError(f"align_items must be 'batch' or 'catalog', got {align_items!r}")
        if align_items_max is not None and align_items_max < 2:
            raise ValueError(f"align_items_max must be at least 2 (or None: all), got {align_items_max}")
        super().__init__(net, ks, eval_chunk_size=eval_chunk_size, loss_chunk_rows=loss_chunk_rows,
                         encoder_chunk_tokens=encoder_chunk_tokens)
        self.save_hyperparameters()
        self.text_net = text_model(net, text_net_args or {})
        if text_pretrained:
            load_pretrained(self.text_net, text_pretrained)
        if freeze_text_net:
            self.text_net.requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.datamodule is not None:
            self.install_item_inputs(self.text_net)

    def training_step(self, batch: SeqBatch | PositionBatch, batch_idx: int) -> torch.Tensor:
        if self.hparams.freeze_text_net:
            self.text_net.eval()  # a fixed target: Lightning puts every submodule in training mode
        id_table, text_table, items = self.tables(batch)
        loss_seq = self.sequence_alignment(batch, id_table, text_table)
        loss_item = self.item_alignment(id_table, text_table, items)
        loss = self.hparams.sequence_weight * loss_seq + self.hparams.item_weight * loss_item
        if self.hparams.next_item_weight > 0:
            loss_next = self._full_loss(batch, id_table)
            loss = loss + self.hparams.next_item_weight * loss_next
            self.log("train/next_item", loss_next, batch_size=int((batch.target > 0).sum()))
        check_finite(loss, self.global_step)
        self.log("train/align_seq", loss_seq, batch_size=len(batch.seq_len))
        self.log("train/align_item", loss_item, batch_size=len(items))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch.seq_len))
        return loss

    def tables(self, batch: SeqBatch | PositionBatch, for_items: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ID model's item table (N + 1, D), the text model's with only the rows the step needs filled
        (N + 1, D), and the items the item term aligns (U,): the batch's (padding left out), or with
        ``align_items="catalog"`` a catalog draw, whose rows are filled only ``for_items`` (the sequence
        term alone, as validation takes it, needs the batch's rows only)."""
        ids = torch.unique(torch.cat([batch.item_seq.flatten(), batch.target.flatten()]))
        items = ids[ids > 0]
        if for_items and self.hparams.align_items == "catalog":
            items = self.catalog_draw(ids.device)
            ids = torch.unique(torch.cat([ids, items]))
        text_table = self.text_net.partial_item_table(ids)  # only the items the step touches go through the adapter
        return self.net.item_table(), text_table, items

    def catalog_draw(self, device: torch.device) -> torch.Tensor:
        """``align_items_max`` distinct items of the whole catalog (every item where that is ``None`` or more)."""
        count, limit = self.net.num_items, self.hparams.align_items_max
        if limit is None or limit >= count:
            return torch.arange(1, count + 1, device=device)
        return torch.randperm(count, device=device)[:limit] + 1

    def sequence_alignment(self, batch: SeqBatch | PositionBatch, id_table: torch.Tensor,
                           text_table: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between the two models' vectors of each row's whole history (a window's last
        position); rows sharing the next item after it are masked as false negatives."""
        id_seq = self.encode_training_histories(id_table[batch.item_seq], batch.seq_len)  # (B, D)
        text_seq = self.encode_training_histories(text_table[batch.item_seq], batch.seq_len, self.text_net)
        return symmetric_info_nce(id_seq, text_seq, self.hparams.temperature, same_target=last_targets(batch))

    def item_alignment(self, id_table: torch.Tensor, text_table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between the two models' vectors of the batch's items (at most ``align_items_max``)."""
        limit = self.hparams.align_items_max
        if limit is not None and len(items) > limit:
            items = items[torch.randperm(len(items), device=items.device)[:limit]]
        return symmetric_info_nce(id_table[items], text_table[items], self.hparams.temperature)

    def validation_step(self, batch: SeqBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        id_table, text_table, _ = self.tables(batch, for_items=False)
        self.log("val/align_seq", self.sequence_alignment(batch, id_table, text_table), batch_size=len(batch.seq_len))


#: what makes the text model the text view of ``net``'s items, and what it must share with ``net``
TEXT_VIEW = dict(use_text=True, use_item_id=False, use_codes=False, knowledge_fields=None, similarity="cosine",
                 memory_dropout=0.0, memory_scale=1.0, popularity_prior=False, popularity_weight=0.0)
SHARED = ("num_items", "plm_dim", "hidden_dim")


def text_model(net: UniSRec, overrides: dict[str, Any]) -> UniSRec:
    """The text model: ``net``'s arguments, made the text view (``TEXT_VIEW``), with ``overrides`` on top."""
    fixed = sorted(set(overrides) & (set(TEXT_VIEW) | set(SHARED) | {"text_top_layers"}))
    unknown = sorted(set(overrides) - set(net.init_args))
    problems = [f"cannot set {fixed}"] * bool(fixed) + [f"unknown UniSRec arguments {unknown}"] * bool(unknown)
    if problems:
        raise ValueError(f"text_net_args: {'; '.join(problems)} (the text view's sizes are net's, its items come from "
                         "text alone, and a trainable text top is not supported here yet)")
    return UniSRec(**{**net.init_args, **TEXT_VIEW, **overrides})


def last_targets(batch: SeqBatch | PositionBatch) -> torch.Tensor:
    """The item after each row's whole history (B,): a prefix row's target, a window's last position's."""
    if isinstance(batch, PositionBatch):
        return batch.target.gather(1, (batch.seq_len - 1).unsqueeze(1)).squeeze(1)
    return batch.target
