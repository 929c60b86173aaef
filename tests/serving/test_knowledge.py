"""Knowledge vectors (issue 30, after KAR) in a served model: SASRec-ID trained end to end with its knowledge
adapter on a real slice of Games (title, categories, brand), then checkpoint -> model directory -> export,
and items added from their fields (``add_items``, the journal, ``unisrec-x add-items``, ``POST /items``).

Anno 2070 (0700026657, "Video Games; PC; Games", Ubisoft) is held out of training and added back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_close_f32
from tests.data.test_knowledge_features import FIELDS, write_games_slice
from unisrec_x.cli import main
from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.errors import DataError
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.recommender import Recommender, RequestError, TextSettings

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "scientific" / "sasrec.yaml"
HELD_OUT = "0700026657"
HELD_OUT_FIELDS = {"title": "Anno 2070", "categories": "Video Games; PC; Games", "brand": "Ubisoft"}


@pytest.fixture(scope="module")
def games(real_root, tmp_path_factory) -> Path:
    return write_games_slice(real_root, tmp_path_factory.mktemp("games") / "games")


@pytest.fixture(scope="module")
def checkpoint(games, tiny_encoder, shared_cache, tmp_path_factory) -> Path:
    """Best checkpoint of 2 epochs of SASRec-ID + knowledge (configs/scientific/sasrec.yaml plus the fields)."""
    out = tmp_path_factory.mktemp("kar-fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNISREC_X_CACHE", str(shared_cache))
        main(["fit", "-c", str(CONFIG), "--data.dataset", str(games), "--data.text_encoder", tiny_encoder,
              "--data.exclude_items", f'["{HELD_OUT}"]', "--data.batch_size", "128",
              "--model.init_args.net.init_args.knowledge_fields", "[title,categories,brand]",
              "--model.init_args.net.init_args.hidden_dim", "32", "--trainer.max_epochs", "2",
              "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(out)])
    return next(out.rglob("best-*.ckpt"))


@pytest.fixture
def served(checkpoint, shared_cache, monkeypatch) -> Recommender:
    monkeypatch.setenv("UNISREC_X_CACHE", str(shared_cache))
    return Recommender.from_checkpoint(checkpoint)


def _knowledge_part(rec: Recommender, rows: torch.Tensor | None = None) -> torch.Tensor:
    with torch.inference_mode():
        features = rec.net.knowledge_features
        return rec.net.knowledge(features if rows is None else features[rows])


def test_the_adapter_trains_end_to_end_with_the_backbone(served):
    knowledge = served.net.knowledge
    assert knowledge.field_gate.weight.abs().sum() > 0 and knowledge.expert_gate.abs().sum() > 0  # both start at 0


def test_a_checkpoint_serves_id_plus_knowledge(served, games):
    net = served.net
    assert net.knowledge_fields == FIELDS and net.use_item_id and not net.use_text
    assert_close_f32(served.table, net.item_embedding.weight + _knowledge_part(served))
    fields = read_atomic(f"{games}.item")
    row = fields.column("item_id").index(served.item_tokens[0])
    assert {f: served.knowledge_texts[f][0] for f in FIELDS} == {f: fields.column(f)[row] for f in FIELDS}
    assert served.item_texts[0] == ". ".join(fields.column(f)[row] for f in FIELDS if fields.column(f)[row])


def _no_text_encoder(monkeypatch) -> None:
    from unisrec_x.items.encoder import TextEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("a served knowledge model must not need its text encoder")

    monkeypatch.setattr(TextEncoder, "__init__", refuse)


def test_a_model_directory_carries_the_precomputed_vectors(served, tmp_path, monkeypatch):
    histories = [[served.item_tokens[0], served.item_tokens[5]], [served.item_tokens[9]]]
    saved = served.save(tmp_path / "model")
    manifest = json.loads((saved / "model.json").read_text())
    assert manifest["net"]["knowledge_fields"] == FIELDS and "knowledge_features.npy" in manifest["checksums"]
    assert np.load(saved / "knowledge_features.npy").shape == (served.num_items + 1, 3, 32)
    items = read_atomic(saved / "items.item")
    assert [f for f in items.fields if f.startswith("knowledge.")] == [f"knowledge.{f}" for f in FIELDS]
    _no_text_encoder(monkeypatch)
    again = Recommender.from_checkpoint(saved)
    assert again.knowledge_texts == served.knowledge_texts
    assert_close_f32(again.table, served.table)
    assert again.recommend(histories, k=5) == served.recommend(histories, k=5)


def test_a_damaged_knowledge_file_is_named(served, tmp_path):
    saved = served.save(tmp_path / "model")
    array = np.load(saved / "knowledge_features.npy")
    np.save(saved / "knowledge_features.npy", array * 2)
    with pytest.raises(DataError, match="checksum does not match") as err:
        Recommender.from_checkpoint(saved)
    assert err.value.path == str(saved / "knowledge_features.npy")


def test_the_export_scores_with_the_knowledge_part(served, tmp_path, monkeypatch):
    _no_text_encoder(monkeypatch)
    out = served.export(tmp_path / "export")
    vectors = np.load(out / "item_vectors.npy")
    with torch.inference_mode():
        expected = served.net.item_embedding.weight[1:] + _knowledge_part(served)[1:]
    assert_close_f32(vectors, expected)  # dot similarity: the item vectors themselves
    assert not np.allclose(vectors, served.net.item_embedding.weight[1:].detach().numpy(), atol=1e-4)
    item_seq, seq_len = served.encode_histories([[served.item_tokens[3], served.item_tokens[4]]])
    query = torch.jit.load(str(out / "query_encoder.pt"))(item_seq, seq_len)
    top = served.recommend([[served.item_tokens[3], served.item_tokens[4]]], k=3)[0]
    scores = (query.detach().numpy() @ vectors.T)[0]
    assert [served.item_tokens[i] for i in np.argsort(-scores)[:3]] == [r.item for r in top]


def test_add_items_encodes_each_field_and_has_no_id_part(served, tiny_encoder):
    from unisrec_x.items.encoder import TextEncoder

    served.add_items({HELD_OUT: HELD_OUT_FIELDS})
    new = served.num_items
    encoded = TextEncoder(tiny_encoder).encode([HELD_OUT_FIELDS[f] for f in FIELDS])
    assert_close_f32(served.net.knowledge_features[new], encoded, rtol=1e-4)
    assert_close_f32(served.table[new], _knowledge_part(served, torch.tensor([new]))[0])  # its ID row is zero
    assert served.net.item_embedding.weight[new].abs().sum() == 0
    assert served.item_texts[-1] == "Anno 2070. Video Games; PC; Games. Ubisoft"
    assert HELD_OUT in [r.item for r in served.recommend([[HELD_OUT]], k=served.num_items)[0]]


def test_a_field_left_out_is_empty_and_a_zero_vector(served):
    served.add_items({HELD_OUT: {"title": "Anno 2070", "text": "Anno 2070 (PC)"}})
    assert (served.net.knowledge_features[-1, 1:] == 0).all() and (served.net.knowledge_features[-1, 0] != 0).any()
    assert served.item_texts[-1] == "Anno 2070 (PC)"
    assert [served.knowledge_texts[f][-1] for f in FIELDS] == ["Anno 2070", "", ""]


@pytest.mark.parametrize("items, message", [
    ({HELD_OUT: "Anno 2070"}, r"reads the knowledge fields title, categories, brand: give each new item a mapping"),
    ({HELD_OUT: {"titel": "Anno 2070"}}, r"unknown field\(s\) 'titel': this model reads title, categories, brand"),
    ({HELD_OUT: {"title": "", "brand": " "}}, r"1 item\(s\) have no knowledge \(every field is empty\)"),
    ({HELD_OUT: {"title": 2070}}, r"have a field that is not a string"),
])
def test_new_items_without_usable_fields_are_refused(served, items, message):
    count = served.num_items
    with pytest.raises(RequestError, match=message):
        served.add_items(items)
    assert served.num_items == count and served.net.knowledge_features.shape[0] == count + 1


def test_journaled_items_replay_with_their_fields(served, tmp_path):
    saved = served.save(tmp_path / "model")
    live = Recommender.from_checkpoint(saved, record=True)
    live.add_items({HELD_OUT: HELD_OUT_FIELDS})
    record = json.loads((saved / "added-items.jsonl").read_text())
    assert record["fields"] == HELD_OUT_FIELDS and record["id"] == HELD_OUT
    replayed = Recommender.from_checkpoint(saved)
    assert replayed.item_tokens == live.item_tokens
    assert_close_f32(replayed.net.knowledge_features, live.net.knowledge_features)
    assert_close_f32(replayed.table, live.table)
    assert {f: replayed.knowledge_texts[f][-1] for f in FIELDS} == HELD_OUT_FIELDS


def test_add_items_command_reads_the_fields_from_the_item_file(served, tmp_path):
    from unisrec_x.serving.commands import add_items

    saved = served.save(tmp_path / "model")
    write_atomic(tmp_path / "new.item", [("item_id", "token"), ("title", "token_seq"), ("categories", "token_seq"),
                                         ("brand", "token_seq")], [(HELD_OUT, *HELD_OUT_FIELDS.values())])
    assert add_items(["--ckpt", str(saved), "--items", str(tmp_path / "new.item"), "--out", str(tmp_path / "out")]) == 0
    again = Recommender.from_checkpoint(tmp_path / "out")
    assert again.item_tokens[-1] == HELD_OUT and {f: again.knowledge_texts[f][-1] for f in FIELDS} == HELD_OUT_FIELDS
    assert (again.net.knowledge_features[-1] != 0).any(dim=1).all()


def test_post_items_takes_fields(served):
    from starlette.testclient import TestClient

    from unisrec_x.serving.service import create_app

    client = TestClient(create_app(served), raise_server_exceptions=False)
    answer = client.post("/items", json={"items": {HELD_OUT: HELD_OUT_FIELDS}})
    assert answer.status_code == 201, answer.text
    assert served.item_tokens[-1] == HELD_OUT
    refused = client.post("/items", json={"items": {"NEW-2": "one string"}})
    assert refused.status_code == 422 and "give each new item a mapping" in refused.text


def _knowledge_only(encoder: str) -> Recommender:
    """UniSRec's text path over separate fields (no ID, no joined text): vectors from the tiny encoder."""
    from unisrec_x.items.encoder import TextEncoder

    torch.manual_seed(0)
    fields = {"title": ["red filament", "a soldering iron", "pliers"], "brand": ["eSUN", "", "Knipex"]}
    net = UniSRec(num_items=3, plm_dim=32, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=4, use_text=False,
                  knowledge_fields=list(fields))
    settings = TextSettings(encoder, batch_size=8)
    text_encoder = TextEncoder(encoder)
    knowledge = torch.zeros(4, 2, 32)
    for column, texts in enumerate(fields.values()):
        for row, text in enumerate(texts, start=1):
            if text:
                knowledge[row, column] = torch.from_numpy(text_encoder.encode([text])[0])
    return Recommender(net, list("abc"), ["red filament. eSUN", "a soldering iron", "pliers. Knipex"], None, settings,
                       knowledge_features=knowledge, knowledge_texts=fields)


