"""Recommender: a trained model as an answer to "what next for this history?".

Holds the network in eval mode, the item tokens and texts, the frozen text vectors (and, for a model
with knowledge fields, each field's text and vector) and the adapted item table (computed once;
``add_items`` appends rows instead of recomputing).
Histories and results use the dataset's own item tokens (e.g. ASINs), never internal ids.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import unicodedata
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from unisrec_x.items.codes import ItemCodes
from unisrec_x.data.text import clean_text, join_fields
from unisrec_x.errors import DataError
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.evaluation.ranking import DEFAULT_CHUNK, chunked_topk
from unisrec_x.items.encoder import TextSettings
from unisrec_x.runtime.outputs import check_output_path, recover
from unisrec_x.serving.export import export
from unisrec_x.serving.journal import SERVE_LOCK_WAIT, ItemJournal, default_journal, model_lock, model_locks
from unisrec_x.serving.checkpoint_source import load_checkpoint
from unisrec_x.serving.parts import TextFingerprint
from unisrec_x.serving.model_dir import (MODEL_DIR, load_model_dir, save_model_dir,
                                         verify_text_encoder)

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the model cannot answer (empty history, unknown items, k out of range)."""

    def __init__(self, message: str, items: list[str] | None = None) -> None:
        super().__init__(message)
        self.items = items or []


class KnownItemsError(RequestError):
    """Items to add are already in the catalog (HTTP 409)."""


def shown(token: str) -> str:
    """``token`` as it can be printed and sent as JSON: a lone surrogate becomes its escape (``\\ud800``)."""
    return token.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(text: object) -> bool:
    if not isinstance(text, str):
        return True  # not this check's business (an id that is not a string is simply unknown)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from "\ud800" in JSON
        return False
    return True


MAX_ID_CHARS = 256
#: Characters that show nothing alone: white space, line and paragraph separators, format characters
#: (zero-width space, soft hyphen, ...), combining marks, controls; and the Hangul fillers and braille blank.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cf", "Cc", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _invisible(c: str) -> bool:
    return c in _BLANK_LETTERS or unicodedata.category(c) in _INVISIBLE_CATEGORIES


def _breaks_a_line(c: str) -> bool:
    """``c`` ends a line for ``str.splitlines`` (\\n, \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028, U+2029)."""
    return len(f"a{c}b".splitlines()) > 1


def id_problem(token: object) -> str | None:
    """Why ``token`` cannot be a new item id, or ``None``.

    Ids are written one per line and tab-separated, read back by other tools, and compared as strings:
    so no line break of any kind (``str.splitlines`` splits at U+0085 and U+2028, which an exported
    id list then read line by line turned into extra rows), no control character, no id that shows
    nothing or differs from another only in white space at its ends or in its Unicode form (NFC).
    """
    if not isinstance(token, str):
        return "not a string"
    if not token.strip():
        return "empty"
    if len(token) > MAX_ID_CHARS:
        return f"{len(token):,} characters long (at most {MAX_ID_CHARS})"
    if not _is_utf8(token):
        return "not valid UTF-8 (lone surrogate)"
    odd = next((c for c in token if _breaks_a_line(c) or unicodedata.category(c) == "Cc"), None)
    if odd is not None:
        return f"contains a tab, line break or other control character (U+{ord(odd):04X})"
    if all(_invisible(c) for c in token):
        return "made only of invisible characters (" + " ".join(f"U+{ord(c):04X}" for c in token[:5]) + ")"
    if any(c.isspace() or unicodedata.category(c) in ("Cf", "Zs") for c in (token[0], token[-1])):
        return "starts or ends with white space or an invisible character"
    if not unicodedata.is_normalized("NFC", token):
        return f"not in Unicode NFC form (composed, as {ascii(unicodedata.normalize('NFC', token))}): send that form"
    return None


def _abridged(token: str) -> str:
    """An id short enough to quote in a message or an error body (an over-long one was 600,000 characters)."""
    return token if len(token) <= MAX_ID_CHARS else token[:64] + f"... ({len(token):,} characters)"


class Recommendation(NamedTuple):
    item: str  # the id in the dataset's interaction files
    score: float
    text: str
    alias: str = ""  # another name of the item (e.g. the ASIN behind a release's integer index), if known


