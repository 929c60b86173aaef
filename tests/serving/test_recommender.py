"""Recommender on a model trained on real Scientific data without one real item."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from unisrec_x.serving.recommender import KnownItemsError, Recommender, RequestError, TextSettings
from unisrec_x.model.unisrec import UniSRec
from tests.conftest import assert_close_f32
from tests.serving.conftest import HELD_OUT, SAME_FILAMENT, fixed_text_encoder


@pytest.fixture
def recommender(held_out_checkpoint, real_root, shared_cache, monkeypatch) -> Recommender:
    monkeypatch.setenv("UNISREC_X_CACHE", str(shared_cache))
    return Recommender.from_checkpoint(held_out_checkpoint, str(real_root))


@pytest.fixture
def code_recommender(held_out_codes_checkpoint, real_root, shared_cache, monkeypatch) -> Recommender:
    monkeypatch.setenv("UNISREC_X_CACHE", str(shared_cache))
    return Recommender.from_checkpoint(held_out_codes_checkpoint, str(real_root))


@pytest.fixture
def model(request) -> Recommender:
    """The inductive model or the text + codes one (semantic IDs): both serve, save, export and grow."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("model", ["recommender", "code_recommender"], indirect=True)
def test_new_item_added_by_text_alone_ranks_in_the_top_5_for_its_near_twins(model, held_out_text):
    recommender = model
    assert HELD_OUT not in recommender.token_to_id  # the model never saw it
    with pytest.raises(RequestError, match=HELD_OUT):
        recommender.recommend([[HELD_OUT]])
    before = recommender.num_items
    assert recommender.add_items({HELD_OUT: held_out_text}) == [HELD_OUT]
    assert recommender.num_items == before + 1
    # A 2-epoch model of 300 users: the new item is among the first 5 of 4,386 (by chance 1 in ~900),
    # next to other brands' 1.75 mm PETG spools, which rank above it in some training runs.
    for history in (SAME_FILAMENT, SAME_FILAMENT[:2]):  # all six other colours, or two only
        top = recommender.recommend([history], k=5, exclude_seen=True)[0]
        new = [r for r in top if r.item == HELD_OUT]
        assert new and new[0].text == held_out_text, [r.item for r in top]


@pytest.mark.parametrize("model", ["recommender", "code_recommender"], indirect=True)
def test_recommend_equals_full_scoring_of_the_network(model):
    recommender = model
    histories = [SAME_FILAMENT, ["7"], ["1", "2", "3", "5"]]
    item_seq, seq_len = recommender.encode_histories(histories)
    net = recommender.net
    with torch.inference_mode():
        table = net.item_table()
        full = net.score(net.encode_sequences(item_seq, seq_len, table), table)  # (B, N), the plain path
    expected = full.topk(10, dim=1)
    results = recommender.recommend(histories, k=10)
    for row, recs in enumerate(results):
        assert [recommender.token_to_id[r.item] - 1 for r in recs] == expected.indices[row].tolist()
        assert_close_f32([r.score for r in recs], expected.values[row])


def test_exclude_seen_never_returns_history_items(recommender):
    history = SAME_FILAMENT
    seen = recommender.recommend([history], k=20)[0]
    assert {r.item for r in seen} & set(history)  # near twins score high, so the flag matters here
    unseen = recommender.recommend([history], k=20, exclude_seen=True)[0]
    assert len(unseen) == 20 and not {r.item for r in unseen} & set(history)
    # older than the model's window still counts as seen: the twins first, then 60 other items
    long = SAME_FILAMENT + [t for t in recommender.item_tokens if t not in SAME_FILAMENT][:60]
    assert len(long) > recommender.max_history
    unseen = recommender.recommend([long], k=50, exclude_seen=True)[0]
    assert len(unseen) == 50 and not {r.item for r in unseen} & set(long)


def test_asins_work_as_aliases_of_the_release_indices(recommender, real_root, tmp_path):
    from unisrec_x.data.text import read_item2index

    index = read_item2index(real_root / "scientific" / "Scientific.item2index")  # ASIN -> index
    asin_of = {i: a for a, i in index.items()}
    by_index = recommender.recommend([SAME_FILAMENT], k=5)[0]
    by_asin = recommender.recommend([[asin_of[t] for t in SAME_FILAMENT]], k=5)[0]
    assert by_asin == by_index
    assert [r.alias for r in by_index] == [asin_of[r.item] for r in by_index]
    again = Recommender.from_checkpoint(recommender.save(tmp_path / "model"))
    assert again.recommend([[asin_of[t] for t in SAME_FILAMENT]], k=5)[0] == by_index
    with pytest.raises(RequestError, match="already in the catalog"):
        recommender.add_items({asin_of["2"]: "a clash through the alias"})


