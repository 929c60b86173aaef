"""Turn interaction files into one chronological item sequence per user."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unisrec_x.data.atomic import AtomicTable, read_atomic
from unisrec_x.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
Duplicates = Literal["keep", "drop", "error"]


@dataclass
class UserSequences:
    """Item-token sequences, oldest first, plus where each item token was first seen."""

    users: list[str]
    sequences: list[list[str]]
    first_seen: dict[str, tuple[Path, int]]
    counts: dict[str, int] = field(default_factory=dict)


def _remember(first_seen: dict[str, tuple[Path, int]], tokens: list[str], table: AtomicTable, row: int) -> None:
    for token in tokens:
        if token not in first_seen:
            first_seen[token] = (table.path, table.lines[row])


def read_benchmark(prefix: str | Path) -> UserSequences:
    """Rebuild full sequences from RecBole's pre-split ``.train/.valid/.test.inter`` files.

    UniSRec ships its data this way: every training prefix is a row, the valid and test rows
    hold the last two targets. Rebuilding the full sequence lets one code path serve both file
    forms; each row is checked to be a suffix of the rebuilt sequence, so a file that is not a
    leave-one-out split is refused rather than silently reinterpreted.
    """
    prefix = Path(prefix)
    tables = {s: read_atomic(f"{prefix}.{s}.inter", required=("user_id", "item_id_list", "item_id")) for s in SPLITS}
    per_user: dict[str, list[tuple[str, int]]] = {}
    first_seen: dict[str, tuple[Path, int]] = {}
    for split in SPLITS:
        table = tables[split]
        for row, user in enumerate(table.column("user_id")):
            per_user.setdefault(user, []).append((split, row))
    users, sequences = [], []
    for user, rows in per_user.items():
        train_rows = [r for s, r in rows if s == "train"][::-1]  # files store the longest prefix first
        ordered = [("train", r) for r in train_rows] + [(s, r) for s, r in rows if s != "train"]
        splits_seen = [s for s, _ in rows if s != "train"]
        if splits_seen != ["valid", "test"]:
            table = tables[rows[0][0]]
            raise DataError(f"user {user!r} needs exactly one valid and one test row, found {splits_seen}", table.path, table.lines[rows[0][1]])
        seq: list[str] = []
        for split, row in ordered:
            table = tables[split]
            history = table.column("item_id_list")[row].split()
            target = table.column("item_id")[row].strip()
            if not history:
                raise DataError(f"empty history for user {user!r} (every row needs at least one past item)", table.path, table.lines[row])
            if not target:
                raise DataError(f"empty target item for user {user!r}", table.path, table.lines[row])
            if not seq:
                seq = list(history)
            elif seq[-len(history):] != history:
                raise DataError(f"history of user {user!r} is not the continuation of its earlier rows (not a leave-one-out split)", table.path, table.lines[row])
            _remember(first_seen, history + [target], table, row)
            seq.append(target)
        users.append(user)
        sequences.append(seq)
    return UserSequences(users, sequences, first_seen, {"users": len(users)})


def _timestamp(value: str, table: AtomicTable, row: int) -> float:
    try:
        stamp = float(value)
    except ValueError:
        raise DataError(f"timestamp {value!r} is not a number", table.path, table.lines[row]) from None
    if math.isnan(stamp) or math.isinf(stamp) or stamp < 0:
        raise DataError(f"timestamp {value!r} is not a finite, non-negative number", table.path, table.lines[row])
    return stamp


def read_inter(path: str | Path, min_length: int = 3, dedupe: bool = False, duplicates: Duplicates = "keep") -> UserSequences:
    """Read a plain ``.inter`` file and order each user's items by time (ties keep file order).

    Args:
        path: ``user_id:token item_id:token timestamp:float`` (more columns are ignored).
        min_length: users with fewer interactions cannot give train, valid and test items;
            they are dropped and counted, never a crash.
        dedupe: keep only the first (by time) occurrence of each (user, item) pair, for event
            logs such as Last.fm tag assignments where one row is not one consumption.
        duplicates: rows repeating an earlier (user, item, timestamp) exactly are counted and
            reported; ``keep`` them, ``drop`` them, or stop with an ``error`` naming the line.
    """
    table = read_atomic(path, required=("user_id", "item_id", "timestamp"))
    items = table.column("item_id")
    per_user: dict[str, list[tuple[float, int]]] = {}
    seen_rows: dict[tuple[str, str, float], int] = {}
    exact_repeats = 0
    for row, (user, stamp) in enumerate(zip(table.column("user_id"), table.column("timestamp"))):
        when = _timestamp(stamp, table, row)
        key = (user, items[row], when)
        if key in seen_rows:
            exact_repeats += 1
            if duplicates == "error":
                raise DataError(f"row repeats line {table.lines[seen_rows[key]]} exactly (pass duplicates='drop' or 'keep')",
                                table.path, table.lines[row])
            if duplicates == "drop":
                continue
        else:
            seen_rows[key] = row
        per_user.setdefault(user, []).append((when, row))
    if exact_repeats:
        log.warning("%s: %d rows repeat an earlier row exactly (%s)", path, exact_repeats,
                    "dropped" if duplicates == "drop" else "kept")
    users, sequences, first_seen = [], [], {}
    dropped = duplicates = 0
    for user, events in per_user.items():
        events.sort(key=lambda e: e[0])  # stable: ties stay in file order
        rows = [r for _, r in events]
        if dedupe:
            seen: set[str] = set()
            rows = [r for r in rows if not (items[r] in seen or seen.add(items[r]))]
        duplicates += len(events) - len(rows)
        if len(rows) < min_length:
            dropped += 1
            continue
        for r in rows:
            if not items[r].strip():
                raise DataError(f"empty item id for user {user!r}", table.path, table.lines[r])
            _remember(first_seen, [items[r]], table, r)
        users.append(user)
        sequences.append([items[r] for r in rows])
    if dropped:
        log.warning("%s: dropped %d users with fewer than %d interactions", path, dropped, min_length)
    if not users:
        raise DataError(f"no user has at least {min_length} interactions (leave-one-out needs train, valid and test items)", path)
    return UserSequences(users, sequences, first_seen, {"users": len(users), "dropped_users": dropped,
                                                        "repeated_pairs_removed": duplicates, "exact_duplicate_rows": exact_repeats})
