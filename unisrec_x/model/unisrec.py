"""UniSRec: item vectors from text (and/or ID, codes, knowledge fields), a sequence encoder, similarity scores.

No loss and no Lightning here; the training modules choose what to call. With
``use_text=False, use_item_id=True, similarity="dot"`` this is SASRec, so the baseline
shares every other line with the model it is compared against; with ``knowledge_fields`` as well it is
SASRec with KAR's knowledge vectors added to its item embeddings.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unisrec_x.model.floor import floor_candidates, floor_query
from unisrec_x.model.knowledge import KnowledgeAdapter
from unisrec_x.model.moe_adapter import MoEAdapter
from unisrec_x.model.seq_encoder import SequenceEncoder
from unisrec_x.model.text_top import TextTop

Similarity = Literal["cosine", "dot"]


class UniSRec(nn.Module):
    """Universal sequence representation through item text (Hou et al., KDD 2022)."""

    def __init__(self, num_items: int = 0, plm_dim: int = 384, hidden_dim: int = 300, n_layers: int = 2,
                 n_heads: int = 2, inner_dim: int = 256, dropout: float = 0.5, attn_dropout: float = 0.5,
                 max_seq_len: int = 50, n_experts: int = 8, adapter_dropout: float = 0.2, gate_noise: bool = True,
                 use_text: bool = True, use_item_id: bool = False, similarity: Similarity = "cosine",
                 temperature: float = 0.07, last_item_residual: bool = False, use_codes: bool = False,
                 code_digits: int = 32, codes_per_digit: int = 256, memory_dropout: float = 0.0,
                 memory_scale: float = 1.0, history_decay: float = 0.0, learn_history_decay: bool = False,
                 popularity_prior: bool = False, popularity_weight: float = 0.0, text_top_layers: int = 0,
                 text_top_heads: int = 12, text_top_inner_dim: int = 1536, text_top_pooling: str = "cls",
                 text_top_dropout: float = 0.1, text_top_eps: float = 1e-12, knowledge_fields: list[str] | None = None,
                 knowledge_shared_experts: int = 2, knowledge_field_experts: int = 1, floor_blend: bool = False) -> None:
        """
        Args:
            num_items: catalog size without padding (linked from the data by the CLI).
            plm_dim: text-vector size (linked from the encoder by the CLI).
            hidden_dim: item- and sequence-vector size.
            n_layers: Transformer blocks.
            n_heads: attention heads.
            inner_dim: feed-forward width.
            dropout: hidden dropout of the sequence encoder.
            attn_dropout: attention dropout.
            max_seq_len: longest history.
            n_experts: whitening experts in the MoE adapter.
            adapter_dropout: input dropout of each expert.
            gate_noise: noisy gating while training.
            use_text: item vectors include ``MoE(text)`` (inductive when alone).
            use_item_id: item vectors include an ID embedding (transductive with text; SASRec without).
            similarity: ``cosine`` (L2-normalised, divided by ``temperature``, UniSRec) or ``dot`` (SASRec).
            temperature: softmax temperature for cosine scores.
            last_item_residual: add the last history item's (unit) vector to the (unit) Transformer
                output, with a learned weight (``SequenceEncoder``); cosine similarity only. Keeps
                zero-shot transfer at least near the text-kNN baseline (docs/results.md).
            use_codes: item vectors include the mean of the item's code embeddings (semantic IDs,
                ``unisrec_x.items.codes``): ``codes`` alone, or ``text+codes`` with ``use_text``.
            code_digits: digits per item code (one embedding table each, plus one for the digit that
                tells apart items with identical codes).
            codes_per_digit: codes per digit (rows of each table).
            memory_dropout: while training, the share of item memory dropped: an item's whole ID
                embedding (its vector keeps the text part), or single digits of its code (the mean
                runs over the digits kept). One treatment for both: what is kept keeps its
                evaluation scale (no inverted-dropout 1 / (1 - p) on ID rows, which under cosine
                scoring would weigh a kept ID 4x against the text at p = 0.75). Rare items' memory gets few updates and then overfits;
                dropping it makes the model lean on what similar items share (text, common codes).
            memory_scale: factor on the item memory (ID embedding or code mean) in the item vector.
                Under Adam this multiplies that table's step size and initial spread alike: a
                few-shot fit peaks after a few dozen steps, too few for embeddings that start
                near zero to move far at the shared learning rate.
            history_decay: with ``last_item_residual``, the residual carries the unit sum of the history's
                unit item vectors, the last weighted 1, each earlier one ``history_decay`` times less
                (``SequenceEncoder``): the floor ranker's query (issue 28). 0: the last item alone.
            learn_history_decay: learn the decay, starting at ``history_decay``.
            popularity_prior: logits gain ``w * log(1 + count(item))``, ``count`` the item's count among the
                training targets of the fit (``set_popularity_counts``; saved with the model, never
                transferred from a pretrained one) and ``w`` learned. Items added later count 0; a model
                never fit on its domain (zero-shot) has all counts 0. Rides along as one more coordinate of
                ``query_vectors`` and ``candidate_vectors``, so every scoring path carries it.
            popularity_weight: the prior's initial ``w`` (on the logit scale: cosine / temperature).
            text_top_layers: train the text encoder's last this many layers (``model/text_top.py``; 0: the
                encoder stays frozen). The text vectors then come from the top over cached token states of the
                frozen layers below; the training module installs those and the encoder's own layer weights.
            text_top_heads, text_top_inner_dim, text_top_eps: the encoder's attention heads, feed-forward
                size and LayerNorm epsilon (all-MiniLM-L6-v2's by default; ``plm_dim`` is its hidden size).
            text_top_pooling: ``cls`` or ``mean``: how the top pools its tokens into the item's text vector.
            text_top_dropout: the top's dropout while training (BERT's 0.1).
            knowledge_fields: item fields (of the dataset's ``.item`` file) encoded one by one and mapped by the
                knowledge adapter (``model/knowledge.py``, after KAR) into one more part of the item vector,
                trained with the rest; the training module installs the per-field vectors
                (``set_knowledge_features``). With ``use_item_id`` it is KAR's augmented ID backbone; with
                ``use_text`` the item vector is ``MoE(text) + knowledge``; with neither (nor codes) it is UniSRec's
                text path over separate fields instead of one joined string. ``None``: no knowledge.
            knowledge_shared_experts: whitening experts every field uses.
            knowledge_field_experts: whitening experts of each field's own. The adapter's input dropout is
                ``adapter_dropout``.
            floor_blend: the model can carry the floor (``model/floor.py``): ranking adds ``weight`` times the
                training-free floor score (over the model's text vectors and training counts) to its own.
                ``weight``, the floor's history decay and its prior's ``beta`` are not trained: they are chosen
                on validation after the fit (``training/floor_blend.py``, ``set_floor``) and saved with the
                model; until then (weight 0) and in every training loss the model ranks alone. Needs
                ``use_text``.
        """
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        #: constructor arguments, so a saved model can be rebuilt without its training config
        self.init_args = arguments
        if knowledge_fields is not None and (not isinstance(knowledge_fields, (list, tuple)) or not knowledge_fields
                                             or len(set(knowledge_fields)) != len(knowledge_fields)
                                             or not all(isinstance(f, str) and f.strip() for f in knowledge_fields)):
            raise ValueError(f"knowledge_fields must name distinct fields (or be None), got {knowledge_fields!r}")
        if not (use_text or use_item_id or use_codes or knowledge_fields):
            raise ValueError("an item needs text, an ID embedding or codes (or knowledge fields): set use_text, "
                             "use_item_id, use_codes or knowledge_fields")
        if use_item_id and num_items <= 0:
            raise ValueError(f"use_item_id needs num_items > 0, got {num_items}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        minimum = dict(num_items=0, n_layers=0, plm_dim=1, hidden_dim=1, n_heads=1, inner_dim=1, max_seq_len=1, n_experts=1,
                       code_digits=1, codes_per_digit=2)
        too_small = [f"{k}={arguments[k]} (at least {m})" for k, m in minimum.items() if arguments[k] < m]
        if too_small:
            raise ValueError("model sizes out of range: " + ", ".join(too_small))
        if hidden_dim % n_heads:  # checked here too, so that n_layers=0 cannot hide it
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by n_heads {n_heads}")
        if last_item_residual and similarity != "cosine":
            raise ValueError("last_item_residual adds unit vectors, which fits cosine scoring only: set similarity='cosine'")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= memory_dropout < 1.0:
            raise ValueError(f"memory_dropout must lie in [0, 1), got {memory_dropout}")
        if memory_scale <= 0:
            raise ValueError(f"memory_scale must be positive, got {memory_scale}")
        if text_top_layers < 0 or (text_top_layers and not use_text):
            raise ValueError(f"text_top_layers must be 0, or positive with use_text=True; got {text_top_layers}")
        if floor_blend and not use_text:
            raise ValueError("floor_blend adds text similarity to the scores: it needs use_text=True")
        if popularity_weight != 0 and not popularity_prior:
            raise ValueError("popularity_weight is the popularity prior's initial weight: set popularity_prior=True")
        self.num_items, self.plm_dim, self.hidden_dim = num_items, plm_dim, hidden_dim
        self.use_text, self.use_item_id, self.use_codes = use_text, use_item_id, use_codes
        self.code_digits, self.codes_per_digit = code_digits, codes_per_digit
        self.similarity, self.temperature = similarity, temperature
        self.memory_dropout, self.memory_scale = memory_dropout, memory_scale
        self.adapter = MoEAdapter(plm_dim, hidden_dim, n_experts, adapter_dropout, gate_noise) if use_text else None
        self.item_embedding = nn.Embedding(num_items + 1, hidden_dim, padding_idx=0) if use_item_id else None
        if self.item_embedding is not None:
            nn.init.normal_(self.item_embedding.weight, std=0.02)
        self.knowledge_fields = list(knowledge_fields or [])
        self.knowledge = (KnowledgeAdapter(plm_dim, hidden_dim, len(self.knowledge_fields), knowledge_shared_experts,
                                           knowledge_field_experts, adapter_dropout) if knowledge_fields else None)
        # the fields' frozen text vectors: data like item_features, set by set_knowledge_features, not saved
        self.register_buffer("knowledge_features", torch.zeros(0, len(self.knowledge_fields), plm_dim), persistent=False)
        self.code_embedding = nn.Embedding((code_digits + 1) * codes_per_digit, hidden_dim) if use_codes else None
        if self.code_embedding is not None:
            nn.init.normal_(self.code_embedding.weight, std=0.02)
        # digit k's code c is row k * codes_per_digit + c of the one table
        self.register_buffer("code_offsets", torch.arange(code_digits + 1) * codes_per_digit, persistent=False)
        self.register_buffer("item_codes", torch.zeros(0, code_digits + 1, dtype=torch.long), persistent=False)
        self.encoder = SequenceEncoder(hidden_dim, n_layers, n_heads, inner_dim, dropout, attn_dropout, max_seq_len,
                                       last_item_residual=last_item_residual, history_decay=history_decay,
                                       learn_history_decay=learn_history_decay)
        self.popularity_prior, self.floor_blend = popularity_prior, floor_blend
        if popularity_prior:
            self.popularity_weight = nn.Parameter(torch.tensor(float(popularity_weight)))
        if self.counts_items:  # saved with the model (checkpoints, weights.pt); counts are data of this domain
            self.register_buffer("popularity_counts", torch.zeros(num_items + 1, dtype=torch.long))
        if floor_blend:  # (weight, decay, beta), set_floor; saved, never transferred from a pretrained model
            self.register_buffer("floor_knobs", torch.zeros(3))
        # Frozen text vectors: data, not parameters; set by set_item_features, not saved in checkpoints.
        # With a text top, its table of every item's vector (refresh_text_table).
        self.register_buffer("item_features", torch.zeros(0, plm_dim), persistent=False)
        self.text_top = (TextTop(plm_dim, text_top_layers, text_top_heads, text_top_inner_dim, text_top_pooling,
                                 text_top_eps, text_top_dropout) if text_top_layers else None)
        self._fresh_features: torch.Tensor | None = None  # inside fresh_text: the table with the step's rows fresh

    def set_item_features(self, features: torch.Tensor) -> None:
        """Install the text vectors, (num_items + 1, plm_dim) with row 0 the padding item."""
        if features.ndim != 2 or features.shape[1] != self.plm_dim:
            raise ValueError(f"text features have shape {tuple(features.shape)}, expected (items + 1, {self.plm_dim})")
        if (self.use_item_id or self.counts_items) and features.shape[0] != self.num_items + 1:
            sized = "the ID embedding" if self.use_item_id else "the popularity counts"
            raise ValueError(f"text features cover {features.shape[0] - 1} items but {sized} has {self.num_items}")
        self.item_features = features.to(self._device, torch.float32)

    def set_knowledge_features(self, features: torch.Tensor) -> None:
        """Install the knowledge fields' text vectors, (num_items + 1, fields, plm_dim) with row 0 the padding
        item; an empty field of an item is a zero vector (absent, ``KnowledgeAdapter``)."""
        if self.knowledge is None:
            raise ValueError("this model has no knowledge fields (knowledge_fields=None)")
        fields = len(self.knowledge_fields)
        if features.ndim != 3 or features.shape[1:] != (fields, self.plm_dim):
            raise ValueError(f"knowledge features have shape {tuple(features.shape)}, expected (items + 1, {fields}, "
                             f"{self.plm_dim}) for the fields {self.knowledge_fields}")
        if (self.use_item_id or self.counts_items) and features.shape[0] != self.num_items + 1:
            sized = "the ID embedding" if self.use_item_id else "the popularity counts"
            raise ValueError(f"knowledge features cover {features.shape[0] - 1} items but {sized} has {self.num_items}")
        self.knowledge_features = features.to(self._device, torch.float32)

    def refresh_text_table(self) -> None:
        """Recompute every item's text vector from the text top (no gradients): the table that items outside
        a step's fresh rows, and evaluation, read."""
        if self.text_top is None:
            raise ValueError("this model has no text top (text_top_layers=0)")
        self.set_item_features(self.text_top.table())

    @contextlib.contextmanager
    def fresh_text(self, ids: torch.Tensor | None, straight_through: bool = False) -> Iterator[None]:
        """Inside the block, the items ``ids`` (unique) get their text vectors from the top, with gradients;
        every other item reads the table. ``straight_through``: their values stay the table's, only the top's
        gradients pass (fresh and stale items cannot be told apart by value). Without a text top (or ``ids``
        None) the block runs as it is."""
        if self.text_top is None or ids is None:
            yield
            return
        ids = ids.to(self.item_features.device)
        fresh = self.text_top.encode(ids).to(self.item_features)
        if straight_through:
            fresh = self.item_features[ids] + (fresh - fresh.detach())
        self._fresh_features = self.item_features.index_copy(0, ids, fresh)
        try:
            yield
        finally:
            self._fresh_features = None

    def set_item_codes(self, codes: torch.Tensor) -> None:
        """Install the item codes, (num_items + 1, code_digits + 1) with row 0 the padding item."""
        digits = self.code_offsets.shape[0]
        if codes.ndim != 2 or codes.shape[1] != digits:
            raise ValueError(f"item codes have shape {tuple(codes.shape)}, expected (items + 1, {digits})")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.codes_per_digit):
            raise ValueError(f"item codes must lie in [0, {self.codes_per_digit}), got [{int(codes.min())}, {int(codes.max())}]")
        self.item_codes = codes.to(self._device, torch.long)

    @property
    def counts_items(self) -> bool:
        """Whether the model keeps each item's count among its training targets (prior or floor)."""
        return self.popularity_prior or self.floor_blend

    def set_popularity_counts(self, counts: torch.Tensor) -> None:
        """Install the training counts of the prior and the floor: (num_items + 1,) training targets per item
        id (row 0 = padding)."""
        if not self.counts_items:
            raise ValueError("this model keeps no training counts (popularity_prior=False, floor_blend=False)")
        if counts.shape != self.popularity_counts.shape:
            raise ValueError(f"popularity counts have shape {tuple(counts.shape)}, expected ({self.num_items + 1},)")
        self.popularity_counts = counts.to(self.popularity_counts)

    @property
    def _device(self) -> torch.device:
        return self.encoder.position.weight.device

    def item_table(self, chunk_size: int | None = None) -> torch.Tensor:
        """Vectors of every item, padding row included: (N + 1, D).

        Computed once per step and shared by the history lookup and the softmax, instead of
        adapting each history item separately. ``chunk_size`` bounds the adapter's working
        memory (it holds every expert's output for the rows it adapts): use it outside autograd
        for large catalogs.
        """
        rows = self._rows()
        if chunk_size is None or rows <= chunk_size:
            return self.item_vectors(None)
        return torch.cat([self.item_vectors(torch.arange(start, min(start + chunk_size, rows), device=self._device))
                          for start in range(0, rows, chunk_size)])

    def partial_item_table(self, ids: torch.Tensor) -> torch.Tensor:
        """An (N + 1, D) table whose rows ``ids`` (unique) hold those items' vectors; every other row is zero.

        A step that touches a few thousand items of a large merged catalog (pretraining with
        in-batch negatives) adapts only those, and lookups stay ``table[item_seq]``.
        """
        rows = self._rows()
        vectors = self.item_vectors(ids)  # (U, D)
        return vectors.new_zeros(rows, vectors.shape[-1]).index_copy(0, ids, vectors)

    def _rows(self) -> int:
        """Items + padding: from the text features or codes when used (they may outgrow ``num_items``
        after ``add_items``), else the ID table."""
        if self.use_text:
            return self.item_features.shape[0]
        if self.knowledge is not None:
            return self.knowledge_features.shape[0]
        return self.item_codes.shape[0] if self.use_codes else self.num_items + 1

    def item_vectors(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Vectors of the items ``ids`` (any shape, 0 = padding) -> (*ids.shape, D); ``None`` = all items.

        Lets sampled-softmax training adapt only the items a batch touches.
        """
        vectors = None
        if self.use_text:
            features = self.item_features if self._fresh_features is None else self._fresh_features
            if features.shape[0] == 0:
                raise RuntimeError("UniSRec uses text but has no item features: call set_item_features first")
            vectors = self.adapter(features if ids is None else features[ids])
        if self.item_embedding is not None:
            ids_part = self.item_embedding.weight if ids is None else self.item_embedding(ids)
            if self.training and self.memory_dropout > 0:  # whole rows: an item keeps all of its ID or none,
                # at its evaluation scale (no 1 / (1 - p)), as a code mean over its kept digits is
                keep = torch.rand(*ids_part.shape[:-1], 1, device=ids_part.device) >= self.memory_dropout
                ids_part = ids_part * keep
            ids_part = ids_part * self.memory_scale if self.memory_scale != 1 else ids_part
            vectors = ids_part if vectors is None else vectors + ids_part
        if self.code_embedding is not None:
            if self.item_codes.shape[0] == 0:
                raise RuntimeError("UniSRec uses item codes but has none: call set_item_codes first")
            codes_part = self.code_vectors(self.item_codes if ids is None else self.item_codes[ids])
            vectors = codes_part if vectors is None else vectors + codes_part
        if self.knowledge is not None:
            if self.knowledge_features.shape[0] == 0:
                raise RuntimeError("UniSRec uses knowledge fields but has no vectors: call set_knowledge_features first")
            knowledge_part = self.knowledge(self.knowledge_features if ids is None else self.knowledge_features[ids])
            vectors = knowledge_part if vectors is None else vectors + knowledge_part
        return vectors

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Code tuples (..., digits + 1) -> the mean of their code embeddings times ``memory_scale`` (..., D),
        as an embedding bag: never holds the (..., digits + 1, D) lookups (2.6 GB for a 65,536-item chunk
        at 32 digits)."""
        rows = (codes + self.code_offsets).reshape(-1, codes.shape[-1])
        if self.training and self.memory_dropout > 0:
            keep = torch.rand(rows.shape, device=rows.device) >= self.memory_dropout
            keep[:, 0] |= ~keep.any(dim=1)  # the mean of no digits is undefined: keep the first
            means = F.embedding_bag(rows, self.code_embedding.weight, mode="sum",
                                    per_sample_weights=keep.float() / keep.sum(dim=1, keepdim=True))
        else:
            means = F.embedding_bag(rows, self.code_embedding.weight, mode="mean")
        means = means * self.memory_scale if self.memory_scale != 1 else means
        return means.reshape(*codes.shape[:-1], -1)

    def new_item_vectors(self, features: torch.Tensor | None, codes: torch.Tensor | None,
                         knowledge: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of items outside the tables (``Recommender.add_items``), from text vectors (n, plm_dim),
        codes (n, digits + 1) and knowledge vectors (n, fields, plm_dim): the text, code and knowledge parts;
        a new item has no trained ID, so no ID part."""
        if not (self.use_text or self.use_codes or self.knowledge is not None):
            raise ValueError("an ID-only model has no vector for an item it was not trained on")
        vectors = self.adapter(features) if self.use_text else None
        if self.use_codes:
            if codes is None:
                raise ValueError("this model uses item codes: new items need codes")
            codes_part = self.code_vectors(codes.to(self._device, torch.long))
            vectors = codes_part if vectors is None else vectors + codes_part
        if self.knowledge is not None:
            if knowledge is None:
                raise ValueError("this model uses knowledge fields: new items need their vectors")
            knowledge_part = self.knowledge(knowledge.to(self._device, torch.float32))
            vectors = knowledge_part if vectors is None else vectors + knowledge_part
        return vectors

    def grow(self, features: torch.Tensor | None, codes: torch.Tensor | None, count: int,
             knowledge: torch.Tensor | None = None) -> None:
        """Append ``count`` items after the last one: their text vectors (count, plm_dim), codes
        (count, digits + 1) and knowledge vectors (count, fields, plm_dim) where the model uses them, a zero ID
        row (a new item has no trained ID) and a zero popularity count (it was never a training target).
        ``num_items`` grows with the tables it sizes.

        Everything is built before anything is assigned, so a failure leaves the model as it was.
        """
        if self.use_text and (features is None or features.shape != (count, self.plm_dim)):
            raise ValueError(f"new items need text vectors of shape ({count}, {self.plm_dim})")
        if self.use_codes and (codes is None or codes.shape != (count, self.code_offsets.shape[0])):
            raise ValueError(f"new items need codes of shape ({count}, {self.code_offsets.shape[0]})")
        fields = len(self.knowledge_fields)
        if self.knowledge is not None and (knowledge is None or knowledge.shape != (count, fields, self.plm_dim)):
            raise ValueError(f"new items need knowledge vectors of shape ({count}, {fields}, {self.plm_dim})")
        item_features = (torch.cat([self.item_features, features.to(self.item_features)]) if self.use_text else None)
        knowledge_features = (torch.cat([self.knowledge_features, knowledge.to(self.knowledge_features)])
                              if self.knowledge is not None else None)
        item_codes = torch.cat([self.item_codes, codes.to(self.item_codes)]) if self.use_codes else None
        embedding = None
        if self.item_embedding is not None:
            weight = self.item_embedding.weight.detach()
            embedding = nn.Embedding(len(weight) + count, weight.shape[1], padding_idx=0).to(weight)
            embedding.weight.data = torch.cat([weight, weight.new_zeros(count, weight.shape[1])])
        counts = (torch.cat([self.popularity_counts, self.popularity_counts.new_zeros(count)])
                  if self.counts_items else None)
        if item_features is not None:
            self.item_features = item_features
        if item_codes is not None:
            self.item_codes = item_codes
        if knowledge_features is not None:
            self.knowledge_features = knowledge_features
        if embedding is not None:
            self.item_embedding = embedding
        if counts is not None:
            self.popularity_counts = counts
        if embedding is not None or counts is not None:
            self.num_items += count

    def encode_sequences(self, item_seq: torch.Tensor, seq_len: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """item_seq (B, L), seq_len (B,) -> sequence vectors (B, D)."""
        table = self.item_table() if table is None else table
        return self.encoder(table[item_seq], seq_len)  # (B, L) -> (B, L, D) -> (B, D)

    def query_vectors(self, seq_repr: torch.Tensor) -> torch.Tensor:
        """Sequence vectors (B, D) as queries: ``score = query @ candidate.T`` (temperature folded in).
        With the popularity prior, (B, D + 1): the prior's weight is the last coordinate."""
        query = F.normalize(seq_repr, dim=-1) / self.temperature if self.similarity == "cosine" else seq_repr
        if not self.popularity_prior:
            return query
        return torch.cat([query, self.popularity_weight.to(query.dtype).expand(*query.shape[:-1], 1)], dim=-1)

    def candidate_vectors(self, item_vectors: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors (R, D) as candidates: L2-normalised for cosine similarity, unchanged for dot.

        With the popularity prior, (R, D + 1): the last coordinate is ``log(1 + count)`` of the rows' items,
        ``ids`` (R,), or items 1..R when ``None`` (``table[1:]``). An id past the count table is an item
        added after training, not yet grown into it: count 0.
        """
        vectors = F.normalize(item_vectors, dim=-1) if self.similarity == "cosine" else item_vectors
        if not self.popularity_prior:
            return vectors
        return torch.cat([vectors, torch.log1p(self.training_counts(ids, len(vectors)).to(vectors)).unsqueeze(-1)], dim=-1)

    def training_counts(self, ids: torch.Tensor | None, rows: int) -> torch.Tensor:
        """(R,) the items' counts among the training targets: of ``ids``, or items 1..``rows`` when ``None``.
        An id past the count table is an item added after training, not yet grown into it: count 0."""
        counts = self.popularity_counts
        ids = torch.arange(1, rows + 1, device=counts.device) if ids is None else ids.to(counts.device)
        known = ids < len(counts)
        return torch.where(known, counts[ids.clamp(max=len(counts) - 1)], torch.zeros_like(ids))

    def set_floor(self, weight: float, decay: float, beta: float) -> None:
        """Carry the floor with this ``weight`` (0: rank alone), history ``decay`` and prior ``beta``."""
        if not self.floor_blend:
            raise ValueError("this model cannot carry the floor (floor_blend=False)")
        if weight < 0 or beta < 0 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"floor weight and beta must be >= 0 and decay in [0, 1], got {weight}, {decay}, {beta}")
        self.floor_knobs = torch.tensor([weight, decay, beta], dtype=torch.float32, device=self.floor_knobs.device)

    @property
    def floor_active(self) -> bool:
        """Whether ranking adds the floor (a chosen weight above 0)."""
        return self.floor_blend and float(self.floor_knobs[0]) > 0

    def unit_text(self) -> torch.Tensor:
        """(rows, plm_dim) the unit text vectors the floor compares (the text top's where it has one)."""
        return F.normalize(self.item_features.float(), dim=-1)

    def rank_queries(self, seq_repr: torch.Tensor, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """What full ranking (evaluation, serving, exports) scores with: ``query_vectors``, then, when the model
        carries the floor, ``weight`` times the floor's query of the histories (``model/floor.py``)."""
        query = self.query_vectors(seq_repr)
        if not self.floor_active:
            return query
        weight, decay, beta = self.floor_knobs.tolist()
        floor = floor_query(self.unit_text(), item_seq, seq_len, decay, beta)
        return torch.cat([query, (weight * floor).to(query)], dim=-1)

    def rank_candidates(self, item_vectors: torch.Tensor, ids: torch.Tensor | None = None,
                        text: torch.Tensor | None = None) -> torch.Tensor:
        """``candidate_vectors``, then, when the model carries the floor, the floor's candidates: the rows'
        text vectors (``text`` (R, plm_dim) for items not yet in the tables) and training counts."""
        vectors = self.candidate_vectors(item_vectors, ids)
        if not self.floor_active:
            return vectors
        if text is not None:
            unit = F.normalize(text.to(vectors.device, torch.float32), dim=-1)
        else:
            unit = self.unit_text()
            unit = unit[1:len(vectors) + 1] if ids is None else unit[ids.to(unit.device)]
        return torch.cat([vectors, floor_candidates(unit, self.training_counts(ids, len(vectors))).to(vectors)], dim=-1)

    def score(self, seq_repr: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """seq_repr (B, D) vs items 1..N of table (N + 1, D) -> logits (B, N); padding is never a candidate."""
        return self.query_vectors(seq_repr) @ self.candidate_vectors(table[1:]).T