def test_long_history_keeps_its_last_items(recommender):
    tokens = recommender.item_tokens[:120]
    long = recommender.recommend([tokens], k=5)[0]
    assert long == recommender.recommend([tokens[-recommender.max_history:]], k=5)[0]


@pytest.mark.parametrize("histories, k, message", [
    ([["no-such-item", "2", "also-missing"]], 10, "2 unknown item.*also-missing, no-such-item"),
    ([[]], 10, "history 0 is empty"),
    ([], 10, "no histories"),
    ([["2"]], 0, "k must be between 1 and"),
    ([["2"]], 10**6, "k must be between 1 and"),
])
def test_bad_requests_say_what_is_wrong(recommender, histories, k, message):
    with pytest.raises(RequestError, match=message):
        recommender.recommend(histories, k=k)


def test_add_items_refuses_known_or_blank_items(recommender):
    with pytest.raises(RequestError, match="already in the catalog: 2"):
        recommender.add_items({"2": "anything"})
    with pytest.raises(RequestError, match="empty text: new"):
        recommender.add_items({"new": "   "})


@pytest.mark.parametrize("model", ["recommender", "code_recommender"], indirect=True)
def test_model_directory_round_trip_keeps_added_items(model, held_out_text, tmp_path):
    recommender = model
    recommender.add_items({HELD_OUT: held_out_text})
    expected = recommender.recommend([SAME_FILAMENT], k=10)
    recommender.save(tmp_path / "model")
    again = Recommender.from_checkpoint(tmp_path / "model")
    assert again.num_items == recommender.num_items and again.item_tokens[-1] == HELD_OUT
    got = again.recommend([SAME_FILAMENT], k=10)
    if recommender.item_codes is not None:  # the added item's codes and the quantizer travel with the model
        np.testing.assert_array_equal(again.item_codes.codes, recommender.item_codes.codes)
        features = recommender._encode([held_out_text]).numpy()
        np.testing.assert_array_equal(again.item_codes.quantizer.encode(features), recommender.item_codes.codes[-1:, :-1])
    assert [r.item for r in got[0]] == [r.item for r in expected[0]]
    assert_close_f32([r.score for r in got[0]], [r.score for r in expected[0]])


