"""Atomic-file reading: every malformed input gets a DataError naming file and line."""

from __future__ import annotations

import pytest

from tests.conftest import write
from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.errors import DataError

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def test_reads_real_lastfm_file(real_root):
    table = read_atomic(real_root / "lastfm" / "lastfm.inter", required=("user_id", "item_id", "timestamp"))
    assert len(table) == 64286
    assert table.types == ["token", "token", "float", "float"]
    assert (table.column("user_id")[0], table.column("item_id")[0], table.lines[0]) == ("2", "52", 2)


def test_crlf_is_accepted(tmp_path):
    path = write(tmp_path / "a.inter", (HEADER + "1\t2\t3\n4\t5\t6\n").replace("\n", "\r\n"))
    table = read_atomic(path)
    assert table.column("timestamp") == ["3", "6"]


@pytest.mark.parametrize("content, message, line", [
    ("", "file is empty", None),
    ("user_id\titem_id\n1\t2\n", "no RecBole type suffix", 1),
    ("user_id:token\titem_id:tokn\n1\t2\n", "unknown type 'tokn'", 1),
    (HEADER + "1\t2\t3\n1\t2\n", "2 tab-separated values, expected 3", 3),
    (HEADER, "header but no rows", None),
])
def test_malformed_files(tmp_path, content, message, line):
    path = write(tmp_path / "bad.inter", content)
    with pytest.raises(DataError, match=message) as err:
        read_atomic(path)
    assert err.value.path == str(path) and err.value.line == line


def test_misspelt_column_gets_a_suggestion(tmp_path):
    path = write(tmp_path / "a.inter", "user_id:token\titm_id:token\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(DataError, match=r"missing column 'item_id'.*did you mean 'itm_id'"):
        read_atomic(path, required=("user_id", "item_id"))


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "a.inter", HEADER.encode() + b"1\t2\t3\n1\t\xff\xfe\t4\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        read_atomic(path)
    assert err.value.line == 3


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_atomic(tmp_path / "nope.inter")


def test_write_then_read_round_trip(tmp_path):
    rows = [("u1", ["3", "4"], "5"), ("u2", ["7"], "8")]
    path = tmp_path / "x.train.inter"
    write_atomic(path, [("user_id", "token"), ("item_id_list", "token_seq"), ("item_id", "token")], rows)
    table = read_atomic(path)
    assert table.column("item_id_list") == ["3 4", "7"] and table.column("item_id") == ["5", "8"]
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file was renamed away"


def test_utf8_bom_is_accepted(tmp_path):
    plain = write(tmp_path / "a.inter", HEADER + "1\t2\t3\n")
    bom = write(tmp_path / "b.inter", b"\xef\xbb\xbf" + plain.read_bytes())
    first, second = read_atomic(plain, required=("user_id",)), read_atomic(bom, required=("user_id",))
    assert (second.fields, second.types, second.columns, second.lines) == (first.fields, first.types, first.columns, first.lines)
    headerless = write(tmp_path / "S.item2index", b"\xef\xbb\xbfA1\t0\n")
    assert read_atomic(headerless, names=("token", "index")).column("token") == ["A1"]