def test_a_knowledge_only_model_adds_items_and_checks_its_encoder(tiny_encoder, tmp_path):
    saved = _knowledge_only(tiny_encoder).save(tmp_path / "model")
    rec = Recommender.from_checkpoint(saved)
    rec.add_items({"d": {"title": "blue filament", "brand": "eSUN"}})
    assert rec.item_texts[-1] == "blue filament. eSUN"
    manifest = json.loads((saved / "model.json").read_text())
    manifest["text"]["pooling"] = "mean"  # edited: new fields would be encoded unlike the stored ones
    (saved / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"does not reproduce the stored items \(cosine .* \(title\)"):
        Recommender.from_checkpoint(saved).add_items({"d": {"title": "blue filament"}})


def test_a_model_without_knowledge_refuses_fields(tiny_encoder):
    torch.manual_seed(0)
    net = UniSRec(num_items=2, plm_dim=32, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=4, n_experts=2)
    rec = Recommender(net, ["a", "b"], ["A", "B"], torch.randn(3, 32), TextSettings(tiny_encoder))
    with pytest.raises(RequestError, match="given as fields, but this model has no knowledge fields"):
        rec.add_items({"c": {"title": "C"}})


def test_the_item_text_field_adds_items_from_a_text_file(tiny_encoder, tmp_path):
    """SASRec-ID + the knowledge field ``text`` (the transfer benchmark's KAR arm on a one-text-per-item release):
    ``unisrec-x add-items`` reads a new item's text from a ``.text`` file and encodes it as that field."""
    from unisrec_x.items.encoder import TextEncoder
    from unisrec_x.serving.commands import add_items

    torch.manual_seed(0)
    texts = ["red filament. eSUN", "a soldering iron", "pliers. Knipex"]
    encoder = TextEncoder(tiny_encoder)
    knowledge = torch.zeros(4, 1, 32)
    knowledge[1:, 0] = torch.from_numpy(encoder.encode(texts))
    net = UniSRec(num_items=3, plm_dim=32, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=4, use_text=False,
                  use_item_id=True, similarity="dot", knowledge_fields=["text"])
    rec = Recommender(net, list("abc"), texts, None, TextSettings(tiny_encoder, batch_size=8),
                      knowledge_features=knowledge, knowledge_texts={"text": texts})
    saved = rec.save(tmp_path / "model")
    write_atomic(tmp_path / "new.text", [("item_id", "token"), ("text", "token_seq")], [("d", "blue filament")])
    assert add_items(["--ckpt", str(saved), "--items", str(tmp_path / "new.text"), "--out", str(tmp_path / "out")]) == 0
    again = Recommender.from_checkpoint(tmp_path / "out")
    assert again.item_tokens[-1] == "d" and again.knowledge_texts["text"][-1] == "blue filament"
    assert_close_f32(again.net.knowledge_features[-1, 0], encoder.encode(["blue filament"])[0], rtol=1e-4)
