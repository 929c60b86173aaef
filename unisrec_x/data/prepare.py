"""Turn each pretraining source into RecBole atomic files (``NAME.inter`` + ``NAME.text``) once.

Office also gets ``Office.item`` (title, description, brand, categories as fields of their own, for
knowledge fields and the multi-field text path) when the data root holds its optional ``office/apao`` text.

A user adds a domain of their own the same way: write those two files and name the prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.data.text import clean_text
from unisrec_x.errors import DataError
from unisrec_x.runtime.paths import cache_dir, data_root

log = logging.getLogger(__name__)

INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]
TEXT_FIELDS = [("item_id", "token"), ("text", "token_seq")]
#: source name -> (folder, file stem) of its prepared files
SOURCE_FILES = {"office": ("office", "Office"), "ml-100k": ("ml-100k", "ml-100k"), "lastfm": ("lastfm", "lastfm"),
                "games": ("games", "Games"), "toys": ("toys", "Toys")}
#: Office's richer item text (``office/apao``, PROVENANCE.md): the fields it has, in its JSON's order
OFFICE_FIELDS = ("title", "description", "brand", "categories")
#: sources whose ``.item`` (fields one by one) is written by preparation, not read from the data root
PREPARED_FIELDS = ("office",)
#: Amazon sources already in atomic form: the ``.item`` fields joined into each item's text
AMAZON_TEXT_FIELDS = {"games": ("title", "categories", "brand"), "toys": ("title", "categories")}


def prepare_office(root: Path, out: Path) -> Path:
    """Office (ReChorus split CSVs + ``Office.text`` keyed by ASIN) -> one time-ordered ``.inter``.

    Train, dev and test rows are written in that order; dev/test share a day with earlier rows
    for many users, and the stable time sort downstream keeps this order on ties.
    """
    src = root / "office"
    index = read_atomic(src / "Office.item2index", names=("asin", "item_id"))
    asin_to_id = dict(zip(index.column("asin"), index.column("item_id")))
    rows = []
    for split in ("train", "dev", "test"):
        table = read_atomic(src / f"{split}.csv", required=("user_id", "item_id", "time"), typed_header=False)
        rows += zip(table.column("user_id"), table.column("item_id"), table.column("time"))
    texts = read_atomic(src / "Office.text", required=("id", "text"), typed_header=False)
    text_rows = []
    for row, (asin, text) in enumerate(zip(texts.column("id"), texts.column("text"))):
        if asin not in asin_to_id:
            raise DataError(f"ASIN {asin!r} is not in Office.item2index", texts.path, texts.lines[row])
        text_rows.append((asin_to_id[asin], clean_text(text)))
    prefix = _write(out, "office", rows, text_rows)
    if (src / "apao" / "Office.item.json").is_file():
        write_atomic(f"{prefix}.item", [("item_id", "token"), *((f, "token_seq") for f in OFFICE_FIELDS)],
                     office_fields(src / "apao", set(asin_to_id.values())))
    return prefix


def office_fields(apao: Path, item_ids: set[str]) -> list[tuple[str, ...]]:
    """``(item_id, title, description, brand, categories)`` rows from APAO's ``Office.item.json`` (keyed by its own
    0-based index) through ``apao_item_map.tsv`` (that index -> the split's ``item_id``), cleaned like the text."""
    path, map_path = apao / "Office.item.json", apao / "apao_item_map.tsv"
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read Office's item fields: {err}", path) from err
    if not isinstance(items, dict):
        raise DataError("expected a JSON object of items", path)
    table = read_atomic(map_path, required=("apao_item_idx", "lrd_item_id"), typed_header=False)
    rows = []
    for row, (index, item_id) in enumerate(zip(table.column("apao_item_idx"), table.column("lrd_item_id"))):
        fields = items.get(index)
        if item_id not in item_ids:
            raise DataError(f"item {item_id!r} is not in Office.item2index", map_path, table.lines[row])
        if not isinstance(fields, dict):
            raise DataError(f"APAO item {index!r} has no entry in {path.name}", map_path, table.lines[row])
        rows.append((item_id, *(clean_text(str(fields.get(f) or "")) for f in OFFICE_FIELDS)))
    return rows


def prepare_ml100k(out: Path) -> Path:
    """MovieLens-100k from the installed ``recbole`` package (never copied into a repo).

    Text = title, genres, year: what a user would read about a movie.
    """
    import recbole

    src = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    inter = read_atomic(src / "ml-100k.inter", required=("user_id", "item_id", "timestamp"))
    items = read_atomic(src / "ml-100k.item", required=("item_id", "movie_title", "release_year", "class"))
    rows = list(zip(inter.column("user_id"), inter.column("item_id"), inter.column("timestamp")))
    text_rows = [(i, ". ".join(p for p in (clean_text(t), clean_text(c), y.strip()) if p))
                 for i, t, y, c in zip(items.column("item_id"), items.column("movie_title"),
                                       items.column("release_year"), items.column("class"))]
    return _write(out, "ml-100k", rows, text_rows)


def prepare_lastfm(root: Path, out: Path) -> Path:
    """Last.fm tag events -> one row per (user, artist) at its first tagging; text = artist name.

    Each raw row is a tag assignment (the ``weight`` column is a tag id), so the same artist
    repeats for every tag; only the first time a user tagged an artist is an interaction.
    """
    src = root / "lastfm"
    inter = read_atomic(src / "lastfm.inter", required=("user_id", "item_id", "timestamp"))
    first: dict[tuple[str, str], float] = {}
    before_1970 = 0
    for user, item, stamp in zip(inter.column("user_id"), inter.column("item_id"), inter.column("timestamp")):
        key, t = (user, item), float(stamp)
        if t < 0:  # two rows dated 1956/57 in a 2005-2011 log: clock errors, not events
            before_1970 += 1
            continue
        if key not in first or t < first[key]:
            first[key] = t
    if before_1970:
        log.warning("lastfm: dropped %d rows dated before 1970", before_1970)
    rows = [(u, i, int(t // 1000)) for (u, i), t in first.items()]  # milliseconds -> seconds
    items = read_atomic(src / "lastfm.item", required=("item_id", "name"))
    text_rows = [(i, clean_text(n)) for i, n in zip(items.column("item_id"), items.column("name"))]
    return _write(out, "lastfm", rows, text_rows)


def prepare_amazon(source: str, root: Path, out: Path) -> Path:
    """Games (2018) and Toys (2014): interactions as they are, text = title. categories. brand.

    Their ``timestamp`` is each item's position in the user's sequence, so the time sort keeps
    the published order; categories add what a title alone does not say (the product's kind).
    """
    folder, name = SOURCE_FILES[source]
    fields = AMAZON_TEXT_FIELDS[source]
    inter = read_atomic(root / folder / f"{name}.inter", required=("user_id", "item_id", "timestamp"))
    items = read_atomic(root / folder / f"{name}.item", required=("item_id", *fields))
    rows = list(zip(inter.column("user_id"), inter.column("item_id"), inter.column("timestamp")))
    columns = [items.column(f) for f in fields]
    text_rows = [(token, ". ".join(p for p in (clean_text(c[row]) for c in columns) if p))
                 for row, token in enumerate(items.column("item_id"))]
    return _write(out, source, rows, text_rows)


def _write(out: Path, source: str, rows: list, text_rows: list) -> Path:
    folder, name = SOURCE_FILES[source]
    prefix = out / folder / name
    write_atomic(f"{prefix}.inter", INTER_FIELDS, rows)
    write_atomic(f"{prefix}.text", TEXT_FIELDS, text_rows)
    log.info("prepared %s: %d interactions, %d item texts -> %s.*", name, len(rows), len(text_rows), prefix)
    return prefix


SOURCES: dict[str, Callable[[Path, Path], Path]] = {
    "office": prepare_office,
    "ml-100k": lambda root, out: prepare_ml100k(out),
    "lastfm": prepare_lastfm,
    "games": lambda root, out: prepare_amazon("games", root, out),
    "toys": lambda root, out: prepare_amazon("toys", root, out),
}


def prepared_dir() -> Path:
    """Default home of prepared sources: ``$UNISREC_X_CACHE/prepared`` (the data root may be read-only)."""
    return cache_dir() / "prepared"


def source_prefix(name: str, root: str | Path | None = None, out: Path | None = None) -> Path:
    """Prefix of a prepared source, preparing it on first use (seconds)."""
    out = out or prepared_dir()
    folder, stem = SOURCE_FILES[name]
    prefix = out / folder / stem
    wanted = [Path(f"{prefix}.inter"), Path(f"{prefix}.text")]
    if name == "office" and root_has_office_fields(root):
        wanted.append(Path(f"{prefix}.item"))  # prepared before the fields were: prepared again (seconds)
    if not all(path.is_file() for path in wanted):
        SOURCES[name](data_root(root), out)
    return prefix


def root_has_office_fields(root: str | Path | None) -> bool:
    """Whether the data root holds Office's optional field-by-field text (``office/apao``)."""
    try:
        return (data_root(root) / "office" / "apao" / "Office.item.json").is_file()
    except DataError:  # no data root: a source prepared earlier is used as it is
        return False


def main(argv: list[str] | None = None) -> None:
    """``unisrec-x prepare``: write atomic files for the pretraining sources."""
    parser = argparse.ArgumentParser(prog="unisrec-x prepare", description=main.__doc__)
    parser.add_argument("sources", nargs="*", help=f"any of {sorted(SOURCES)} (default: all)")
    parser.add_argument("--data_root", help="folder holding the raw datasets (default $UNISREC_X_DATA_ROOT or ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $UNISREC_X_CACHE/prepared)")
    args = parser.parse_args(argv)
    unknown = set(args.sources) - set(SOURCES)
    if unknown:
        parser.error(f"unknown source(s) {sorted(unknown)}; known: {sorted(SOURCES)}")
    for name in args.sources or sorted(SOURCES):
        SOURCES[name](data_root(args.data_root), args.out or prepared_dir())