@pytest.mark.parametrize("model", ["recommender", "code_recommender"], indirect=True)
def test_export_reproduces_scores_without_this_package(model, tmp_path):
    recommender = model
    histories = [SAME_FILAMENT, ["7"], ["1", "2", "3", "5"]]
    item_seq, seq_len = recommender.encode_histories(histories)
    with torch.inference_mode():
        net = recommender.net
        expected = net.score(net.encode_sequences(item_seq, seq_len, recommender.table), recommender.table)
    out = recommender.export(tmp_path / "export")
    np.save(tmp_path / "item_seq.npy", item_seq.numpy())
    np.save(tmp_path / "seq_len.npy", seq_len.numpy())
    script = f"""
import sys, numpy as np, torch
encoder = torch.jit.load({str(out / 'query_encoder.pt')!r})
vectors = np.load({str(out / 'item_vectors.npy')!r})
query = encoder(torch.from_numpy(np.load({str(tmp_path / 'item_seq.npy')!r})),
                torch.from_numpy(np.load({str(tmp_path / 'seq_len.npy')!r})))
np.save({str(tmp_path / 'scores.npy')!r}, query.detach().numpy() @ vectors.T)
assert not any(name.startswith('unisrec_x') for name in sys.modules), 'export needed unisrec_x'
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    scores = np.load(tmp_path / "scores.npy")
    assert scores.shape == (3, recommender.num_items)
    assert_close_f32(scores, expected)  # numpy's BLAS vs torch's: relative to the scores' scale
    ids = json.loads((out / "item_ids.json").read_text())
    assert ids == recommender.item_tokens == (out / "item_ids.txt").read_text().splitlines()  # plain ids: both
    assert json.loads((out / "manifest.json").read_text())["items"] == recommender.num_items


def test_transductive_new_items_fall_back_to_their_text_vector(monkeypatch):
    torch.manual_seed(0)
    net = UniSRec(num_items=5, plm_dim=8, hidden_dim=6, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2,
                  use_text=True, use_item_id=True)
    features = torch.randn(6, 8)
    features[0] = 0
    rec = Recommender(net, list("abcde"), list("ABCDE"), features, TextSettings("unused"))
    new_features = torch.randn(1, 8)
    fixed_text_encoder(monkeypatch, rec, new_features.numpy())
    rec.add_items({"f": "a new thing"})
    with torch.inference_mode():
        expected = net.adapter.eval()(new_features)[0]
    torch.testing.assert_close(rec.table[6], expected)  # no ID part: the text vector alone
    assert net.num_items == 6 and net.item_embedding.weight.shape[0] == 7
    assert rec.recommend([["f"]], k=6)[0]  # rankable and usable in histories at once


def test_id_only_model_cannot_add_items():
    net = UniSRec(num_items=3, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, use_text=False,
                  use_item_id=True, similarity="dot")
    rec = Recommender(net, list("abc"), list("ABC"), None, None)
    with pytest.raises(RequestError, match="no text side"):
        rec.add_items({"d": "text"})


def test_broken_model_directories_are_named(recommender, tmp_path):
    from unisrec_x.errors import DataError

    model = recommender.save(tmp_path / "model")
    manifest = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**manifest, "checksums": None}))  # the reader's own check, not the sum
    np.save(model / "item_features.npy", np.zeros((3, 384), np.float32))
    with pytest.raises(DataError, match=r"item_features.npy.*has shape \(3, 384\), expected"):
        Recommender.from_checkpoint(model)
    (model / "model.json").unlink()
    with pytest.raises(DataError, match="model.json is missing"):
        Recommender.from_checkpoint(model)


def _tiny(batch_size: int = 64) -> Recommender:
    """An inductive text model on five items with random text vectors (no text encoder loaded)."""
    torch.manual_seed(0)
    net = UniSRec(num_items=5, plm_dim=8, hidden_dim=6, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2,
                  use_text=True, use_item_id=False)
    features = torch.randn(6, 8)
    features[0] = 0
    return Recommender(net, list("abcde"), list("ABCDE"), features, TextSettings("unused", batch_size=batch_size))


class VectorPerText:
    """Stands in for the text encoder: a fixed random vector per text; records each forward pass."""

    def __init__(self, delay: float = 0.0) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.passes: list[int] = []
        self.delay = delay

    def encode(self, texts):
        import time

        time.sleep(self.delay)
        self.passes.append(len(texts))
        rng = np.random.default_rng
        return np.stack([self.vectors.setdefault(t, rng(len(self.vectors)).standard_normal(8).astype(np.float32))
                         for t in texts])


@pytest.mark.parametrize("token, why", [
    ("EVIL\ud800", "not valid UTF-8"), ("", "empty"), ("   ", "empty"), ("a\tb", "control character"),
    ("a\nb", "control character"), ("a\rb", "control character"), ("nul\x00", "control character"),
])
def test_invalid_ids_are_refused_before_anything_changes(token, why, monkeypatch):
    rec = _tiny()
    encoder = VectorPerText()
    monkeypatch.setattr(rec, "text_encoder", lambda: encoder)
    expected = rec.recommend([["a", "b"]], k=5)
    with pytest.raises(RequestError, match=f"1 invalid item id.*{why}") as refused:
        rec.add_items({"fine": "a good text", token: "another good text"})
    assert refused.value.items == [token.encode("utf-8", "backslashreplace").decode()]
    assert encoder.passes == [] and rec.num_items == 5 and rec.table.shape[0] == 6
    assert rec.recommend([["a", "b"]], k=5) == expected


@pytest.mark.parametrize("token, why", [
    ("a\x85b", r"line break or other control character \(U\+0085\)"),  # str.splitlines() splits there
    ("a\u2028b", r"line break .*\(U\+2028\)"), ("a\u2029b", r"line break .*\(U\+2029\)"),
    ("\u200b", r"made only of invisible characters \(U\+200B\)"), ("\u00ad", r"invisible characters \(U\+00AD\)"),
    ("\u200b\u2060\u00ad", "made only of invisible characters"), ("\u3164", "made only of invisible characters"),
    (" a", "starts or ends with white space"), ("a\u00a0", "starts or ends with white space"),
    ("a\u200b", "or an invisible character"),
    ("cafe\u0301", r"not in Unicode NFC form \(composed, as 'caf\\xe9'\)"),
    ("x" * 600_000, r"600,000 characters long \(at most 256\)"),
])
def test_ids_that_split_lines_show_nothing_or_look_like_others_are_refused(token, why, monkeypatch):
    rec = _tiny()
    encoder = VectorPerText()
    monkeypatch.setattr(rec, "text_encoder", lambda: encoder)
    with pytest.raises(RequestError, match=f"^1 invalid item id\\(s\\): '.*': .*{why}") as refused:
        rec.add_items({"fine": "a good text", token: "another good text"})
    assert len(str(refused.value)) < 400 and len(refused.value.items[0]) < 400  # a long id is not echoed whole
    assert encoder.passes == [] and rec.num_items == 5
    assert rec.add_items({"caf\u00e9 au lait": "ok", "n\u200dm": "ok", "日本": "ok", "a b": "ok"})  # all still fine


def test_an_id_equal_to_a_catalog_id_after_nfc_is_refused_saying_so(monkeypatch):
    torch.manual_seed(0)
    net = UniSRec(num_items=2, plm_dim=8, hidden_dim=6, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    features = torch.randn(3, 8)
    rec = Recommender(net, ["cafe\u0301", "tea"], ["Coffee", "Tea"], features, TextSettings("unused"),
                      aliases={"\u212b": "tea"})  # a dataset's ids: decomposed e + accent, and the Angstrom sign
    monkeypatch.setattr(rec, "text_encoder", lambda: VectorPerText())
    with pytest.raises(KnownItemsError, match=r"^2 item\(s\) already in the catalog in another Unicode form: "
                                              r"caf\u00e9 \(as 'cafe\\u0301', the same after NFC normalisation\), "
                                              r"\u00c5 \(as '\\u212b', the same") as refused:
        rec.add_items({"caf\u00e9": "Coffee again", "\u00c5": "a clash through the alias"})
    assert refused.value.items == ["caf\u00e9", "\u00c5"] and rec.num_items == 2


def test_lone_surrogates_in_histories_or_texts_are_request_errors(monkeypatch):
    rec = _tiny()
    monkeypatch.setattr(rec, "text_encoder", lambda: VectorPerText())
    with pytest.raises(RequestError, match=r"not valid UTF-8 \(lone surrogate\): EVIL\\ud800"):
        rec.recommend([["a", "EVIL\ud800"]])
    with pytest.raises(RequestError, match="text that is not valid UTF-8.*: new"):
        rec.add_items({"new": "text \udc80 with a lone surrogate"})
    assert rec.num_items == 5


def test_concurrent_add_items_of_one_id_add_it_once(monkeypatch):
    import threading

    rec = _tiny()
    monkeypatch.setattr(rec, "text_encoder", lambda: VectorPerText(delay=0.2))  # all pass the early check
    outcomes, start = [], threading.Barrier(4)

    def add() -> None:
        start.wait()
        try:
            outcomes.append(rec.add_items({"new": "the same new item"}))
        except RequestError as err:
            outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(str, outcomes)) == ["KnownItemsError"] * 3 + ["['new']"]
    assert rec.num_items == 6 and rec.item_tokens.count("new") == 1
    assert rec.table.shape[0] == 7 and rec.candidates.shape[0] == 6 and rec.net.item_features.shape[0] == 7


def test_add_items_encodes_batch_size_texts_per_pass_in_any_order(monkeypatch):
    rec = _tiny(batch_size=2)
    encoder = VectorPerText()
    monkeypatch.setattr(rec, "text_encoder", lambda: encoder)
    texts = {"n1": "a much longer text than the rest", "n2": "mid length", "n3": "x", "n4": "short", "n5": "medium t"}
    rec.add_items(texts)
    assert encoder.passes == [2, 2, 1]  # never every text in one forward pass
    with torch.inference_mode():  # each new row comes from its own text, whatever order the passes took
        for token, text in texts.items():
            expected = rec.net.adapter(torch.from_numpy(encoder.vectors[text])[None])[0]
            torch.testing.assert_close(rec.table[rec.token_to_id[token]], expected)


def test_code_checkpoint_carries_the_codes_it_was_trained_with(held_out_codes_checkpoint, code_recommender, tmp_path):
    from unisrec_x.errors import DataError

    checkpoint = torch.load(held_out_codes_checkpoint, weights_only=True)
    stored = checkpoint["item_codes"]  # so another machine's refit (BLAS, faiss version) cannot change them
    assert stored["settings"] == {"method": "opq", "digits": 8, "codes_per_digit": 256, "seed": 0}
    np.testing.assert_array_equal(stored["codes"].numpy(), code_recommender.item_codes.codes)
    for damage, message in [(lambda state: state.update(codes=state["codes"][:-1]), r"codes have shape \(\d+, 9\)"),
                            (lambda state: state.update(quantizer=state["quantizer"][:50]), "item codes cannot be read")]:
        damaged = torch.load(held_out_codes_checkpoint, weights_only=True)
        damage(damaged["item_codes"])
        torch.save(damaged, tmp_path / "damaged.ckpt")
        with pytest.raises(DataError, match=message) as err:
            Recommender.from_checkpoint(tmp_path / "damaged.ckpt")
        assert "damaged.ckpt" in str(err.value)
