"""Property tests of the readers: valid files round-trip; corrupted files raise only DataError.

``FUZZ_EXAMPLES`` sets the examples per property (default 150 keeps CI fast; the closing note
of the reliability work reports a run with several thousand).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.data.domain import load_domain
from unisrec_x.data.interactions import read_inter
from unisrec_x.errors import DataError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cell = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\t\n\r\x85"),
               min_size=1, max_size=12).filter(lambda s: s.strip() == s and s != "")
field_name = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
field_type = st.sampled_from(["token", "token_seq", "float"])


@st.composite
def tables(draw):
    names = draw(st.lists(field_name, min_size=1, max_size=4, unique=True))
    types = [draw(field_type) for _ in names]
    rows = draw(st.lists(st.tuples(*[cell for _ in names]), min_size=1, max_size=15))
    return list(zip(names, types)), rows


@FUZZ
@given(tables())
def test_valid_tables_round_trip(table):
    fields, rows = table
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.inter"
        write_atomic(path, fields, rows)
        first = read_atomic(path)
        write_atomic(path, list(zip(first.fields, first.types)), list(zip(*first.columns.values())))
        second = read_atomic(path)
    assert first.fields == second.fields == [n for n, _ in fields]
    assert first.columns == second.columns == {n: [r[i] for r in rows] for i, (n, _) in enumerate(fields)}


VALID_INTER = (b"user_id:token\titem_id:token\ttimestamp:float\n"
               + b"".join(b"u%d\ti%d\t%d\n" % (u, (u * 7 + k) % 13, k) for u in range(4) for k in range(5)))
VALID_ITEM = b"item_id:token\ttitle:token_seq\n" + b"".join(b"i%d\tItem number %d\n" % (i, i) for i in range(13))


@st.composite
def corruptions(draw, data: bytes):
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "replace" and out:
            out[pos] = draw(st.sampled_from([0x09, 0x0A, 0x0D, 0xFF, 0xC3, 0x00, 0x20, 0x3A, ord("x"), ord("-")]))
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif kind == "delete":
            del out[pos:pos + draw(st.integers(1, 20))]
        else:
            del out[pos:]
    return bytes(out)


@FUZZ
@given(corruptions(VALID_INTER), corruptions(VALID_ITEM))
def test_corrupted_files_raise_only_data_error(inter, item):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "D.inter").write_bytes(inter)
        (Path(tmp) / "D.item").write_bytes(item)
        for read in (lambda: read_atomic(Path(tmp) / "D.inter"), lambda: read_inter(Path(tmp) / "D.inter"),
                     lambda: load_domain(Path(tmp) / "D", text_fields=["title"])):
            try:
                read()
            except DataError as err:  # anything else (IndexError, UnicodeError, ...) fails the test
                assert err.path is not None and err.path.startswith(tmp), f"error names no file: {err}"
