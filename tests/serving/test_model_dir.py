"""Model directories: every damaged file is a DataError naming it, never a traceback or a silent load."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.serving.conftest import fixed_text_encoder
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


def _unchecked(model) -> None:
    """Drop the checksums, as in a directory written before them: the readers' own checks are what guard it."""
    _edit_manifest(model, _drop(None, "checksums"))


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
    (_drop(None, "items"), r"model.json has missing keys items \(expected format, version, net, text, items, codes, checksums, "
                                  "text_fingerprint\)"),
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
    _unchecked(model)
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
    _unchecked(model)
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
    _unchecked(model)  # e.g. converted by hand; a checksum would (rightly) refuse the altered file
    path = model / "item_features.npy"
    features = np.load(path)
    expected = Recommender.from_checkpoint(model).recommend(HISTORY, k=3)
    np.save(path, features.astype(dtype))
    loaded = Recommender.from_checkpoint(model)
    assert loaded.net.item_features.dtype == torch.float32
    if dtype != "<f2":  # half precision rounds the vectors, so only the exact widths must rank identically
        assert [[r.item for r in recs] for recs in loaded.recommend(HISTORY, k=3)] == [[r.item for r in recs] for recs in expected]


def test_corrupted_item_features_raise_only_data_error(model):
    _unchecked(model)  # the reader itself, not the checksum, must turn every damage into a DataError
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
    _unchecked(model)
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
    fixed_text_encoder(monkeypatch, rec, new_features.numpy())
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
    _unchecked(model)
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
    _unchecked(code_model)
    damage(code_model)
    with pytest.raises(DataError, match=message) as err:
        Recommender.from_checkpoint(code_model)
    assert name in str(err.value)


# --- issue 31: torn reads, checksums, text fingerprint, offline encoders, exported ids ------------------

WRITER = """
import shutil, sys, time
from pathlib import Path
from unisrec_x.runtime.outputs import atomic_directory
from unisrec_x.serving.model_dir import MODEL_DIR

target, versions, seconds = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:4]], float(sys.argv[4])
print("ready", flush=True)
swaps, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    with atomic_directory(target, MODEL_DIR, overwrite=True) as tmp:  # what --overwrite does
        for path in versions[swaps % 2].iterdir():
            shutil.copyfile(path, tmp / path.name)
    swaps += 1
print(swaps, flush=True)
"""


def _version(tmp_path, name: str, value: float):
    """A model whose every file says which version it is: texts, text vectors and weights."""
    torch.manual_seed(int(value))
    net = UniSRec(num_items=3, plm_dim=8, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    features = torch.full((4, 8), value)
    features[0] = 0
    rec = Recommender(net, TOKENS, [f"{name} {t}" for t in TOKENS], features, TextSettings("enc"))
    return rec.save(tmp_path / name), net.state_dict()


def test_loads_while_another_process_overwrites_are_never_mixed(tmp_path):
    import subprocess
    import sys

    from unisrec_x.serving.model_dir import load_model_dir

    (a, a_weights), (b, b_weights) = _version(tmp_path, "A", 1.0), _version(tmp_path, "B", 2.0)
    target = tmp_path / "model"
    Recommender.from_checkpoint(a).save(target)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(a), str(b), "4"], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "ready"
    loads, seen, problems = 0, set(), []
    while writer.poll() is None:
        try:
            parts = load_model_dir(target)
        except DataError as err:
            problems.append(str(err))
            continue
        loads += 1
        versions = {text.split()[0] for text in parts.item_texts}
        vectors = {float(v) for v in parts.item_features[1:].flatten()}
        weights = parts.net.state_dict()["encoder.position.weight"]
        weights_of = [name for name, state in (("A", a_weights), ("B", b_weights))
                      if torch.equal(weights, state["encoder.position.weight"])]
        if len(versions) != 1 or vectors != {1.0 if "A" in versions else 2.0} or weights_of != sorted(versions):
            problems.append(f"mixed load: texts of {sorted(versions)}, vectors {sorted(vectors)}, weights of {weights_of}")
        else:
            seen |= versions
    swaps = int(writer.stdout.read().split()[-1])
    assert writer.wait() == 0
    assert swaps > 20 and loads > 20 and seen == {"A", "B"}, (swaps, loads, seen)  # the race was really run
    assert problems == [], f"{len(problems)} of {loads + len(problems)} loads: {problems[:3]}"


