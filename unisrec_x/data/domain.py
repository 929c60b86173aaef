"""One dataset as the model sees it: contiguous item ids (0 = padding), texts, sequences."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from unisrec_x.data.interactions import Duplicates, UserSequences, read_benchmark, read_inter
from unisrec_x.data.text import read_item2index, read_item_fields, read_text_file
from unisrec_x.errors import DataError

log = logging.getLogger(__name__)

MissingText = Literal["error", "empty"]


@dataclass
class Domain:
    """Item ``i`` (1-based) is ``item_tokens[i - 1]`` with text ``item_texts[i - 1]``."""

    name: str
    item_tokens: list[str]
    item_texts: list[str]
    users: list[str]
    sequences: list[np.ndarray]

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
) -> Domain:
    """Load ``<prefix>.*`` files, detecting the form present.

    Interactions: ``.train/.valid/.test.inter`` (pre-split) or ``.inter`` (split here by time).
    Text: ``.text`` (+ ``.item2index`` when present) or the ``text_fields`` of ``.item``.
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

    text_file, index_file, item_file = Path(f"{prefix}.text"), Path(f"{prefix}.item2index"), Path(f"{prefix}.item")
    item2index = read_item2index(index_file) if index_file.is_file() else None
    if text_file.is_file():
        texts = read_text_file(text_file, index_file if item2index is not None else None)
    elif item_file.is_file():
        texts = read_item_fields(item_file, text_fields)
    else:
        raise DataError(f"no item text: neither {text_file.name} nor {item_file.name} exists", prefix.parent)

    tokens = _item_order(interactions, item2index)
    known = set(tokens)
    for token, (path, line) in interactions.first_seen.items():
        if token not in known:
            raise DataError(f"item {token!r} is not in the item index {index_file}", path, line)
    empty = [t for t in tokens if not texts.get(t, "").strip()]
    if empty:
        if missing_text == "error":
            path, line = interactions.first_seen.get(empty[0], (text_file, None))
            raise DataError(
                f"item {empty[0]!r} has no text ({len(empty)} items in all; pass missing_text='empty' to allow)", path, line)
        log.warning("%s: %d items have no text and get an empty string", name, len(empty))
    ids = {t: i + 1 for i, t in enumerate(tokens)}
    sequences = [np.fromiter((ids[t] for t in seq), dtype=np.int64, count=len(seq)) for seq in interactions.sequences]
    return Domain(name, tokens, [texts.get(t, "") for t in tokens], interactions.users, sequences)


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
    return Domain(domain.name, [domain.item_tokens[i - 1] for i in used], [domain.item_texts[i - 1] for i in used],
                  domain.users[:max_users], [remap[s] for s in sequences])


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
    return Domain(domain.name, [domain.item_tokens[i - 1] for i in kept], [domain.item_texts[i - 1] for i in kept],
                  domain.users, [remap[s[keep[s]]] for s in domain.sequences])