class TopEncoder:
    """How a model with a trained text top encodes texts: the encoder's frozen layers, then the model's top."""

    def __init__(self, encoder, top) -> None:
        self.encoder, self.top = encoder, top
        self.frozen_layers = len(encoder.model.encoder.layer) - len(top.layers)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from unisrec_x.items.token_states import token_states

        states = token_states(self.encoder, texts, self.frozen_layers)
        length = max(len(s) for s in states)
        padded = torch.zeros(len(states), length, self.top.dim)
        keep = torch.zeros(len(states), length, dtype=torch.bool)
        for row, s in enumerate(states):
            padded[row, :len(s)] = torch.from_numpy(s)
            keep[row, :len(s)] = True
        was_training = self.top.training
        self.top.eval()
        try:
            return self.top(padded, keep).float().numpy()
        finally:
            self.top.train(was_training)


class Recommender:
    """Batch next-item recommendation over the whole catalog, with new items addable at run time."""

    def __init__(self, net: UniSRec, item_tokens: Sequence[str], item_texts: Sequence[str],
                 item_features: torch.Tensor | None, text: TextSettings | None,
                 chunk_size: int = DEFAULT_CHUNK, aliases: Mapping[str, str] | None = None,
                 item_codes: ItemCodes | None = None, text_fingerprint: TextFingerprint | None = None,
                 knowledge_features: torch.Tensor | None = None,
                 knowledge_texts: Mapping[str, Sequence[str]] | None = None) -> None:
        """
        Args:
            net: a trained ``UniSRec`` (any variant).
            item_tokens: token of items 1..N, in id order.
            item_texts: their texts.
            item_features: (N + 1, plm_dim) text vectors with row 0 = padding; ``None`` for ID-only models.
            text: the text encoder settings, needed by ``add_items``.
            chunk_size: items scored at a time (bounds memory on large catalogs).
            aliases: other names -> item token, accepted in histories and shown in results (the
                UniSRec releases index items by integers; their ``.item2index`` gives the ASINs).
            item_codes: codes of items 1..N and their quantizer, for models with item codes
                (``use_codes``); ``add_items`` encodes new items' texts with the same quantizer.
            text_fingerprint: stored items the text encoder must reproduce before ``add_items`` uses it
                (a model directory's; ``None``: nothing to verify).
            knowledge_features: for a model with knowledge fields, (N + 1, fields, plm_dim) vectors of each
                field, row 0 = padding: precomputed, so serving needs no text encoder until ``add_items``.
            knowledge_texts: field -> its text of items 1..N (kept and saved with the model; default empty).
        """
        if len(item_tokens) != len(item_texts):
            raise ValueError(f"{len(item_tokens)} item tokens but {len(item_texts)} texts")
        if len(set(item_tokens)) != len(item_tokens):
            raise ValueError("item tokens must be unique")
        if net.use_codes and (item_codes is None or len(item_codes.codes) != len(item_tokens)):
            raise ValueError(f"this model uses item codes: item_codes for its {len(item_tokens)} items are required"
                             + ("" if item_codes is None else f", got {len(item_codes.codes)}"))
        self.net = net.eval()
        self.item_tokens, self.item_texts = list(item_tokens), list(item_texts)
        self.token_to_id = {t: i + 1 for i, t in enumerate(self.item_tokens)}
        self.aliases = {a: t for a, t in (aliases or {}).items() if t in self.token_to_id and a not in self.token_to_id}
        self.alias_of = {t: a for a, t in self.aliases.items()}
        self.text, self.chunk_size = text, chunk_size
        self.text_fingerprint = text_fingerprint
        self._nfc_twins: dict[str, str] | None = None  # NFC form -> an id or alias not in NFC (_refuse_known)
        self.lock = threading.Lock()  # add_items swaps the tables that recommend reads
        self._adding = threading.Lock()  # one add_items at a time from its clash check to its append
        self.journal: ItemJournal | None = None  # replayed at load (from_checkpoint); save compacts it
        self.journaling = False  # add_items writes new items to the journal, fsync'd, before they count (serve)
        self._text_encoder = None
        self.item_codes = item_codes if net.use_codes else None
        if net.use_text and item_features is None:
            raise ValueError("this model uses text: item_features are required")
        if net.knowledge is not None and knowledge_features is None:
            raise ValueError(f"this model uses the knowledge fields {net.knowledge_fields}: knowledge_features are required")
        fields = net.knowledge_fields
        self.knowledge_texts = {f: list((knowledge_texts or {}).get(f, [""] * len(self.item_tokens))) for f in fields}
        short = [f for f, texts in self.knowledge_texts.items() if len(texts) != len(self.item_tokens)]
        if short:
            raise ValueError(f"knowledge_texts of {short} do not have one text per item ({len(self.item_tokens)})")
        with torch.inference_mode():
            if net.use_text:
                net.set_item_features(item_features)
            if net.knowledge is not None:
                net.set_knowledge_features(knowledge_features)
            if self.item_codes is not None:
                net.set_item_codes(self.item_codes.table())
            # detached: a SASRec-ID's table is its embedding Parameter itself, which numpy() and exports refuse
            self.table = net.item_table(chunk_size).detach()  # (N + 1, D)
            self.candidates = net.rank_candidates(self.table[1:])  # (N, D), what scores are taken against

    @property
    def num_items(self) -> int:
        return len(self.item_tokens)

    @property
    def max_history(self) -> int:
        """Longest history the encoder reads; longer ones keep their last items, as in training."""
        return self.net.encoder.position.num_embeddings

    @classmethod
    def from_checkpoint(cls, path: str | Path, data_root: str | None = None, journal: str | Path | None = None,
                        record: bool = False) -> "Recommender":
        """Load a Lightning checkpoint (items and text vectors come from its dataset, via the data root
        and the feature cache) or a model directory written by ``save``/``unisrec-x add-items``.

        Items a server added are replayed from the model's journal (``serving/journal.py``), so every
        command sees the catalog the server answered with.

        Args:
            journal: where that journal is (default: inside a model directory, beside a checkpoint).
            record: ``add_items`` writes new items to the journal, fsync'd, before returning (as
                ``unisrec-x serve`` does), so they survive a crash; else they live in memory until ``save``.
        """
        path = Path(path)
        recover(path.absolute(), MODEL_DIR)  # a save killed mid-swap may have left the model beside its path
        log_of = ItemJournal(default_journal(path) if journal is None else journal, path)  # before the model is read
        parts = load_model_dir(path) if path.is_dir() else load_checkpoint(path, data_root)
        recommender = cls(**parts._asdict())
        log_of.replay(recommender)
        recommender.journal, recommender.journaling = log_of, record
        return recommender

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write a self-contained model directory (weights, items, text vectors), atomically.

        A folder that is not a model directory written by unisrec-x is never replaced; an existing
        model directory only with ``overwrite=True``. Saved over the directory it was loaded from, it
        takes in that model's journal (which is then empty), under the lock its server appends with;
        if a server added items there since this model was loaded, it refuses rather than drop them.
        """
        target = check_output_path(directory, MODEL_DIR, overwrite)  # a refused path takes no lock
        with model_locks(target):
            source = self.journal if self.journal is not None and self.journal.model == target else None
            if source is not None and source.changed():
                raise DataError("the model directory changed since this model was loaded from it (a running "
                                "`unisrec-x serve` added items, or add-items replaced it); load it again, then "
                                "add and save", target)
            saved = save_model_dir(self, directory, overwrite)
            if source is not None:
                source.clear()  # an outside journal (--journal); one inside went with the old directory
                source.rebase()
        return saved

    def export(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the scored item matrix and a TorchScript sequence encoder, usable without this package.

        Refuses any existing folder but an export written by unisrec-x (replaced with ``overwrite=True``).
        """
        return export(self, directory, overwrite)

    def history_ids(self, histories: Sequence[Sequence[str]]) -> list[list[int]]:
        """Item tokens -> internal ids, every history checked: none unknown, none empty."""
        if len(histories) == 0:
            raise RequestError("no histories given")
        known = self.token_to_id
        invalid = sorted({shown(t) for h in histories for t in h if not _is_utf8(t)})
        if invalid:
            raise RequestError(f"{len(invalid)} item id(s) are not valid UTF-8 (lone surrogate): "
                               f"{', '.join(invalid[:20])}", invalid)
        unknown = sorted({t for h in histories for t in h if t not in known and t not in self.aliases})
        if unknown:
            raise RequestError(f"{len(unknown)} unknown item(s): {', '.join(unknown[:20])}", unknown)
        empty = [i for i, h in enumerate(histories) if len(h) == 0]
        if empty:
            raise RequestError(f"history {empty[0]} is empty: at least one item is needed")
        return [[known[t] if t in known else known[self.aliases[t]] for t in h] for h in histories]

    def encode_histories(self, histories: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token histories -> (item_seq (B, L) right-padded, seq_len (B,)), last ``max_history`` items kept."""
        return self.pad([ids[-self.max_history:] for ids in self.history_ids(histories)])

    @staticmethod
    def pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Id lists -> (right-padded (B, L) with 0, lengths (B,))."""
        lengths = torch.tensor([len(r) for r in rows])
        out = torch.zeros(len(rows), int(lengths.max()) if len(rows) else 0, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out, lengths

    def top_k(self, item_seq: torch.Tensor, seq_len: torch.Tensor, k: int,
              exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Internal ids in, (scores (B, k), item ids (B, k)) out, best first; the batch path of the service.

        ``exclude`` (B, M) holds ids never to return per row (0 = none), e.g. the whole history.
        A row that runs out of items once they are excluded gets NaN scores in its last slots.
        """
        if not 1 <= k <= self.num_items:
            raise RequestError(f"k must be between 1 and {self.num_items} (the catalog size), got {k}")
        with self.lock, torch.inference_mode():
            seq_repr = self.net.encode_sequences(item_seq, seq_len, self.table)
            banned = None if exclude is None or not bool((exclude > 0).any()) else exclude - 1  # -1 = none
            query = self.net.rank_queries(seq_repr, item_seq, seq_len)
            scores, index = chunked_topk(query, self.candidates, k, self.chunk_size, banned)
        return scores.masked_fill(torch.isneginf(scores), float("nan")), index + 1

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_seen: bool = False) -> list[list[Recommendation]]:
        """The ``k`` best next items for each history (item tokens, oldest first).

        The model reads the last ``max_history`` items; ``exclude_seen`` removes every item of the
        history, however old.
        """
        ids = self.history_ids(histories)
        item_seq, seq_len = self.pad([h[-self.max_history:] for h in ids])
        scores, top = self.top_k(item_seq, seq_len, k, self.pad(ids)[0] if exclude_seen else None)
        return [[self.describe(i, s) for s, i in zip(row_scores.tolist(), row_ids.tolist()) if s == s]
                for row_scores, row_ids in zip(scores, top)]

    def describe(self, item_id: int, score: float) -> Recommendation:
        token = self.item_tokens[item_id - 1]
        return Recommendation(token, float(score), self.item_texts[item_id - 1], self.alias_of.get(token, ""))

    def add_items(self, items: Mapping[str, str | Mapping[str, str]]) -> list[str]:
        """Make new items rankable at once from their text alone; returns the tokens added.

        Texts go through the model's own text encoder and adapter; a model with item codes gives each
        new item the codes of its text (same quantizer). A transductive model has no ID embedding for a
        new item, so its vector is the text (and code) part alone (its ID row is zero).
        A model with knowledge fields takes each item as a mapping of field -> text (``knowledge_inputs``):
        each field is encoded on its own, and the item's vector is its knowledge (+ text, codes) part.
        Every id and text is checked before anything changes, and the clash check and the append
        are one locked step, so concurrent calls never add an id twice. With ``journaling`` (serve)
        the items are in the journal, fsync'd, before they count; a refused write
        (``JournalUnavailable``) adds nothing.
        """
        if not (self.net.use_text or self.net.use_codes or self.net.knowledge is not None):
            raise RequestError("this model has no text side (ID-only, e.g. SASRec): new items need retraining")
        if self.net.text_top is not None and self.net.use_codes:
            raise RequestError("this model has a trained text top and item codes: a new item's codes come from its "
                               "frozen-encoder vector, which add_items does not compute yet; new items need retraining")
        if not items:
            raise RequestError("no items given")
        tokens = list(items)
        bad = [(t, why) for t in tokens if (why := id_problem(t))]
        if bad:
            listed = "; ".join(f"{ascii(_abridged(t) if isinstance(t, str) else t)}: {why}" for t, why in bad[:20])
            raise RequestError(f"{len(bad)} invalid item id(s): {listed}", [shown(_abridged(str(t))) for t, _ in bad])
        self._refuse_known(tokens)  # before encoding, which takes seconds
        texts, fields = self.knowledge_inputs(items, tokens)
        reads_text = self.net.use_text or self.net.use_codes
        blank = [t for i, t in enumerate(tokens) if not texts[i]] if reads_text else [
            t for i, t in enumerate(tokens) if not any(v[i] for v in fields.values())]
        if blank:
            what = "empty text" if reads_text else "no knowledge (every field is empty)"
            raise RequestError(f"{len(blank)} item(s) have {what}: {', '.join(blank[:20])}", blank)
        broken = [t for i, t in enumerate(tokens)
                  if not all(map(_is_utf8, [texts[i], *(v[i] for v in (fields or {}).values())]))]
        if broken:
            raise RequestError(f"{len(broken)} item(s) have text that is not valid UTF-8 (lone surrogate): "
                               f"{', '.join(broken[:20])}", broken)
        features = self._encode(texts) if reads_text else None
        knowledge = None if fields is None else self._encode_fields(fields)
        journal = self.journal if self.journaling else None
        with self._adding, (model_lock(journal.model, SERVE_LOCK_WAIT) if journal else contextlib.nullcontext()):
            self._refuse_known(tokens)  # again: a concurrent call may have added one of them meanwhile
            if journal is not None:  # durable before it counts; refused: nothing changes
                journal.append(tokens, texts, features, knowledge, fields)
            with self.lock:
                self._append(tokens, texts, features, knowledge, fields)
        log.info("added %d items; the catalog now has %d", len(tokens), self.num_items)
        return tokens

    def knowledge_inputs(self, items: Mapping[str, object], tokens: list[str]
                         ) -> tuple[list[str], dict[str, list[str]] | None]:
        """The new items' texts (cleaned) and, for a model with knowledge fields, each field's texts.

        Such a model takes each item as a mapping of field -> text (fields it does not name are empty,
        unknown ones refused, so a misspelt field is not silently dropped) plus an optional ``text``: the
        item's text, required when the model also reads one (``use_text`` or codes), else only shown in results
        (default: the fields joined). A model without knowledge fields takes one string per item.
        """
        fields = self.net.knowledge_fields
        if not fields:
            odd = [t for t in tokens if isinstance(items[t], Mapping)]
            if odd:
                raise RequestError(f"{len(odd)} item(s) are given as fields, but this model has no knowledge fields: "
                                   f"give each its text; {', '.join(odd[:20])}", odd)
            return [clean_text(str(items[t])) for t in tokens], None
        plain = [t for t in tokens if not isinstance(items[t], Mapping)]
        if plain:
            raise RequestError(f"this model reads the knowledge fields {', '.join(fields)}: give each new item a mapping "
                               f"of field -> text (e.g. {{\"{fields[0]}\": \"...\"}}), not one string; "
                               f"{len(plain)} item(s) are not: {', '.join(plain[:20])}", plain)
        allowed = {*fields, "text"}
        unknown = sorted({repr(k) for t in tokens for k in items[t] if k not in allowed})
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown[:20])}: this model reads {', '.join(fields)} "
                               "(and 'text', the item's own text)")
        odd = [t for t in tokens if not all(isinstance(v, str) for v in items[t].values())]
        if odd:
            raise RequestError(f"{len(odd)} item(s) have a field that is not a string: {', '.join(odd[:20])}", odd)
        needs_text = self.net.use_text or self.net.use_codes
        untexted = [t for t in tokens if needs_text and "text" not in items[t]]
        if untexted:
            raise RequestError(f"this model also reads one text per item: give it as \"text\" beside the fields; "
                               f"{len(untexted)} item(s) have none: {', '.join(untexted[:20])}", untexted)
        texts_of = {f: [clean_text(items[t].get(f, "")) for t in tokens] for f in fields}
        texts = [clean_text(items[t].get("text", "")) for t in tokens]
        if not needs_text:  # only shown: the fields stand in for a missing one
            texts = [text or join_fields([texts_of[f][i] for f in fields]) for i, text in enumerate(texts)]
        return texts, texts_of

    def _refuse_known(self, tokens: list[str]) -> None:
        clash = sorted(t for t in tokens if t in self.token_to_id or t in self.aliases)
        if clash:
            raise KnownItemsError(f"{len(clash)} item(s) already in the catalog: {', '.join(clash[:20])}", clash)
        if self._nfc_twins is None:  # new ids are NFC (id_problem); only ids and aliases that are not can look alike
            self._nfc_twins = {unicodedata.normalize("NFC", t): t for t in [*self.token_to_id, *self.aliases]
                               if not unicodedata.is_normalized("NFC", t)}
        twins = sorted(t for t in tokens if t in self._nfc_twins)
        if twins:
            raise KnownItemsError(f"{len(twins)} item(s) already in the catalog in another Unicode form: " + ", ".join(
                f"{t} (as {ascii(self._nfc_twins[t])}, the same after NFC normalisation)" for t in twins[:20]), twins)

    def _encode(self, texts: list[str], frozen: bool = False) -> torch.Tensor:
        """Text vectors (n, plm_dim), ``batch_size`` texts per forward pass (the encoder's activations
        grow with texts x tokens), shortest first so that each batch pads to little more than its own.
        ``frozen``: through the frozen encoder even where the model has a trained text top (knowledge fields)."""
        encoder = self.text_encoder()
        encoder = encoder.encoder if frozen and isinstance(encoder, TopEncoder) else encoder
        size = self.text.batch_size if self.text is not None else 64
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts = [encoder.encode([texts[i] for i in order[start:start + size]]) for start in range(0, len(order), size)]
        stacked = np.concatenate(parts)
        features = np.empty_like(stacked)
        features[order] = stacked
        return torch.from_numpy(features)

    def _encode_fields(self, fields: Mapping[str, list[str]]) -> torch.Tensor:
        """Knowledge vectors (n, fields, plm_dim) from the frozen encoder; an empty field stays a zero vector
        (absent), as in training (``SeqRecDataModule.knowledge_features``)."""
        count = len(next(iter(fields.values())))
        out = torch.zeros(count, len(fields), self.net.plm_dim)
        for column, texts in enumerate(fields.values()):
            rows = [i for i, text in enumerate(texts) if text]
            if rows:
                out[rows, column] = self._encode([texts[i] for i in rows], frozen=True)
        return out

    def _append(self, tokens: list[str], texts: list[str], features: torch.Tensor | None,
                knowledge: torch.Tensor | None = None, fields: Mapping[str, list[str]] | None = None) -> None:
        """Grow every table by the new items; all is computed before anything is swapped in."""
        net = self.net
        with torch.inference_mode():
            features = None if features is None else features.to(torch.float32)
            knowledge = None if knowledge is None else knowledge.to(torch.float32)
            item_codes, new_codes = (None, None) if self.item_codes is None else self.item_codes.extended(features.numpy())
            new_codes = None if new_codes is None else torch.from_numpy(new_codes)
            chunk = self.chunk_size

            def part(values: torch.Tensor | None, start: int) -> torch.Tensor | None:
                return None if values is None else values[start:start + chunk]

            new_rows = torch.cat([net.new_item_vectors(part(features, start), part(new_codes, start),
                                                       part(knowledge, start)) for start in range(0, len(tokens), chunk)])
            table = torch.cat([self.table, new_rows])
            new_ids = torch.arange(len(self.table), len(table))  # past the popularity counts: count 0
            candidates = torch.cat([self.candidates, net.rank_candidates(new_rows, new_ids, features)])
        with torch.no_grad():  # not inference mode: a grown ID table stays trainable
            net.grow(features if net.use_text else None, new_codes, len(tokens), knowledge)
        if item_codes is not None:
            self.item_codes = item_codes
        self.table, self.candidates = table, candidates
        for field, known in self.knowledge_texts.items():
            known.extend(fields[field] if fields is not None else [""] * len(tokens))
        for token, text in zip(tokens, texts):
            self.item_tokens.append(token)
            self.item_texts.append(text)
            self.token_to_id[token] = len(self.item_tokens)

    def text_encoder(self):
        """The model's text encoder, loaded on first use (seconds; recommend never needs it)."""
        if self._text_encoder is None:
            if self.text is None:
                raise DataError("this model does not record its text encoder, so new texts cannot be encoded")
            from unisrec_x.items.encoder import TextEncoder

            encoder = TextEncoder(self.text.encoder, self.text.pooling, self.text.max_tokens, self.text.batch_size,
                                  self.text.precision)
            if self.net.text_top is not None:
                encoder = TopEncoder(encoder, self.net.text_top)
            verify_text_encoder(self, encoder)  # refused: not kept, so every later call refuses too
            self._text_encoder = encoder
        return self._text_encoder

    def item_vectors(self) -> np.ndarray:
        """The (N, D) float32 matrix scores are taken against (L2-normalised for cosine models; with a popularity
        prior, (N, D + 1): the last column is log(1 + training count))."""
        return self.candidates.numpy().astype(np.float32, copy=True)
