"""Read and write RecBole atomic files: tab-separated, header cells ``name:type``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from unisrec_x.errors import DataError
from unisrec_x.runtime.paths import atomic_write_bytes

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


@dataclass
class AtomicTable:
    """Columns of raw strings plus the file line of each row, for error messages."""

    path: Path
    fields: list[str]
    types: list[str]
    columns: dict[str, list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.lines)

    def column(self, name: str) -> list[str]:
        return self.columns[name]


def _decode(path: Path, raw: bytes | None = None) -> str:
    raw = path.read_bytes() if raw is None else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"bytes that are not UTF-8 at byte {err.start} (files must be UTF-8)", path, line) from None
    # Editors on Windows may start a UTF-8 file with a byte-order mark; it is not part of the first field name.
    return text.removeprefix("\ufeff")


def _parse_header(cells: list[str], path: Path) -> tuple[list[str], list[str]]:
    names, types = [], []
    for cell in cells:
        name, sep, ftype = cell.strip().rpartition(":")
        if not sep or not name:
            raise DataError(
                f"header cell {cell!r} has no RecBole type suffix (expected name:type, type one of {', '.join(FIELD_TYPES)})",
                path, 1)
        if ftype not in FIELD_TYPES:
            raise DataError(f"header cell {cell!r} has unknown type {ftype!r} (expected one of {', '.join(FIELD_TYPES)})", path, 1)
        names.append(name)
        types.append(ftype)
    if len(set(names)) != len(names):
        raise DataError(f"header repeats a field name: {names}", path, 1)
    return names, types


def read_atomic(
    path: str | Path,
    required: Sequence[str] = (),
    names: Sequence[str] | None = None,
    typed_header: bool = True,
    raw: bytes | None = None,
) -> AtomicTable:
    """Read an atomic file, checking every row.

    Args:
        path: the file.
        required: field names that must be present (a misspelling gets a suggestion).
        names: for headerless files (``.item2index``), the column names; every column is a token.
        typed_header: ``False`` reads a plain header (``user_id<TAB>item_id``, as in ReChorus'
            CSVs) whose columns are all tokens.
        raw: the file's bytes, already read (e.g. through a directory handle); ``path`` then only names it.
    """
    path = Path(path)
    if raw is None and not path.is_file():
        raise DataError("file not found", path)
    text = _decode(path, raw)
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    rows = [r[:-1] if r.endswith("\r") else r for r in rows]  # CRLF files are accepted as is
    if not rows or (names is None and len(rows) == 1 and not rows[0].strip()):
        raise DataError("file is empty" + ("" if names else " (expected a header line name:type ...)"), path)
    if names is None and typed_header:
        fields, types = _parse_header(rows[0].split("\t"), path)
        first_line, body = 2, rows[1:]
    elif names is None:
        fields = [cell.strip() for cell in rows[0].split("\t")]
        types, first_line, body = ["token"] * len(fields), 2, rows[1:]
    else:
        fields, types = list(names), ["token"] * len(names)
        first_line, body = 1, rows
    for want in required:
        if want not in fields:
            close = difflib.get_close_matches(want, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"missing column {want!r} (columns present: {', '.join(fields)}){hint}", path, 1 if names is None else None)
    columns: dict[str, list[str]] = {f: [] for f in fields}
    lines: list[int] = []
    cols = [columns[f] for f in fields]
    width = len(fields)
    for offset, row in enumerate(body):
        line_no = first_line + offset
        if not row.strip():
            continue  # blank lines (often a trailing one) carry no data
        cells = row.split("\t")
        if len(cells) != width:
            raise DataError(f"{len(cells)} tab-separated values, expected {width} ({', '.join(fields)})", path, line_no)
        for col, cell in zip(cols, cells):
            col.append(cell)
        lines.append(line_no)
    if not lines:
        raise DataError("file has a header but no rows", path)
    return AtomicTable(path, fields, types, columns, lines)


def parse_int(value: str, table: AtomicTable, row: int, field: str) -> int:
    """An integer cell, or a DataError naming the line and the value."""
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{field} {value!r} is not an integer index", table.path, table.lines[row]) from None


def write_atomic(path: str | Path, fields: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> None:
    """Write rows under a ``name:type`` header, atomically (temp file + rename)."""
    out = ["\t".join(f"{name}:{ftype}" for name, ftype in fields)]
    for row in rows:
        cells = [" ".join(map(str, cell)) if isinstance(cell, (list, tuple)) else str(cell) for cell in row]
        if any("\t" in c or "\n" in c for c in cells):
            raise DataError(f"value contains a tab or newline and cannot be written: {cells}", path)
        out.append("\t".join(cells))
    atomic_write_bytes(Path(path), ("\n".join(out) + "\n").encode("utf-8"))
