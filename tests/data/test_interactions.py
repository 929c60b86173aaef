"""Sequences from both file forms, checked against the real files and hand-made ones."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import write
from unisrec_x.data.domain import first_users, load_domain
from unisrec_x.data.interactions import read_benchmark, read_inter
from unisrec_x.errors import DataError


def test_scientific_rebuild_matches_every_valid_and_test_row(real_root):
    prefix = real_root / "scientific" / "Scientific"
    seqs = read_benchmark(prefix)
    assert len(seqs.users) == 8442 and sum(map(len, seqs.sequences)) == 59427
    by_user = dict(zip(seqs.users, seqs.sequences))
    for split, back in (("valid", 1), ("test", 0)):
        rows = (prefix.parent / f"Scientific.{split}.inter").read_text().splitlines()[1:]
        for row in rows:
            user, history, target = row.split("\t")
            seq = by_user[user]
            end = len(seq) - back - 1
            assert seq[end] == target
            assert seq[max(0, end - 50):end] == history.split()


def test_scientific_domain_ids_and_texts(real_root):
    domain = load_domain(real_root / "scientific" / "Scientific")
    assert domain.num_items == 4385 and domain.item_tokens[:2] == ["0", "1"]
    asin_of_index0 = next(line.split("\t")[0] for line in (real_root / "scientific" / "Scientific.item2index").read_text().splitlines()
                          if line.endswith("\t0"))
    text_row = next(line for line in (real_root / "scientific" / "Scientific.text").read_text().splitlines()
                    if line.startswith(asin_of_index0 + "\t"))
    assert domain.item_texts[0] == " ".join(text_row.split("\t")[1].split())
    assert all(s.min() >= 1 for s in domain.sequences)  # 0 stays padding


def test_first_users_slice_is_reindexed(real_root):
    domain = load_domain(real_root / "scientific" / "Scientific")
    part = first_users(domain, 50)
    assert len(part.users) == 50
    ids = np.concatenate(part.sequences)
    assert ids.min() == 1 and ids.max() == part.num_items == len(np.unique(ids))
    # the same tokens in the same order as the full domain
    assert [part.item_tokens[i - 1] for i in part.sequences[3]] == [domain.item_tokens[i - 1] for i in domain.sequences[3]]


def test_plain_inter_sorts_by_time_keeping_file_order_on_ties(tmp_path):
    path = write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
                 "u\ta\t5\nu\tb\t1\nu\tc\t5\nu\td\t3\nv\tx\t1\nv\ty\t2\n")
    seqs = read_inter(path)
    assert seqs.users == ["u"] and seqs.sequences == [["b", "d", "a", "c"]]
    assert seqs.counts["dropped_users"] == 1  # v has 2 < 3 interactions


def test_dedupe_keeps_first_time(tmp_path):
    path = write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
                 "u\ta\t1\nu\ta\t2\nu\tb\t3\nu\tc\t4\n")
    assert read_inter(path, dedupe=True).sequences == [["a", "b", "c"]]


@pytest.mark.parametrize("stamp, message", [("abc", "not a number"), ("nan", "finite"), ("-5", "non-negative")])
def test_bad_timestamps(tmp_path, stamp, message):
    path = write(tmp_path / "d.inter", f"user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\t{stamp}\nu\tc\t3\n")
    with pytest.raises(DataError, match=message) as err:
        read_inter(path)
    assert err.value.line == 3


def test_no_user_long_enough(tmp_path):
    path = write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\n")
    with pytest.raises(DataError, match="no user has at least 3"):
        read_inter(path)


def _bench(tmp_path, train_rows: str, valid: str = "u\ta b c\td\n", test: str = "u\ta b c d\te\n"):
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    write(tmp_path / "B.train.inter", head + train_rows)
    write(tmp_path / "B.valid.inter", head + valid)
    write(tmp_path / "B.test.inter", head + test)
    return tmp_path / "B"


def test_benchmark_empty_history_is_refused(tmp_path):
    prefix = _bench(tmp_path, "u\ta b\tc\nu\t\tb\n")
    with pytest.raises(DataError, match="empty history") as err:
        read_benchmark(prefix)
    assert err.value.path.endswith("B.train.inter") and err.value.line == 3


def test_benchmark_rows_that_do_not_chain_are_refused(tmp_path):
    prefix = _bench(tmp_path, "u\ta b\tc\nu\ta\tb\n", valid="u\ta X c\td\n")
    with pytest.raises(DataError, match="not the continuation") as err:
        read_benchmark(prefix)
    assert err.value.path.endswith("B.valid.inter") and err.value.line == 2


def test_item_without_text_errors_or_is_allowed(tmp_path):
    _bench(tmp_path, "u\ta b\tc\nu\ta\tb\n")
    write(tmp_path / "B.item", "item_id:token\ttitle:token_seq\na\tAlpha\nb\tBeta\nc\tGamma\nd\tDelta\n")
    domain = load_domain(tmp_path / "B")  # text is read when first used: an ID-only model never does
    with pytest.raises(DataError, match="item 'e' has no text") as err:
        domain.item_texts[0]
    assert err.value.path.endswith("B.test.inter") and err.value.line == 2
    domain = load_domain(tmp_path / "B", missing_text="empty")
    assert domain.item_texts == ["Alpha", "Beta", "Gamma", "Delta", ""]


def test_whitespace_only_text_is_refused(tmp_path):
    path = write(tmp_path / "S.text", "item_id:token\ttext:token_seq\na\tfine\nb\t   \n")
    from unisrec_x.data.text import read_text_file
    with pytest.raises(DataError, match="only white space") as err:
        read_text_file(path)
    assert err.value.line == 3


def test_non_integer_index(tmp_path):
    from unisrec_x.data.text import read_item2index
    path = write(tmp_path / "S.item2index", "A1\t0\nA2\tone\n")
    with pytest.raises(DataError, match="'one' of 'A2' is not an integer") as err:
        read_item2index(path)
    assert err.value.line == 2


def test_missing_dataset_names_the_folder(tmp_path):
    with pytest.raises(DataError, match="no interactions"):
        load_domain(tmp_path / "Nothing")


def test_unknown_item_in_test_split_names_the_line(tmp_path):
    _bench(tmp_path, "u\t0 1\t2\nu\t0\t1\n", valid="u\t0 1 2\t3\n", test="u\t0 1 2 3\t99\n")
    write(tmp_path / "B.item2index", "A\t0\nB\t1\nC\t2\nD\t3\n")
    write(tmp_path / "B.text", "item_id:token\ttext:token_seq\nA\talpha\nB\tbeta\nC\tgamma\nD\tdelta\n")
    with pytest.raises(DataError, match="item '99' is not in the item index") as err:
        load_domain(tmp_path / "B")
    assert err.value.path.endswith("B.test.inter") and err.value.line == 2


@pytest.mark.parametrize("policy, kept", [("keep", 5), ("drop", 4)])
def test_exact_duplicate_rows_are_counted_and_follow_the_policy(tmp_path, policy, kept, caplog):
    path = write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
                 "u\ta\t1\nu\tb\t2\nu\tb\t2\nu\tc\t3\nu\td\t4\n")
    seqs = read_inter(path, duplicates=policy)
    assert seqs.counts["exact_duplicate_rows"] == 1 and len(seqs.sequences[0]) == kept
    assert "1 rows repeat an earlier row exactly" in caplog.text


def test_exact_duplicate_rows_can_be_an_error(tmp_path):
    path = write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\t2\nu\tb\t2\n")
    with pytest.raises(DataError, match="repeats line 3 exactly") as err:
        read_inter(path, duplicates="error")
    assert err.value.line == 4


def test_long_histories_are_truncated_and_counted(real_root):
    from unisrec_x.data.sequences import SequenceExamples

    domain = load_domain(real_root / "scientific" / "Scientific")
    test = SequenceExamples(domain.sequences, "test", max_seq_len=50)
    assert test.truncated == sum(len(s) - 1 > 50 for s in domain.sequences) == 3  # PROVENANCE: 3 users exceed 51
    assert int(test.hist_len.max()) == 50


def test_item_ids_shared_across_domains_stay_separate(real_root, tmp_path, caplog):
    from unisrec_x.data.multidomain import merge_domains
    from unisrec_x.data.prepare import prepare_office

    office = load_domain(prepare_office(real_root, tmp_path))
    scientific = load_domain(real_root / "scientific" / "Scientific")
    # Scientific is keyed by index, so make the overlap visible the way a user's own ASIN-keyed files would
    asin = {v: k for k, v in (l.split("\t") for l in (real_root / "scientific" / "Scientific.item2index").read_text().splitlines())}
    scientific.item_tokens = [asin[t] for t in scientific.item_tokens]
    office_asin = {v: k for k, v in (l.split("\t") for l in (real_root / "office" / "Office.item2index").read_text().splitlines())}
    office.item_tokens = [office_asin[t] for t in office.item_tokens]
    merged = merge_domains([scientific, office])
    assert "11 item ids appear in more than one domain" in caplog.text  # the tapes listed in both categories
    assert merged.num_items == scientific.num_items + office.num_items


@pytest.mark.parametrize("content, message", [
    ("A1\t0\nA2\t1\nA1\t2\n", r"item 'A1' appears a second time \(expected each item once\)"),
    ("A1\t0\nA2\t1\nA3\t01\n", r"index 1 is given to both 'A2' and 'A3' \(expected one item per index\)"),
])
def test_item2index_must_be_one_to_one(tmp_path, content, message):
    from unisrec_x.data.text import read_item2index
    path = write(tmp_path / "S.item2index", content)
    with pytest.raises(DataError, match=message) as err:
        read_item2index(path)
    assert err.value.path == str(path) and err.value.line == 3


def test_item_file_with_a_repeated_id_is_refused_like_text_files(tmp_path):
    from unisrec_x.data.text import read_item_fields
    path = write(tmp_path / "B.item", "item_id:token\ttitle:token_seq\na\tAlpha\nb\tBeta\nc\tGamma\nb\tBeta again\n")
    with pytest.raises(DataError, match=r"item 'b' has a second row \(expected each item_id once\)") as err:
        read_item_fields(path, ["title"])
    assert err.value.path.endswith("B.item") and err.value.line == 5


def test_files_starting_with_a_utf8_bom_read_as_without(tmp_path):
    rows = "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\t2\nu\tc\t3\n"
    plain, bom = write(tmp_path / "p.inter", rows), write(tmp_path / "b.inter", b"\xef\xbb\xbf" + rows.encode())
    assert read_inter(bom).sequences == read_inter(plain).sequences == [["a", "b", "c"]]
    from unisrec_x.data.text import read_item2index, read_text_file
    write(tmp_path / "S.text", b"\xef\xbb\xbfitem_id:token\ttext:token_seq\nA1\tOne\nA2\tTwo\n")
    write(tmp_path / "S.item2index", b"\xef\xbb\xbfA1\t0\nA2\t1\n")
    assert read_item2index(tmp_path / "S.item2index") == {"A1": "0", "A2": "1"}
    assert read_text_file(tmp_path / "S.text", tmp_path / "S.item2index") == {"0": "One", "1": "Two"}