def test_altered_files_are_refused_by_their_checksum(model):
    import re

    rng = random.Random(0)

    def flip_20_bytes(path):
        data = bytearray(path.read_bytes())
        largest = max(torch.load(path, weights_only=True).values(), key=lambda t: t.numel()).numpy().tobytes()
        start = bytes(data).index(largest)  # inside a tensor's data, torch loads the flipped bytes silently
        for position in rng.sample(range(start, start + len(largest)), 20):
            data[position] ^= 0x01
        path.write_bytes(bytes(data))

    def reverse_rows(path):
        features = np.load(path)
        np.save(path, np.concatenate([features[:1], features[:0:-1]]))

    def swap_ids(path):
        lines = path.read_text().splitlines()
        lines[1], lines[2] = lines[2].replace("b", "a", 1), lines[1].replace("a", "b", 1)
        path.write_text("\n".join(lines) + "\n")

    for name, alter in [("weights.pt", flip_20_bytes), ("item_features.npy", reverse_rows), ("items.item", swap_ids)]:
        path = model / name
        good = path.read_bytes()
        alter(path)
        assert path.read_bytes() != good
        _refused(path, re.escape(f"{name}: checksum does not match model.json (file altered or damaged)") + "$")
        manifest = (model / "model.json").read_text()
        _unchecked(model)  # as an older directory: the altered file loads silently, which is why checksums exist
        assert Recommender.from_checkpoint(model).num_items == 3
        (model / "model.json").write_text(manifest)
        path.write_bytes(good)
    assert Recommender.from_checkpoint(model).item_tokens == TOKENS


def test_code_files_are_checksummed_too(tmp_path):
    model = _code_recommender(tmp_path, use_text=False).save(tmp_path / "codes-only")
    codes = np.load(model / "item_codes.npy")
    np.save(model / "item_codes.npy", codes[::-1])  # in range, one tuple per item: only the checksum sees it
    with pytest.raises(DataError, match=r"item_codes.npy: checksum does not match model.json"):
        Recommender.from_checkpoint(model)
    _unchecked(model)
    assert Recommender.from_checkpoint(model).item_codes.codes.tolist() == codes[::-1].tolist()


def test_directories_written_before_checksums_and_fingerprints_still_load(model):
    expected = Recommender.from_checkpoint(model).recommend(HISTORY, k=3)
    _edit_manifest(model, lambda m: (m.pop("checksums"), m.pop("text_fingerprint")))
    assert Recommender.from_checkpoint(model).recommend(HISTORY, k=3) == expected
    _edit_manifest(model, _set(None, "checksums", {"weights.pt": "0" * 64, "notes.txt": "1" * 64}))
    _refused(model / "model.json", r"checksums has unknown files notes.txt")


TEXTS = ["eSUN 3D 1.75mm PETG Black Filament 1kg spool, dimensional accuracy +/- 0.05 mm, for 3D printers",
         "Blue PLA filament", "Digital caliper 150 mm, stainless steel"]


