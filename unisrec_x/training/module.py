"""SeqRecModule: next-item training with full softmax, full-ranking evaluation.

Which path a training step's loss takes is decided in one place, ``SeqRecModule.loss_path``:

============  ===========================================  ==========================================
``loss``      the batch                                    path
============  ===========================================  ==========================================
``sampled``   any                                          ``sampled``: adapt only the items the batch
                                                           touches, sampled softmax with log-Q
                                                           correction (``objectives/sampled_softmax``);
                                                           a batch of more than ``encoder_chunk_tokens``
                                                           positions is encoded in checkpointed chunks
                                                           (``SequenceEncoder.outputs_at``)
``full``      at most ``encoder_chunk_tokens`` positions,  ``whole``: the item table once, one encoder
              or no gradients, or float16 training         pass, the softmax over the catalog
                                                           ``loss_chunk_rows`` targets at a time
                                                           (``objectives/losses``)
``full``      more positions than that                     ``micro_batches``: exact micro-batches, each
                                                           chunk's forward and backward before the next
                                                           (``objectives/microbatch``)
============  ===========================================  ==========================================

``whole`` and ``micro_batches`` give the same loss and gradients, and chunked encoding the same
outputs and gradients as one pass (``tests/test_fast_paths.py``): they differ only in peak memory
and time. ``sampled`` is another loss (for catalogs whose full softmax does not fit).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Literal

import lightning.pytorch as pl
import torch

from unisrec_x.items.codes import CHECKPOINT_KEY, ItemCodes, checked_state
from unisrec_x.data.positions import PositionBatch
from unisrec_x.data.sequences import SeqBatch
from unisrec_x.errors import DataError
from unisrec_x.training.checkpoint import load_pretrained
from unisrec_x.training.guards import check_finite
from unisrec_x.objectives.losses import chunked_next_item_loss
from unisrec_x.evaluation.baselines import training_counts
from unisrec_x.evaluation.metrics import RankingMetrics
from unisrec_x.objectives.microbatch import micro_batched_loss
from unisrec_x.model.seq_encoder import rows_per_chunk
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.evaluation.ranking import DEFAULT_CHUNK, chunked_target_ranks
from unisrec_x.objectives.sampled_softmax import NegativeSampler, NegativeSampling, sampled_softmax_loss

LossPath = Literal["sampled", "whole", "micro_batches"]
#: a fit's checkpoint entry with the text top's table (its items' vectors) and the step it was computed at
TEXT_TABLE_KEY = "text_top_table"


class SeqRecModule(pl.LightningModule):
    """Trains any ``UniSRec`` variant (SASRec-ID, inductive, transductive) on next-item prediction."""

    def __init__(self, net: UniSRec, ks: list[int] | None = None, pretrained: str | None = None,
                 freeze_encoder: bool = False, loss: Literal["full", "sampled"] = "full", num_negatives: int = 1024,
                 negative_sampling: NegativeSampling = "uniform", eval_chunk_size: int = DEFAULT_CHUNK,
                 loss_chunk_rows: int = 4096, encoder_chunk_tokens: int | None = 4096,
                 long_tail_max_count: int | None = 5, text_fresh: Literal["targets", "batch"] = "targets",
                 text_refresh_steps: int = 50, text_top_lr: float = 3e-5, text_fresh_max: int | None = None,
                 text_straight_through: bool = False, pretrained_same_domain: bool = False) -> None:
        """
        Args:
            net: the model; architecture arguments live on it, declared once for all stages.
            ks: cut-offs for Recall/NDCG/MRR/Hit (default 10 and 50).
            pretrained: checkpoint of a pretrained model to start from (its item-ID embedding, if any, is not
                used, unless ``pretrained_same_domain``).
            freeze_encoder: keep the sequence encoder (Transformer, positions) fixed and train only the
                adapter (and ID embedding): the paper's parameter-efficient fine-tuning.
            loss: ``full`` softmax over the catalog, or ``sampled`` (in-batch + ``num_negatives`` negatives,
                log-Q corrected; only the items a batch touches are adapted) for large catalogs.
            num_negatives: extra negatives per step for the sampled loss.
            negative_sampling: ``uniform`` or ``popularity`` negatives for the sampled loss.
            eval_chunk_size: items scored at a time in evaluation (and adapted at a time), bounding memory.
            loss_chunk_rows: full softmax: targets whose logits over the catalog are computed at a time in
                training (position-wise batches have one target per position), bounding memory to
                ``loss_chunk_rows`` x N.
            encoder_chunk_tokens: a training batch of more positions (rows x length) than this is
                encoded at most this many at a time. The full-softmax loss runs exact micro-batches
                (each chunk's backward before the next chunk's forward, ``microbatch.py``); the
                sampled loss and pretraining checkpoint the chunks (``SequenceEncoder.outputs_at``:
                one more forward pass). Same gradients either way, with activation memory bounded
                by the chunk. ``None``: never chunk.
            long_tail_max_count: the test pass also reports ``test/long_tail/*``: the metrics over the rows
                whose target occurs at most this often among the training targets (rare items, where
                text and pretraining should matter most); ``None`` turns it off.
            text_fresh: with a text top (``UniSRec.text_top_layers``), the items whose text vectors a step
                computes through the top, with gradients: the batch's ``targets`` (cheap: the top learns from
                the positives), or every item of the ``batch`` (histories too). The rest read the table.
            text_refresh_steps: with a text top, the table of every item's vector is recomputed every this many
                steps, and before every validation and test pass.
            text_top_lr: with a text top, its layers' learning rate (their own optimizer parameter group).
            text_fresh_max: at most this many fresh items a step, drawn at random from those ``text_fresh`` names
                (the top's cost is linear in them: ~3x a table refresh's per item, benchmarks/README.md);
                ``None``: all of them.
            text_straight_through: with a text top, the fresh items' forward values are the table's, with the
                top's gradients passed through as if they were fresh. Fresh rows otherwise differ from the stale
                table the other items (the negatives) read, and a step can learn that difference (a fresh item is
                a target) instead of the items.
            pretrained_same_domain: ``pretrained`` was trained on this very dataset (CTRL's alignment stage,
                ``training/align.py``), so its item-ID and code embeddings are kept, not started fresh; a
                checkpoint with another item count is refused.
        """
        super().__init__()
        self.save_hyperparameters()
        self.net = net
        if pretrained:
            load_pretrained(net, pretrained, same_domain=pretrained_same_domain)
        elif pretrained_same_domain:
            raise ValueError("pretrained_same_domain says how to read the pretrained checkpoint: name one with pretrained")
        if freeze_encoder:
            net.encoder.requires_grad_(False)
        if loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', got {loss!r}")
        self.loss, self.num_negatives, self.negative_sampling = loss, num_negatives, negative_sampling
        self.eval_chunk_size, self.loss_chunk_rows = eval_chunk_size, loss_chunk_rows
        self.encoder_chunk_tokens = encoder_chunk_tokens
        self.long_tail_max_count = long_tail_max_count
        if text_fresh not in ("targets", "batch"):
            raise ValueError(f"text_fresh must be 'targets' or 'batch', got {text_fresh!r}")
        if text_refresh_steps < 1:
            raise ValueError(f"text_refresh_steps must be at least 1, got {text_refresh_steps}")
        if text_fresh_max is not None and text_fresh_max < 1:
            raise ValueError(f"text_fresh_max must be at least 1 (or None: all), got {text_fresh_max}")
        self.text_fresh, self.text_refresh_steps, self.text_top_lr = text_fresh, text_refresh_steps, text_top_lr
        self.text_fresh_max, self.text_straight_through = text_fresh_max, text_straight_through
        self._table_step: int | None = None  # the step the text top's table was computed at
        self._resumed_table: dict | None = None  # that table and step, from the checkpoint a fit resumes
        self.train_counts: torch.Tensor | None = None  # (N + 1,) training targets per item, for the long-tail slice
        self.sampler: NegativeSampler | None = None
        self.metrics = RankingMetrics(ks or [10, 50])
        self._item_codes: ItemCodes | None = None  # a code model's codes, once loaded from a checkpoint
        self._eval_table: torch.Tensor | None = None
        self._eval_candidates: torch.Tensor | None = None
        self.floor_blend_choice: dict | None = None  # what training/floor_blend.py chose after the fit

    @property
    def datamodule(self):
        """The trainer's DataModule, or ``None`` outside a trainer (e.g. in unit tests)."""
        return getattr(self._trainer, "datamodule", None)

    def setup(self, stage: str) -> None:
        if self.datamodule is None:
            return
        self.install_item_inputs(self.net)
        if self.net.text_top is not None:
            self.install_text_top()
        targets = self.datamodule.examples("train").targets
        self.train_counts = training_counts(targets, self.datamodule.num_items)
        if stage == "fit":
            self.set_training_targets(targets)
            if self.net.counts_items:  # only a fit counts: a test or validate run takes the saved counts, and
                self.net.set_popularity_counts(self.train_counts)  # zero-shot (never fit here) keeps all at 0

    def install_item_inputs(self, net: UniSRec) -> None:
        """The data ``net``'s items are read from: text vectors, codes, knowledge vectors (whichever it uses)."""
        if net.use_text:
            net.set_item_features(self.datamodule.item_features)
        if net.use_codes:
            net.set_item_codes(self.datamodule.item_codes(net.code_digits, net.codes_per_digit).table())
        if net.knowledge is not None:
            net.set_knowledge_features(self.datamodule.knowledge_features(net.knowledge_fields))

    def install_text_top(self) -> None:
        """The frozen layers' token states from the data, and (unless a checkpoint or pretrained model
        already set them) the encoder's own top-layer weights as the top's start."""
        top = self.net.text_top
        if top.pooling != self.datamodule.cache.pooling:  # the table replaces the data's vectors: pool them alike
            raise ValueError(f"the text top pools by {top.pooling!r} but the data's text vectors by "
                             f"{self.datamodule.cache.pooling!r}: set --model.init_args.net.init_args.text_top_pooling "
                             f"{self.datamodule.cache.pooling} (or --data.pooling {top.pooling})")
        frozen, layers = self.datamodule.text_top_inputs(len(top.layers), load_weights=not bool(top.initialised))
        top.set_states(*frozen)
        if layers is not None:
            top.load_layers(layers)
        self._table_step = None

    def text_top_parameter_group(self, optimizer: torch.optim.Optimizer) -> None:
        """Move the text top's parameters into a group of their own at ``text_top_lr`` (before any step, so a
        resumed fit builds the same groups its saved optimizer state has)."""
        if self.net.text_top is None:
            return
        top = {id(p) for p in self.net.text_top.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in top]
        optimizer.add_param_group({"params": [p for p in self.net.text_top.parameters() if p.requires_grad],
                                   "lr": self.text_top_lr})

    def refresh_text_table(self) -> None:
        """The text top's table of every item's vector, from its current weights (a no-op without a top)."""
        if self.net.text_top is not None and self.net.text_top.flat is not None:
            self.net.refresh_text_table()
            self._table_step = self.global_step

    def on_train_start(self) -> None:
        """A resumed fit takes the text top's table its checkpoint was saved with (and when that table was made),
        not one from the resume step's weights: the steps after it read what an uninterrupted run's would."""
        resumed, self._resumed_table = self._resumed_table, None
        if resumed is not None and self.net.text_top is not None:
            self.net.set_item_features(resumed["features"])
            self._table_step = int(resumed["step"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.net.text_top is not None and (self._table_step is None
                                              or self.global_step - self._table_step >= self.text_refresh_steps):
            self.refresh_text_table()

    def on_validation_epoch_start(self) -> None:
        self.refresh_text_table()

    def on_test_epoch_start(self) -> None:
        self.refresh_text_table()

    def fresh_text_ids(self, batch: SeqBatch | PositionBatch) -> torch.Tensor | None:
        """The items whose text vectors this step computes through the text top (``text_fresh``); ``None``
        without a top."""
        if self.net.text_top is None:
            return None
        items = batch.target if self.text_fresh == "targets" else torch.cat([batch.target.flatten(), batch.item_seq.flatten()])
        items = torch.unique(items)
        items = items[items > 0]
        if self.text_fresh_max is not None and len(items) > self.text_fresh_max:
            items = items[torch.randperm(len(items), device=items.device)[:self.text_fresh_max]].sort().values
        return items

    def fresh_text(self, batch: SeqBatch | PositionBatch) -> contextlib.AbstractContextManager:
        """The block of a training step: the batch's ``fresh_text_ids`` through the text top (``UniSRec.fresh_text``)."""
        return self.net.fresh_text(self.fresh_text_ids(batch), straight_through=self.text_straight_through)

    def set_training_targets(self, targets: torch.Tensor) -> None:
        """Item popularity for the sampled loss, from every training example's target (no-op for ``full``)."""
        if self.loss == "sampled":
            counts = training_counts(targets, self.net.num_items)
            self.sampler = NegativeSampler(counts, self.num_negatives, self.negative_sampling)

    def loss_path(self, batch: SeqBatch | PositionBatch) -> LossPath:
        """How this batch's loss is computed (the module docstring's table): the one place that decides."""
        if self.loss == "sampled":
            return "sampled"
        rows, length = batch.item_seq.shape
        float16 = self._trainer is not None and str(self.trainer.precision).startswith("16")  # loss scaling
        if rows_per_chunk(self.encoder_chunk_tokens, rows, length) >= rows or not torch.is_grad_enabled() or float16:
            return "whole"
        return "micro_batches"

    def training_step(self, batch: SeqBatch | PositionBatch, batch_idx: int) -> torch.Tensor:
        path = self.loss_path(batch)
        with self.fresh_text(batch):
            if path == "sampled":
                loss = self._sampled_loss(batch)
            else:
                loss = self._full_loss(batch, self.net.item_table(), path)  # the item table once per step
        check_finite(loss, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=int((batch.target > 0).sum()))
        return loss

    def _full_loss(self, batch: SeqBatch | PositionBatch, table: torch.Tensor, path: LossPath | None = None) -> torch.Tensor:
        """Mean full-softmax loss over the batch's targets, whole or as exact micro-batches of at most
        ``encoder_chunk_tokens`` positions (``microbatch.py``), as ``loss_path`` says."""
        rows, length = batch.item_seq.shape
        count = int((batch.target > 0).sum())
        if (path or self.loss_path(batch)) == "whole":
            return self._loss_sum(batch, table) / count
        chunk_rows = rows_per_chunk(self.encoder_chunk_tokens, rows, length)
        params = [p for p in self.parameters() if p.requires_grad]
        return micro_batched_loss(lambda part, shared: self._loss_sum(type(batch)(*(f[part] for f in batch)), shared),
                                  rows, chunk_rows, table, params, count)

    def _loss_sum(self, batch: SeqBatch | PositionBatch, table: torch.Tensor) -> torch.Tensor:
        """Summed full-softmax loss of the batch's targets against every item of ``table``."""
        seq_repr, target = self.training_queries(batch, table[batch.item_seq])
        if len(target) == 0:
            return table.new_zeros(())
        loss = chunked_next_item_loss(lambda rows: self.net.score(rows, table), seq_repr, target, self.loss_chunk_rows)
        return loss * len(target)

    def training_queries(self, batch: SeqBatch | PositionBatch, item_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History vectors (B, L, D) -> the sequence vector of every training target (M, D), and the targets (M,).

        A prefix batch has one target per row, read at its last position. A position-wise batch has
        one at each marked position of each window: one causal pass encodes all of its prefixes, and
        the loss is then the mean over the M targets, as over a prefix batch's rows.
        """
        if isinstance(batch, PositionBatch):
            has_target = batch.target > 0  # (B, L)
            return self.net.encoder.outputs_at(item_emb, has_target, self.encoder_chunk_tokens), batch.target[has_target]
        return self.encode_training_histories(item_emb, batch.seq_len), batch.target

    def encode_training_histories(self, item_emb: torch.Tensor, seq_len: torch.Tensor,
                                  net: UniSRec | None = None) -> torch.Tensor:
        """item_emb (B, L, D), seq_len (B,) -> the output at each history's last item (B, D), chunked
        as ``encoder_chunk_tokens`` says; by ``net``'s encoder (default ``self.net``)."""
        last = torch.arange(item_emb.shape[1], device=seq_len.device) == (seq_len - 1).unsqueeze(1)  # (B, L)
        return (self.net if net is None else net).encoder.outputs_at(item_emb, last, self.encoder_chunk_tokens)

    def _sampled_loss(self, batch: SeqBatch | PositionBatch) -> torch.Tensor:
        """Adapt only the items this batch touches (histories, targets, negatives), then sampled softmax."""
        if self.sampler is None:
            raise RuntimeError("loss='sampled' needs item popularity: train through a SeqRecDataModule")
        target = batch.target[batch.target > 0]  # (M,): the in-batch candidates, one per training target
        candidates = torch.cat([target, self.sampler.sample(target.device)])
        ids, where = torch.unique(torch.cat([batch.item_seq.flatten(), candidates]), return_inverse=True)
        vectors = self.net.item_vectors(ids)  # (U, D)
        history = vectors[where[:batch.item_seq.numel()]].view(*batch.item_seq.shape, -1)
        seq_repr, _ = self.training_queries(batch, history)
        logits = self.net.query_vectors(seq_repr) @ self.net.candidate_vectors(vectors[where[batch.item_seq.numel():]],
                                                                               candidates).T
        return sampled_softmax_loss(logits, candidates, target, self.sampler.log_expected_count(candidates, len(target)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A code model's checkpoint carries its item codes and quantizer (``ItemCodes.to_state``); a fit with a text
        top, the table its steps read and the step it was made at (``on_train_start``)."""
        if self.net.text_top is not None and self._table_step is not None and self._trainer is not None \
                and self.trainer.training:
            checkpoint[TEXT_TABLE_KEY] = {"step": self._table_step, "features": self.net.item_features.detach().cpu().clone()}
        if self.net.use_codes:
            codes = self._item_codes or (self.datamodule.item_codes(self.net.code_digits, self.net.codes_per_digit)
                                         if self.datamodule is not None else None)
            if codes is not None:
                checkpoint[CHECKPOINT_KEY] = codes.to_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another shape with a message naming the sizes, not a torch traceback;
        a code model takes the codes it was trained with from the checkpoint."""
        own = self.state_dict()
        for key, value in checkpoint.get("state_dict", {}).items():
            if key in own and own[key].shape != value.shape:
                what = "item count" if "item_embedding" in key or "popularity_counts" in key else "dimensions"
                raise DataError(f"checkpoint has another {what}: {key} is {tuple(value.shape)} there, "
                                 f"{tuple(own[key].shape)} in this model (data: {self.net.num_items} items)")
        self._resumed_table = checkpoint.get(TEXT_TABLE_KEY)
        if self.net.use_codes and CHECKPOINT_KEY in checkpoint:  # kept, and saved again by a resumed fit
            net, data = self.net, self.datamodule
            items = data.num_items if data is not None else self.net.item_codes.shape[0] - 1
            features = data.item_features[1:].numpy() if data is not None and net.use_text else None
            self._item_codes = checked_state(checkpoint[CHECKPOINT_KEY], items, net.code_digits, net.codes_per_digit,
                                             net.plm_dim, features, getattr(self._trainer, "ckpt_path", None))
            net.set_item_codes(self._item_codes.table())

    def _eval_step(self, batch: SeqBatch) -> None:
        if self._eval_table is None:  # item vectors do not change during an evaluation pass
            self._eval_table = self.net.item_table(self.eval_chunk_size)
            self._eval_candidates = self.net.rank_candidates(self._eval_table[1:])
        seq_repr = self.net.encode_sequences(batch.item_seq, batch.seq_len, self._eval_table)
        query = self.net.rank_queries(seq_repr, batch.item_seq, batch.seq_len)
        self.metrics.update_ranks(chunked_target_ranks(query, self._eval_candidates, batch.target - 1,
                                                       self.eval_chunk_size), batch.target)

    def _finish_pass(self) -> dict[str, float]:
        values = self.metrics.compute()
        self.metrics.reset()
        self._eval_table = self._eval_candidates = None
        return values

    def _eval_end(self, prefix: str) -> None:
        values = self._finish_pass()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=False, sync_dist=True)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[SeqBatch]) -> dict[str, float]:
        """Full-ranking metrics over ``batches`` outside a Trainer (benchmarks, notebooks)."""
        self.eval()
        for batch in batches:
            self._eval_step(batch)
        return self._finish_pass()

    def validation_step(self, batch: SeqBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: SeqBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        if self.long_tail_max_count is not None and self.train_counts is not None:
            tail = self.metrics.compute_long_tail(self.train_counts.cpu(), self.long_tail_max_count)
            self.log_dict({f"test/long_tail/{k}": v for k, v in tail.items()}, prog_bar=False, sync_dist=True)
        self._eval_end("test")
