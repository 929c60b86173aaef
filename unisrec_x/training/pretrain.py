"""PretrainModule: UniSRec's two contrastive tasks on merged multi-domain sequences."""

from __future__ import annotations

from typing import Literal

import torch

from unisrec_x.data.augment import item_drop, word_drop_positions
from unisrec_x.data.positions import PositionBatch
from unisrec_x.data.sequences import SeqBatch
from unisrec_x.training.guards import check_finite
from unisrec_x.training.module import SeqRecModule
from unisrec_x.objectives.losses import info_nce
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.objectives.sampled_softmax import sampled_softmax_loss


class PretrainModule(SeqRecModule):
    """Sequence-item + lambda * sequence-sequence InfoNCE (UniSRec Eq. 7-9).

    Evaluation (full ranking on the sources' valid rows) is inherited: it monitors transfer-free
    next-item quality while pretraining.

    With position-wise batches the sequence-item task has a query at every target position,
    against the batch's targets; the sequence-sequence task compares each window's full history
    (its last position) with its augmented view, once per window.
    """

    def __init__(self, net: UniSRec, lambda_seq_seq: float = 1e-3, item_drop_view_prob: float = 0.9,
                 item_keep_prob: float = 0.8, word_swap_prob: float = 0.2, ks: list[int] | None = None,
                 negatives: int = 0, encoder_chunk_tokens: int | None = None,
                 text_fresh: Literal["targets", "batch"] = "targets", text_refresh_steps: int = 50,
                 text_top_lr: float = 3e-5, text_fresh_max: int | None = None,
                 text_straight_through: bool = False) -> None:
        """
        Args:
            net: a text-only UniSRec (item IDs do not transfer across domains).
            lambda_seq_seq: weight of the sequence-sequence task.
            item_drop_view_prob: a view drops items with this probability, else swaps in word-dropped texts.
            item_keep_prob: each item survives item drop with this probability (the first always does).
            word_swap_prob: share of positions whose text vector is swapped in a word-drop view.
            ks: evaluation cut-offs.
            negatives: 0 (UniSRec): the sequence-item task ranks each target against the batch's other
                targets only. More: also against this many items drawn uniformly from every source's
                catalog, with the log-Q correction of the sampled loss (``SeqRecModule``), so that
                popular items, frequent in-batch negatives, are not pushed down.
            encoder_chunk_tokens: bound on the positions encoded at once (``SeqRecModule``). Off by
                default: here chunks are checkpointed (recomputed in backward), as the sequence-sequence
                task couples a batch's rows; set it for sources with long histories.
            text_fresh, text_refresh_steps, text_top_lr, text_fresh_max, text_straight_through: with a text top,
                as in ``SeqRecModule``.
        """
        if net.use_item_id or net.use_codes:
            raise ValueError("pretraining transfers through text: use a UniSRec with use_item_id=False and use_codes=False "
                             "(IDs and codes mean nothing in another domain)")
        if net.popularity_prior:
            raise ValueError("pretraining merges domains, whose item counts mean nothing in a target domain: use "
                             "popularity_prior=False here and turn it on for the fine-tune (its counts start from its own data)")
        if net.text_top is not None and lambda_seq_seq > 0 and item_drop_view_prob < 1:
            raise ValueError("word-drop views swap in frozen-encoder vectors, which a text top replaces: with "
                             "text_top_layers > 0 set item_drop_view_prob=1 (item-drop views only) or lambda_seq_seq=0")
        super().__init__(net, ks, loss="sampled" if negatives > 0 else "full", num_negatives=negatives,
                         encoder_chunk_tokens=encoder_chunk_tokens, text_fresh=text_fresh,
                         text_refresh_steps=text_refresh_steps, text_top_lr=text_top_lr, text_fresh_max=text_fresh_max,
                         text_straight_through=text_straight_through)
        self.save_hyperparameters()
        self.register_buffer("word_drop_features", torch.zeros(0), persistent=False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        needs_word_drop = self.hparams.lambda_seq_seq > 0 and self.hparams.item_drop_view_prob < 1
        if needs_word_drop and self.datamodule is not None:
            self.word_drop_features = self.datamodule.word_drop_features.to(self.device)

    def view(self, batch: SeqBatch | PositionBatch, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented history vectors (B, L, D) and lengths: item drop for most rows, word drop for the rest."""
        dropped, dropped_len = item_drop(batch.item_seq, batch.seq_len, self.hparams.item_keep_prob)
        emb = table[dropped]
        if self.word_drop_features.numel() == 0:
            return emb, dropped_len
        swap = word_drop_positions(batch.seq_len, batch.item_seq.shape[1], self.hparams.word_swap_prob)
        word_dropped = self.net.adapter(self.word_drop_features[batch.item_seq])  # (B, L, plm) -> (B, L, D)
        word_emb = torch.where(swap.unsqueeze(-1), word_dropped, table[batch.item_seq])
        use_item_drop = torch.rand(len(batch.seq_len), device=emb.device) < self.hparams.item_drop_view_prob
        emb = torch.where(use_item_drop.view(-1, 1, 1), emb, word_emb)
        return emb, torch.where(use_item_drop, dropped_len, batch.seq_len)

    def training_step(self, batch: SeqBatch | PositionBatch, batch_idx: int) -> torch.Tensor:
        with self.fresh_text(batch):
            return self._training_loss(batch)

    def _training_loss(self, batch: SeqBatch | PositionBatch) -> torch.Tensor:
        # Both tasks read only the batch's histories, targets (and negatives): adapt those items, not the catalog.
        sampled = self.loss == "sampled"
        if sampled and self.sampler is None:
            raise RuntimeError("negatives > 0 needs item popularity: train through a SeqRecDataModule "
                               "(or call set_training_targets)")
        negatives = self.sampler.sample(batch.target.device) if sampled else batch.target.new_zeros(0)
        table = self.net.partial_item_table(torch.unique(torch.cat([batch.item_seq.flatten(), batch.target.flatten(),
                                                                    negatives])))
        seq_repr, target = self.training_queries(batch, table[batch.item_seq])  # (M, D), (M,)
        temperature = self.net.temperature
        if not sampled:
            # Rows that share a next item are not negatives of each other in either task.
            loss_seq_item = info_nce(seq_repr, table[target], temperature, same_target=target)
        else:
            candidates = torch.cat([target, negatives])
            logits = self.net.query_vectors(seq_repr) @ self.net.candidate_vectors(table[candidates], candidates).T
            loss_seq_item = sampled_softmax_loss(logits, candidates, target,
                                                 self.sampler.log_expected_count(candidates, len(target)))
        loss = loss_seq_item
        if self.hparams.lambda_seq_seq > 0:
            # each row's last target: its whole history (every row of a prefix batch)
            last = (batch.target > 0).sum(1).cumsum(0) - 1 if isinstance(batch, PositionBatch) else slice(None)
            view_emb, view_len = self.view(batch, table)
            loss_seq_seq = info_nce(seq_repr[last], self.encode_training_histories(view_emb, view_len), temperature,
                                    same_target=target[last])
            loss = loss + self.hparams.lambda_seq_seq * loss_seq_seq
            self.log("train/seq_seq", loss_seq_seq, batch_size=len(batch.seq_len))
        check_finite(loss, self.global_step)
        self.log("train/seq_item", loss_seq_item, batch_size=len(target))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss
