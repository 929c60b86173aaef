"""One dataset as the model sees it: contiguous item ids (0 = padding), texts, sequences."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from unisrec_x.data.interactions import Duplicates, UserSequences, read_benchmark, read_inter
from unisrec_x.data.text import read_field_texts, read_item2index, read_item_fields, read_text_file
from unisrec_x.errors import DataError

log = logging.getLogger(__name__)

MissingText = Literal["error", "empty"]


class TextSource:
    """A domain's item-text files, read on first use: a model that uses no text (SASRec) never
    reads them, so blank, missing or broken texts cannot stop it."""

    def __init__(self, prefix: Path, text_fields: Sequence[str], missing_text: MissingText,
                 first_seen: dict[str, tuple[Path, int]], with_index: bool, item_file: Path | None = None) -> None:
        self.prefix, self.text_fields, self.missing_text = prefix, list(text_fields), missing_text
        self.first_seen, self.with_index = first_seen, with_index
        self.item_file = item_file or Path(f"{prefix}.item")
        self._fields: dict[tuple[str, ...], dict[str, dict[str, str]]] = {}

    @cached_property
    def texts(self) -> dict[str, str]:
        prefix = self.prefix
        text_file, index_file, item_file = Path(f"{prefix}.text"), Path(f"{prefix}.item2index"), Path(f"{prefix}.item")
        if text_file.is_file():
            return read_text_file(text_file, index_file if self.with_index else None)
        if item_file.is_file():
            return read_item_fields(item_file, self.text_fields)
        raise DataError(f"no item text: neither {text_file.name} nor {item_file.name} exists", prefix.parent)

    def of(self, tokens: Sequence[str]) -> list[str]:
        """The texts of ``tokens``; an item without text is an error unless ``missing_text='empty'``."""
        texts = self.texts
        empty = [t for t in tokens if not texts.get(t, "").strip()]
        if empty:
            if self.missing_text == "error":
                path, line = self.first_seen.get(empty[0], (f"{self.prefix}.text", None))
                raise DataError(f"item {empty[0]!r} has no text ({len(empty)} items in all; "
                                "pass missing_text='empty' to allow)", path, line)
            log.warning("%s: %d items have no text and get an empty string", self.prefix.name, len(empty))
        return [texts.get(t, "") for t in tokens]

    def fields_of(self, tokens: Sequence[str], fields: Sequence[str]) -> dict[str, list[str]]:
        """Each field's text of ``tokens`` from the ``.item`` file, ``""`` where an item has none (knowledge is
        optional per item: the model leaves an empty field out)."""
        key = tuple(fields)
        if key not in self._fields:
            if not self.item_file.is_file():
                raise DataError(f"knowledge fields {', '.join(fields)} are read from an .item file, and "
                                f"{self.item_file.name} does not exist", self.item_file)
            self._fields[key] = read_field_texts(self.item_file, fields)
        out = {f: [self._fields[key][f].get(t, "") for t in tokens] for f in fields}
        for field, texts in out.items():
            empty = sum(not t for t in texts)
            if empty:
                log.log(logging.WARNING if empty == len(texts) else logging.INFO,
                        "%s: %d of %d items have no %s", self.item_file.name, empty, len(texts), field)
        return out


class ItemTexts(Sequence[str]):
    """The texts of a list of items, read from a ``TextSource`` on first access."""

    def __init__(self, source: TextSource, tokens: Sequence[str]) -> None:
        self.source, self.tokens = source, list(tokens)

    @cached_property
    def _texts(self) -> list[str]:
        return self.source.of(self.tokens)

    def __getitem__(self, index):
        return self._texts[index]

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented


#: the knowledge field that names the item's own text (whatever the text path joins), not an ``.item`` column
ITEM_TEXT_FIELD = "text"


def item_file_fields(fields: Sequence[str]) -> list[str]:
    """Those of ``fields`` read from an ``.item`` file's columns: all but ``ITEM_TEXT_FIELD``."""
    return [f for f in fields if f != ITEM_TEXT_FIELD]


@dataclass
class Domain:
    """Item ``i`` (1-based) is ``item_tokens[i - 1]`` with text ``item_texts[i - 1]``.

    ``item_texts`` is read from the files on first access (``ItemTexts``) when loaded by ``load_domain``.
    """

    name: str
    item_tokens: list[str]
    item_texts: Sequence[str]
    users: list[str]
    sequences: list[np.ndarray]

    def field_texts(self, fields: Sequence[str]) -> dict[str, list[str]]:
        """Each of ``fields``' text per item (id order), read from the domain's ``.item`` file; the field
        ``ITEM_TEXT_FIELD`` is the item's text as the text path reads it, so a dataset with one text per item
        (a UniSRec ``.text`` release) has one knowledge field too."""
        named = item_file_fields(fields)
        if named and not isinstance(self.item_texts, ItemTexts):
            raise DataError(f"{self.name}: knowledge fields are read from the domain's .item file; this domain was "
                            "not loaded from files (load_domain)")
        out = self.item_texts.source.fields_of(self.item_tokens, named) if named else {}
        if ITEM_TEXT_FIELD in fields:
            out[ITEM_TEXT_FIELD] = list(self.item_texts)
        return {f: out[f] for f in fields}

    def texts_of(self, tokens: list[str], rows: Sequence[int]) -> Sequence[str]:
        """Texts of a subset of items (``rows`` 0-based), still unread when this domain's are."""
        if isinstance(self.item_texts, ItemTexts):
            return ItemTexts(self.item_texts.source, tokens)
        return [self.item_texts[r] for r in rows]

    @property
    def num_items(self) -> int:
        return len(self.item_tokens)


def _item_order(interactions: UserSequences, item2index: dict[str, str] | None) -> list[str]:
    if item2index is not None:  # keep the published index order so ids match the release
        return sorted(item2index.values(), key=int)
    return list(interactions.first_seen)


def load_domain(
    prefix: str | Path,
    text_fields: Sequence[str] = ("title",),
    missing_text: MissingText = "error",
    dedupe: bool = False,
    duplicates: Duplicates = "keep",
    item_file: str | Path | None = None,
) -> Domain:
    """Load ``<prefix>.*`` files, detecting the form present.

    Interactions: ``.train/.valid/.test.inter`` (pre-split) or ``.inter`` (split here by time).
    Text: ``.text`` (+ ``.item2index`` when present) or the ``text_fields`` of ``.item``, read
    when ``item_texts`` is first used (never, for an ID-only model). Knowledge fields
    (``Domain.field_texts``) come from ``item_file`` (default ``<prefix>.item``).
    """
    prefix = Path(prefix)
    name = prefix.name
    bench, plain = Path(f"{prefix}.train.inter"), Path(f"{prefix}.inter")
    if bench.is_file():
        interactions = read_benchmark(prefix)
    elif plain.is_file():
        interactions = read_inter(plain, dedupe=dedupe, duplicates=duplicates)
    else:
        raise DataError(f"no interactions: neither {bench.name} nor {plain.name} exists", prefix.parent)

    index_file = Path(f"{prefix}.item2index")
    item2index = read_item2index(index_file) if index_file.is_file() else None
    tokens = _item_order(interactions, item2index)
    known = set(tokens)
    for token, (path, line) in interactions.first_seen.items():
        if token not in known:
            raise DataError(f"item {token!r} is not in the item index {index_file}", path, line)
    texts = TextSource(prefix, text_fields, missing_text, interactions.first_seen, item2index is not None,
                       None if item_file is None else Path(item_file))
    ids = {t: i + 1 for i, t in enumerate(tokens)}
    sequences = [np.fromiter((ids[t] for t in seq), dtype=np.int64, count=len(seq)) for seq in interactions.sequences]
    return Domain(name, tokens, ItemTexts(texts, tokens), interactions.users, sequences)


def first_users(domain: Domain, max_users: int) -> Domain:
    """The first ``max_users`` users and only the items they touch, re-indexed.

    A real slice for quick runs and tests: encoding the whole catalog is the slow part.
    """
    if max_users >= len(domain.users):
        return domain
    sequences = domain.sequences[:max_users]
    used = np.unique(np.concatenate(sequences))  # sorted old ids, keeps catalog order
    remap = np.zeros(domain.num_items + 1, dtype=np.int64)
    remap[used] = np.arange(1, len(used) + 1)
    tokens = [domain.item_tokens[i - 1] for i in used]
    return Domain(domain.name, tokens, domain.texts_of(tokens, used - 1), domain.users[:max_users],
                  [remap[s] for s in sequences])


def without_items(domain: Domain, tokens: Sequence[str]) -> Domain:
    """The domain with ``tokens`` removed from the catalog and from every history, re-indexed.

    Holds items out of training, e.g. to check that a text model ranks them once they are added.
    """
    index = {t: i + 1 for i, t in enumerate(domain.item_tokens)}
    unknown = [t for t in tokens if t not in index]
    if unknown:
        raise DataError(f"cannot exclude unknown item(s) {unknown[:10]} from {domain.name}")
    keep = np.ones(domain.num_items + 1, dtype=bool)
    keep[[index[t] for t in tokens]] = False
    keep[0] = False
    remap = np.zeros(domain.num_items + 1, dtype=np.int64)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    kept = np.flatnonzero(keep)
    tokens = [domain.item_tokens[i - 1] for i in kept]
    return Domain(domain.name, tokens, domain.texts_of(tokens, kept - 1), domain.users,
                  [remap[s[keep[s]]] for s in domain.sequences])