@pytest.fixture
def encoded_model(tmp_path, tiny_encoder):
    """A text model whose stored vectors really come from its recorded encoder (a tiny local BERT)."""
    from unisrec_x.items.encoder import TextEncoder

    settings = TextSettings(tiny_encoder, "cls", 512, 64, "float32")
    features = torch.cat([torch.zeros(1, 32), torch.from_numpy(TextEncoder(*settings).encode(TEXTS))])
    torch.manual_seed(0)
    net = UniSRec(num_items=3, plm_dim=32, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    return Recommender(net, TOKENS, TEXTS, features, settings).save(tmp_path / "model")


def test_edited_text_settings_are_refused_before_new_items_are_encoded(encoded_model, caplog):
    rec = Recommender.from_checkpoint(encoded_model)
    rec.add_items({"copy-of-b": TEXTS[1]})  # the recorded settings reproduce the stored vectors
    torch.testing.assert_close(rec.net.item_features[4], rec.net.item_features[2], rtol=1e-4, atol=1e-4)
    assert "not verified" not in caplog.text
    _edit_manifest(encoded_model, lambda m: m["text"].update(pooling="mean", max_tokens=4))
    edited = Recommender.from_checkpoint(encoded_model)  # recommending needs no encoder: it still loads
    assert edited.recommend(HISTORY, k=3)
    for _ in range(2):  # refused every time, not only the first
        with pytest.raises(DataError, match=r"does not reproduce the stored items \(cosine 0\.\d+ to the stored vector "
                                            r"of item '\w', expected > 0.999\): its text settings .* were changed") as err:
            edited.add_items({"copy-of-b": TEXTS[1]})
        assert err.value.path == str(encoded_model / "model.json") and len(str(err.value).splitlines()) == 1
    assert edited.num_items == 3


def test_a_directory_without_fingerprint_warns_once_that_its_settings_are_unverified(encoded_model, caplog):
    _edit_manifest(encoded_model, _drop(None, "text_fingerprint"))
    rec = Recommender.from_checkpoint(encoded_model)
    rec.add_items({"n1": "a new text"})
    rec.add_items({"n2": "another new text"})
    assert caplog.text.count("text settings are not verified") == 1 and rec.num_items == 5
    resaved = Recommender.from_checkpoint(rec.save(encoded_model.parent / "resaved"))  # now with a fingerprint
    assert resaved.text_fingerprint.items


def test_code_only_models_check_their_codes_come_out_again(tmp_path, tiny_encoder):
    from unisrec_x.items.codes import CodeSettings, item_codes
    from unisrec_x.items.encoder import TextEncoder

    texts = [f"{colour} {kind} number {k}" for k, (colour, kind) in
             enumerate((c, t) for c in ("red", "blue", "green", "black", "white") for t in
                       ("PLA filament", "PETG spool", "caliper", "nozzle set", "build plate", "resin", "glue", "tape"))]
    settings = TextSettings(tiny_encoder, "cls", 512, 64, "float32")
    features = TextEncoder(*settings).encode(texts)
    codes = item_codes(features, CodeSettings("pq", digits=8, codes_per_digit=4), root=tmp_path / "cache")
    net = UniSRec(num_items=40, plm_dim=32, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2,
                  use_text=False, use_codes=True, code_digits=8, codes_per_digit=4)
    model = Recommender(net, [f"i{k}" for k in range(40)], texts, None, settings, item_codes=codes).save(tmp_path / "m")
    Recommender.from_checkpoint(model).add_items({"new": "yellow PLA filament"})
    _edit_manifest(model, lambda m: m["text"].update(pooling="mean"))
    with pytest.raises(DataError, match=r"model.json: the text encoder does not reproduce the stored items \(\d+% of "
                                        r"their code digits come out again, expected at least 90%\)"):
        Recommender.from_checkpoint(model).add_items({"new": "yellow PLA filament"})


def test_a_hub_encoder_is_not_downloaded_unless_allowed_and_the_environment_is_left_alone(model, tmp_path, capsys,
                                                                                          monkeypatch):
    import os
    import time

    from unisrec_x.items.encoder import PACKAGED_ENCODER, resolve_encoder
    from unisrec_x.serving.commands import add_items

    for name in ("UNISREC_X_ALLOW_DOWNLOADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    environment = dict(os.environ)
    resolve_encoder(PACKAGED_ENCODER)  # set HF_HUB_OFFLINE for the whole process
    assert dict(os.environ) == environment
    _edit_manifest(model, lambda m: m["text"].update(encoder="sentence-transformers/no-such-encoder-unisrec-x"))
    (tmp_path / "new.item").write_text("item_id:token\ttext:token_seq\nnew\ta new text\n")
    start = time.monotonic()
    assert add_items(["--ckpt", str(model), "--items", str(tmp_path / "new.item"), "--out", str(tmp_path / "out")]) == 2
    assert time.monotonic() - start < 20  # it retried the network for 54 s, then printed a traceback
    err = capsys.readouterr().err.strip()
    assert err == ("error: text encoder 'sentence-transformers/no-such-encoder-unisrec-x' is neither a local folder nor "
                   "in the local Hugging Face cache, and downloads are off: name a local copy, or set "
                   "UNISREC_X_ALLOW_DOWNLOADS=1 to fetch it")
    assert dict(os.environ) == environment and not (tmp_path / "out").exists()


def test_exported_ids_are_a_json_list_that_no_id_can_split(tmp_path):
    torch.manual_seed(0)
    tokens = ["a", "line\u2028separator", "next\x85line", "d"]  # possible in a dataset's files (never as new ids)
    net = UniSRec(num_items=4, plm_dim=8, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    features = torch.randn(5, 8)
    rec = Recommender(net, tokens, list("ABCD"), features, TextSettings("enc"))
    out = rec.export(tmp_path / "odd")
    assert json.loads((out / "item_ids.json").read_text()) == tokens == rec.item_tokens
    assert len(np.load(out / "item_vectors.npy")) == len(tokens)
    assert not (out / "item_ids.txt").exists()  # read with splitlines() it gave 6 ids for 4 rows
    assert json.loads((out / "manifest.json").read_text())["item_ids"] == ["item_ids.json"]
    plain = Recommender(UniSRec(num_items=4, plm_dim=8, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2),
                        ["a", "b", "café", "d"], list("ABCD"), features, TextSettings("enc")).export(tmp_path / "plain")
    assert (plain / "item_ids.txt").read_text(encoding="utf-8").splitlines() == ["a", "b", "café", "d"]
    assert json.loads((plain / "manifest.json").read_text())["item_ids"] == ["item_ids.json", "item_ids.txt"]
