"""Item text: UniSRec's ``.text`` files or chosen fields of a RecBole ``.item`` file."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Sequence

from unisrec_x.data.atomic import read_atomic
from unisrec_x.errors import DataError

_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Unescape HTML entities and collapse white space, as UniSRec's preprocessing does."""
    return _SPACES.sub(" ", html.unescape(text)).strip()


def read_text_file(text_path: str | Path, item2index_path: str | Path | None = None) -> dict[str, str]:
    """Read ``item_id text`` rows; with an ``.item2index`` map the keys become the indices.

    UniSRec's ``.text`` is keyed by ASIN while its ``.inter`` files use 0-based indices;
    ``.item2index`` is the bridge.
    """
    table = read_atomic(text_path)
    if len(table.fields) != 2:
        raise DataError(f"expected two columns (item id, text), found {table.fields}", table.path, 1)
    key_field, text_field = table.fields
    keys, texts = table.column(key_field), table.column(text_field)
    out: dict[str, str] = {}
    for row, (key, text) in enumerate(zip(keys, texts)):
        if key in out:
            raise DataError(f"item {key!r} has a second text row", table.path, table.lines[row])
        cleaned = clean_text(text)
        if not cleaned:
            raise DataError(f"item {key!r} has only white space as text", table.path, table.lines[row])
        out[key] = cleaned
    if item2index_path is None:
        return out
    index = read_item2index(item2index_path)
    missing = [k for k in index if k not in out]
    if missing:
        raise DataError(f"{len(missing)} items of the index have no text in {table.path}, e.g. {missing[:3]}", item2index_path)
    return {idx: out[key] for key, idx in index.items()}


def read_item2index(path: str | Path) -> dict[str, str]:
    """Headerless ``token<TAB>index`` map: indices are integers, one token per index and one index per token."""
    table = read_atomic(path, names=("token", "index"))
    result: dict[str, str] = {}
    token_of: dict[str, str] = {}
    for row, (token, idx) in enumerate(zip(table.column("token"), table.column("index"))):
        if not idx.strip().lstrip("-").isdigit():
            raise DataError(f"index {idx!r} of {token!r} is not an integer", table.path, table.lines[row])
        index = str(int(idx))
        if token in result:
            raise DataError(f"item {token!r} appears a second time (expected each item once)", table.path, table.lines[row])
        if index in token_of:
            raise DataError(f"index {index} is given to both {token_of[index]!r} and {token!r} (expected one item per index)",
                            table.path, table.lines[row])
        result[token], token_of[index] = index, token
    return result


def join_fields(parts: Sequence[str]) -> str:
    """Field texts as one item text, as ``read_item_fields`` joins them (empty fields are skipped)."""
    return ". ".join(p for p in parts if p)


def read_item_fields(item_path: str | Path, fields: Sequence[str], max_chars: int | None = None) -> dict[str, str]:
    """Join chosen ``.item`` fields into one text per item (empty fields are skipped)."""
    table = read_atomic(item_path, required=("item_id", *fields))
    out: dict[str, str] = {}
    columns = [table.column(f) for f in fields]
    for row, token in enumerate(table.column("item_id")):
        if token in out:
            raise DataError(f"item {token!r} has a second row (expected each item_id once)", table.path, table.lines[row])
        text = join_fields([clean_text(col[row]) for col in columns])
        if max_chars is not None:
            text = text[:max_chars]
        out[token] = text
    return out


def read_field_texts(item_path: str | Path, fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each of ``fields`` of an ``.item`` file as a text of its own per item (cleaned; ``""`` where empty).

    The knowledge fields (``UniSRec.knowledge_fields``) are encoded one by one, not joined into one text.
    A field the file lacks is a ``DataError`` naming the file and the field.
    """
    table = read_atomic(item_path, required=("item_id", *fields))
    out: dict[str, dict[str, str]] = {f: {} for f in fields}
    columns = [(out[f], table.column(f)) for f in fields]
    seen: set[str] = set()
    for row, token in enumerate(table.column("item_id")):
        if token in seen:
            raise DataError(f"item {token!r} has a second row (expected each item_id once)", table.path, table.lines[row])
        seen.add(token)
        for texts, column in columns:
            texts[token] = clean_text(column[row])
    return out
