"""Model directories: every damaged file is a DataError naming it, never a traceback or a silent load."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from unisrec_x.cli import main
from unisrec_x.errors import DataError
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.recommender import Recommender, TextSettings

TOKENS = ["a", "b", "c"]
HISTORY = [["a", "b"], ["c"]]


@pytest.fixture
def model(tmp_path):
    """A tiny text model (3 items, 8-dim text vectors) saved as a model directory."""
    torch.manual_seed(0)
    net = UniSRec(num_items=3, plm_dim=8, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    features = torch.randn(4, 8)
    features[0] = 0
    rec = Recommender(net, TOKENS, ["Alpha", "Beta", "Gamma"], features, TextSettings("enc"), aliases={"ASIN-A": "a"})
    return rec.save(tmp_path / "model")


def _edit_manifest(model, edit) -> None:
    manifest = json.loads((model / "model.json").read_text())
    edit(manifest)
    (model / "model.json").write_text(json.dumps(manifest))


def _refused(path, message, line=None):
    with pytest.raises(DataError, match=message) as err:
        Recommender.from_checkpoint(path.parent)  # every checked file lies in the model directory
    assert err.value.path == str(path) and err.value.line == line
    return err.value


def test_saved_directory_loads_and_ranks_the_same(model):
    again = Recommender.from_checkpoint(model)
    assert again.item_tokens == TOKENS and again.alias_of == {"a": "ASIN-A"}
    assert again.text == TextSettings("enc")
    assert Recommender.from_checkpoint(again.save(model.parent / "copy")).recommend(HISTORY, k=3) == again.recommend(HISTORY, k=3)


def _set(section, key, value):
    return lambda m: (m[section] if section else m).__setitem__(key, value)


def _drop(section, key):
    return lambda m: (m[section] if section else m).pop(key)


@pytest.mark.parametrize("edit, message", [
    (_drop(None, "items"), r"model.json has missing keys items \(expected format, version, net, text, items, codes\)"),
    (_set(None, "extra", 1), "model.json has unknown keys extra"),
    (_set(None, "version", 2), "not a unisrec-x-model v1 manifest"),
    (_set("net", "n_heads", 7), "net: hidden_dim 4 is not divisible by n_heads 7"),
    (_set("net", "n_heads", 0), r"net: model sizes out of range: n_heads=0 \(at least 1\)"),
    (_set("net", "hidden_dim", "4"), r"net has arguments of the wrong type: hidden_dim='4' \(expected int\)"),
    (_set("net", "n_layers", True), r"n_layers=True \(expected int\)"),
    (_set("net", "use_text", 1), r"use_text=1 \(expected bool\)"),
    (_set("net", "temperature", float("nan")), r"temperature=nan \(expected float\)"),
    (_set("net", "similarity", "euclid"), r"similarity='euclid' \(expected 'cosine' or 'dot'\)"),
    (_set("net", "n_head", 2), "net has unknown keys n_head"),
    (_set(None, "net", [1, 2]), r"net is list \(expected an object of arguments\)"),
    (_set("text", "tokens", 5), "text has unknown keys tokens"),
    (_set("text", "max_tokens", "512"), r"max_tokens='512' \(expected int\)"),
    (_set(None, "items", 4), r"model.json counts 4 items .* but items.item has 3"),
    (_set(None, "items", "3"), "items '3' is not an integer"),
])
def test_bad_model_json_is_named(model, edit, message):
    _edit_manifest(model, edit)
    _refused(model / "model.json", message)


def test_absent_net_arguments_take_their_defaults_and_must_fit_the_weights(model):
    _edit_manifest(model, _drop("net", "gate_noise"))  # a default that fits: loads (older files keep working)
    assert Recommender.from_checkpoint(model).item_tokens == TOKENS
    _edit_manifest(model, _drop("net", "plm_dim"))  # the default 384 does not fit these 8-wide weights
    _refused(model / "weights.pt", "weights do not fit the recorded network arguments")


def test_model_json_that_is_not_utf8_or_not_json(model):
    path = model / "model.json"
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"enc"', b'"\xff"'))
    _refused(path, "bytes that are not UTF-8 at byte", line=raw[: raw.index(b'"enc"')].count(b"\n") + 1)
    path.write_bytes(b'{"format": ')
    _refused(path, "model.json is not valid JSON", line=1)
    path.write_text("[1, 2]")
    _refused(path, "not a unisrec-x-model v1 manifest")
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(path, "nested too deeply")


def test_bad_weights_are_named(model):
    path = model / "weights.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "adapter.experts.0.bias": 3}, path)
    _refused(path, r"state_dict holds entries that are not named tensors: 'adapter.experts.0.bias'")
    broken = dict(state)
    broken["encoder.position.weight"] = broken["encoder.position.weight"].clone()
    broken["encoder.position.weight"][1, 2] = float("nan")
    torch.save(broken, path)
    _refused(path, r"NaN or inf values: \['encoder.position.weight'\]")
    path.write_bytes(b"")
    _refused(path, r"truncated or corrupted \(file is empty \(0 bytes\)\)")


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), r"cannot be read as a numeric .npy array \(.+\)"),
    (lambda p: p.write_bytes(p.read_bytes()[:128]), r"cannot be read as a numeric .npy array \(.+\)"),  # header only
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), r"cannot be read as a numeric .npy array \(.+\)"),  # truncated data
    (lambda p: np.save(p, np.array([None] * 4, dtype=object), allow_pickle=True), "Object arrays cannot be loaded"),
    (lambda p: np.save(p, np.zeros((4, 8), np.int64)), r"has dtype int64 \(expected floating-point"),
    (lambda p: np.save(p, np.zeros((4, 8), bool)), "has dtype bool"),
    (lambda p: p.write_bytes(_npz_bytes()), r"an .npz archive \(expected one .npy array\)"),
    (lambda p: np.save(p, np.full((4, 8), np.nan, np.float32)), r"row 0 \(the padding row\) has NaN or inf values \(4 rows"),
    (lambda p: np.save(p, _with(np.ones((4, 8)), 2, np.inf)), r"row 2 \(item 'b'\) has NaN or inf values \(1 rows"),
    (lambda p: np.save(p, _with(np.ones((4, 8)), 3, 1e300)), r"row 3 \(item 'c'\) has NaN or inf"),  # inf as float32
    (lambda p: p.unlink(), "text model without item_features.npy"),
])
def test_bad_item_features_are_named(model, damage, message):
    damage(model / "item_features.npy")
    _refused(model / "item_features.npy", message)


def _with(array, row, value):
    array[row, 1] = value
    return array


def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, features=np.zeros((4, 8), np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [">f4", "<f8", ">f8", "<f2"])
def test_float_features_of_any_width_and_byte_order_become_float32(model, dtype):
    path = model / "item_features.npy"
    features = np.load(path)
    expected = Recommender.from_checkpoint(model).recommend(HISTORY, k=3)
    np.save(path, features.astype(dtype))
    loaded = Recommender.from_checkpoint(model)
    assert loaded.net.item_features.dtype == torch.float32
    if dtype != "<f2":  # half precision rounds the vectors, so only the exact widths must rank identically
        assert [[r.item for r in recs] for recs in loaded.recommend(HISTORY, k=3)] == [[r.item for r in recs] for recs in expected]


def test_corrupted_item_features_raise_only_data_error(model):
    path = model / "item_features.npy"
    good = path.read_bytes()
    rng = random.Random(0)
    damaged = [good[:n] for n in range(0, len(good), 7)]
    for _ in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        damaged.append(bytes(data))
    for data in damaged:
        path.write_bytes(data)
        try:
            Recommender.from_checkpoint(model)
        except DataError as err:
            assert err.path == str(path)


def test_repeated_items_and_aliases_name_the_line(model):
    path = model / "items.item"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, "b\tBeta again\t"]) + "\n")
    _refused(path, r"item 'b' appears a second time \(first on line 3; expected each once\)", line=5)
    path.write_text("\n".join([*lines[:3], "c\tGamma\tASIN-A"]) + "\n")
    _refused(path, r"alias 'ASIN-A' appears a second time \(first on line 2", line=4)


def test_cli_prints_one_line_and_exits_2(model, capsys):
    _edit_manifest(model, _set("net", "hidden_dim", "4"))
    with pytest.raises(SystemExit) as done:
        main(["recommend", "--ckpt", str(model), "--history", "a"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and "model.json: net has arguments of the wrong type" in err


def _code_recommender(tmp_path, use_text: bool = True, digits: int = 2, seed: int = 0) -> Recommender:
    """A tiny code model (40 items, 8-d text vectors, PQ codes of ``digits`` x 4), text + codes or codes only."""
    from unisrec_x.items.codes import CodeSettings, item_codes

    torch.manual_seed(0)
    features = torch.randn(41, 8)
    features[0] = 0
    codes = item_codes(features[1:].numpy(), CodeSettings("pq", digits=digits, codes_per_digit=4, seed=seed),
                       root=tmp_path / "cache")
    net = UniSRec(num_items=40, plm_dim=8, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2,
                  use_text=use_text, use_codes=True, code_digits=digits, codes_per_digit=4)
    tokens = [f"i{k}" for k in range(40)]
    return Recommender(net, tokens, [f"Item {k}" for k in range(40)], features if use_text else None,
                       TextSettings("enc"), item_codes=codes)


@pytest.fixture
def code_model(tmp_path):
    """A text + codes model saved as a model directory."""
    return _code_recommender(tmp_path).save(tmp_path / "model")


@pytest.mark.parametrize("use_text", [True, False])
def test_code_models_grow_save_and_export_with_or_without_text(use_text, tmp_path, monkeypatch):
    rec = _code_recommender(tmp_path, use_text)
    new_features = torch.randn(2, 8)

    class FixedEncoder:  # stands in for the text encoder (covered on real data in test_recommender.py)
        def encode(self, texts):
            return new_features[:len(texts)].numpy()

    monkeypatch.setattr(rec, "text_encoder", lambda: FixedEncoder())
    rec.add_items({"new": "a new thing"})
    with torch.inference_mode():  # the new row: its text part (if any) plus the mean of its codes' embeddings
        codes = torch.from_numpy(rec.item_codes.codes[-1:])
        expected = rec.net.code_vectors(codes)[0] + (rec.net.adapter(new_features[:1])[0] if use_text else 0)
    torch.testing.assert_close(rec.table[41], expected)
    np.testing.assert_array_equal(rec.item_codes.codes[-1, :-1], rec.item_codes.quantizer.encode(new_features[:1].numpy())[0])
    again = Recommender.from_checkpoint(rec.save(tmp_path / "saved"))
    assert again.recommend([["new", "i3"]], k=5) == rec.recommend([["new", "i3"]], k=5)
    assert (tmp_path / "saved" / "item_features.npy").exists() == use_text
    assert json.loads((rec.export(tmp_path / "export") / "manifest.json").read_text())["items"] == 41


def test_a_quantizer_of_another_model_is_refused(tmp_path):
    model = _code_recommender(tmp_path).save(tmp_path / "model")
    wider = _code_recommender(tmp_path / "wider", digits=4)  # 4 digits of 2 bits: as many bytes per item as 2 digits
    (model / "quantizer.faiss").write_bytes(wider.item_codes.quantizer.to_bytes())
    with pytest.raises(DataError, match=r"quantizer has 4 digits of \[2\] bits, the codes 2 of 2") as err:
        Recommender.from_checkpoint(model)
    assert "quantizer.faiss" in str(err.value)
    # same sizes, but fitted on other vectors: it does not give these items their codes
    from unisrec_x.items.codes import CodeSettings, ItemQuantizer

    other_features = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    foreign = ItemQuantizer.fit(other_features * 5 + 3, CodeSettings("pq", digits=2, codes_per_digit=4))
    (model / "quantizer.faiss").write_bytes(foreign.to_bytes())
    with pytest.raises(DataError, match="not theirs"):
        Recommender.from_checkpoint(model)


def _save_codes(array):
    return lambda model: np.save(model / "item_codes.npy", array)


@pytest.mark.parametrize("damage, name, message", [
    (lambda m: (m / "quantizer.faiss").unlink(), "quantizer.faiss", "without quantizer.faiss"),
    (lambda m: (m / "quantizer.faiss").write_bytes(b"not an index"), "quantizer.faiss", "cannot be read as a faiss index"),
    (lambda m: (m / "item_codes.npy").unlink(), "item_codes.npy", "without item_codes.npy"),
    (lambda m: (m / "item_codes.npy").write_bytes(b"\x93NUMPY"), "item_codes.npy", "cannot be read"),
    (_save_codes(np.zeros((40, 3), np.float32)), "item_codes.npy", "integer codes"),
    (_save_codes(np.zeros((39, 3), np.int16)), "item_codes.npy", r"shape \(39, 3\), expected \(40, 3\)"),
    (_save_codes(np.full((40, 3), 4, np.int16)), "item_codes.npy", r"outside \[0, 4\)"),
    (lambda m: _edit_manifest(m, lambda d: d.pop("codes")), "model.json", "no \"codes\" settings"),
    (lambda m: _edit_manifest(m, lambda d: d["codes"].update(digits=3)), "model.json", "3 digits x 4 but the network"),
    (lambda m: _edit_manifest(m, lambda d: d["codes"].update(method="kmeans")), "model.json", "method='kmeans'"),
    (lambda m: _edit_manifest(m, lambda d: d["codes"].update(codes_per_digit=6)), "model.json", "power of two"),
])
def test_code_model_directories_load_and_damaged_code_files_are_named(code_model, damage, name, message):
    intact = Recommender.from_checkpoint(code_model)  # loads as saved, codes and quantizer included
    assert intact.item_codes.codes.shape == (40, 3) and len(intact.recommend([["i1", "i2"]], k=5)[0]) == 5
    damage(code_model)
    with pytest.raises(DataError, match=message) as err:
        Recommender.from_checkpoint(code_model)
    assert name in str(err.value)
