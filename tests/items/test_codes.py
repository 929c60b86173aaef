"""Semantic item IDs: codes reproduce the fitted codebooks' assignment, the cache keys on features and
settings, collisions get their own digit, and code models score as the plain path does."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from unisrec_x.items import codes as codes_module
from unisrec_x.items.codes import CodeSettings, ItemQuantizer, item_codes, pack_codes, unpack_codes, with_collision_digit
from unisrec_x.model.unisrec import UniSRec


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    """Clustered vectors, as text vectors are: 600 items around 40 topics."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    return (centres[rng.integers(0, 40, 600)] + 0.3 * rng.normal(size=(600, 32))).astype(np.float32)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def test_pq_codes_are_the_nearest_codebook_entry_of_each_sub_vector(features):
    import faiss

    quantizer = ItemQuantizer.fit(features, CodeSettings("pq", digits=4, codes_per_digit=16))
    codes = quantizer.encode(features)
    centroids = faiss.vector_to_array(quantizer.index.pq.centroids).reshape(4, 16, 8)
    manual = np.stack([_nearest(features[:, k * 8:(k + 1) * 8], centroids[k]) for k in range(4)], axis=1)
    np.testing.assert_array_equal(codes, manual)
    # decoding joins the chosen entries
    np.testing.assert_allclose(quantizer.decode(codes), np.concatenate([centroids[k][codes[:, k]] for k in range(4)], 1),
                               rtol=1e-5, atol=1e-6)


def test_rq_codes_sum_codebook_entries_and_beat_greedy_residual_assignment(features):
    import faiss

    quantizer = ItemQuantizer.fit(features, CodeSettings("rq", digits=3, codes_per_digit=16))
    codes = quantizer.encode(features)
    codebooks = faiss.vector_to_array(quantizer.index.rq.codebooks).reshape(3, 16, 32)
    chosen = codebooks[np.arange(3), codes]  # (n, 3, d): the entry each digit picked
    np.testing.assert_allclose(quantizer.decode(codes), chosen.sum(1), rtol=1e-5, atol=1e-5)
    residual, greedy = features.copy(), []
    for k in range(3):  # one digit at a time, nearest entry to what is left
        greedy.append(_nearest(residual, codebooks[k]))
        residual = residual - codebooks[k][greedy[-1]]
    error = lambda c: ((features - codebooks[np.arange(3), c].sum(1)) ** 2).sum(1)  # noqa: E731
    # faiss searches a beam of 5 tuples: never worse than greedy for any item, better for some
    assert (error(codes) <= error(np.stack(greedy, 1)) + 1e-4).all() and error(codes).sum() < error(np.stack(greedy, 1)).sum()
    errors = [np.linalg.norm(features - chosen[:, :k + 1].sum(1)) for k in range(3)]
    assert errors[0] > errors[1] > errors[2]  # each digit lowers the reconstruction error


def test_opq_rotation_then_pq_and_a_serialised_quantizer_encodes_the_same(features):
    settings = CodeSettings("opq", digits=4, codes_per_digit=16)
    quantizer = ItemQuantizer.fit(features, settings)
    codes = quantizer.encode(features)
    again = ItemQuantizer.from_bytes(settings, quantizer.to_bytes())
    np.testing.assert_array_equal(again.encode(features), codes)
    # OPQ reconstructs better than PQ without the rotation on the same budget
    plain = ItemQuantizer.fit(features, CodeSettings("pq", digits=4, codes_per_digit=16))
    error = lambda q: np.linalg.norm(features - q.decode(q.encode(features)))  # noqa: E731
    assert error(quantizer) < error(plain)


def test_packing_round_trips_for_every_width():
    rng = np.random.default_rng(1)
    for bits in (1, 3, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(17, 5))
        np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits), 5, bits), codes)


def test_collisions_get_a_digit_of_their_own():
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 4], [5, 6]])
    resolved, collided = with_collision_digit(codes)
    assert collided == 5
    assert resolved[:, -1].tolist() == [0, 1, 0, 2, 1, 0]
    assert len({tuple(r) for r in resolved}) == len(codes)


def test_cache_is_keyed_by_features_and_settings(features, tmp_path, monkeypatch):
    settings = CodeSettings("pq", digits=4, codes_per_digit=64)
    first = item_codes(features, settings, root=tmp_path)
    assert len({tuple(r) for r in first.codes}) == len(features)  # unique tuples after the extra digit
    fits = []
    real_fit = ItemQuantizer.fit
    monkeypatch.setattr(codes_module.ItemQuantizer, "fit", classmethod(lambda cls, x, s: fits.append(s) or real_fit(x, s)))
    np.testing.assert_array_equal(item_codes(features, settings, root=tmp_path).codes, first.codes)
    assert fits == []  # served from the cache
    changed = features.copy()
    changed[0, 0] += 1.0
    item_codes(changed, settings, root=tmp_path)
    item_codes(features, CodeSettings("pq", digits=4, codes_per_digit=64, seed=1), root=tmp_path)
    item_codes(features, CodeSettings("rq", digits=4, codes_per_digit=16), root=tmp_path)
    assert len(fits) == 3  # other features, seed or method: fitted again
    for path in (tmp_path / "codes").glob("*.npz"):  # a damaged file is refitted, not trusted
        path.write_bytes(path.read_bytes()[:100])
    np.testing.assert_array_equal(item_codes(features, settings, root=tmp_path).codes, first.codes)
    assert len(fits) == 4


def test_code_models_item_table_equals_its_item_vectors_and_new_items_get_codes(features, tmp_path):
    torch.manual_seed(0)
    fitted = item_codes(features, CodeSettings("pq", digits=4, codes_per_digit=16), root=tmp_path)
    codes = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.from_numpy(fitted.codes)])
    for use_text in (False, True):
        net = UniSRec(num_items=len(features), plm_dim=32, hidden_dim=8, n_layers=1, use_text=use_text, use_codes=True,
                      code_digits=4, codes_per_digit=16).eval()
        net.set_item_codes(codes)
        if use_text:
            net.set_item_features(torch.cat([torch.zeros(1, 32), torch.from_numpy(features)]))
        with torch.no_grad():
            whole = net.item_table()
            ids = torch.tensor([1, 5, 77, 600])
            torch.testing.assert_close(net.item_table(chunk_size=64), whole)
            torch.testing.assert_close(net.partial_item_table(ids)[ids], whole[ids])
            expected = net.code_embedding(codes[ids] + net.code_offsets).mean(1)
            if use_text:
                expected = expected + net.adapter(net.item_features[ids])
            torch.testing.assert_close(whole[ids], expected)
    # a new item's codes come from its text; a near-duplicate of item 5 shares most of item 5's digits
    twin = features[4:5] + 1e-4
    new = fitted.codes_for(twin)
    assert new.shape == (1, 5) and (new[0, :4] == fitted.codes[4, :4]).sum() >= 3
    # its collision digit is the next one in its tuple's group (wrapping at 16 codes: this group is larger)
    size = int((fitted.codes[:, :4] == new[0, :4]).all(1).sum())
    assert size > 1 and new[0, -1] == size % 16
    grown, added = fitted.extended(np.concatenate([twin, twin]))
    np.testing.assert_array_equal(added[:, -1], [size % 16, (size + 1) % 16])
    np.testing.assert_array_equal(grown.codes, np.concatenate([fitted.codes, added]))
    with pytest.raises(ValueError, match="item codes must lie"):
        net.set_item_codes(codes + 16)


def test_a_resumed_fit_saves_the_codes_it_loaded_not_a_refit(features, tmp_path):
    from unisrec_x.training.module import SeqRecModule

    fitted = item_codes(features, CodeSettings("pq", digits=4, codes_per_digit=16), root=tmp_path)
    net = UniSRec(num_items=len(features), plm_dim=32, hidden_dim=8, n_layers=1, use_text=False, use_codes=True,
                  code_digits=4, codes_per_digit=16)
    net.set_item_codes(torch.zeros(len(features) + 1, 5, dtype=torch.long))  # what a refit might have given
    module = SeqRecModule(net)
    module.on_load_checkpoint({"state_dict": {}, "item_codes": fitted.to_state()})
    np.testing.assert_array_equal(net.item_codes[1:].numpy(), fitted.codes)
    saved: dict = {}
    module.on_save_checkpoint(saved)
    np.testing.assert_array_equal(saved["item_codes"]["codes"].numpy(), fitted.codes)
    wrong = fitted.to_state()
    wrong["codes"] = wrong["codes"][:10]
    with pytest.raises(ValueError, match="do not fit this model"):
        module.on_load_checkpoint({"state_dict": {}, "item_codes": wrong})


def test_memory_dropout_drops_whole_id_rows_or_code_digits_while_training_only_and_memory_scale_multiplies():
    torch.manual_seed(0)
    digits, items = 7, 400
    codes = torch.randint(0, 4, (items + 1, digits + 1))
    net = UniSRec(num_items=items, plm_dim=4, hidden_dim=digits + 1, n_layers=1, n_heads=1, use_text=False,
                  use_codes=True, code_digits=digits, codes_per_digit=4, memory_dropout=0.5)
    net.set_item_codes(codes)
    with torch.no_grad():  # digit k's embeddings are the unit vector e_k: a vector shows which digits it kept
        net.code_embedding.weight.copy_(torch.eye(digits + 1).repeat_interleave(4, dim=0))
        assert torch.allclose(net.eval().item_table(), torch.full((items + 1, digits + 1), 1 / (digits + 1)))
        table = net.train().item_table()
    kept = table > 0
    assert kept.any(1).all()  # never an empty mean
    torch.testing.assert_close(table, kept.float() / kept.sum(1, keepdim=True))
    assert 0.4 < kept.float().mean() < 0.6
    with pytest.raises(ValueError, match="memory_dropout"):
        UniSRec(use_codes=True, memory_dropout=1.0)

    net = UniSRec(num_items=items, plm_dim=4, hidden_dim=8, n_layers=1, use_text=False, use_item_id=True,
                  similarity="dot", memory_dropout=0.25)
    with torch.no_grad():
        full = net.eval().item_table()
        table = net.train().item_table()
    dropped = (table == 0).all(1)
    assert 0.15 < dropped[1:].float().mean() < 0.35
    torch.testing.assert_close(table[~dropped], full[~dropped])  # kept rows at their evaluation scale, as code means

    for use_codes in (False, True):  # memory_scale multiplies the ID or code part, not the text part
        nets = [UniSRec(num_items=items, plm_dim=4, hidden_dim=digits + 1, n_layers=1, n_heads=1, use_item_id=not use_codes,
                        use_codes=use_codes, code_digits=digits, codes_per_digit=4, memory_scale=scale).eval()
                for scale in (1.0, 3.0)]
        nets[1].load_state_dict(nets[0].state_dict())
        tables = []
        for net in nets:
            net.set_item_features(torch.randn(items + 1, 4, generator=torch.Generator().manual_seed(1)))
            net.set_item_codes(codes)
            with torch.no_grad():
                tables.append(net.item_table() - net.adapter(net.item_features))
        torch.testing.assert_close(tables[1], 3 * tables[0])


@pytest.mark.parametrize("threads", [2, 3])
def test_faiss_work_leaves_torchs_thread_count_as_it_was(features, tmp_path, threads):
    # faiss and torch share the OpenMP runtime: a fit's omp_set_num_threads(1) once left every later
    # torch op (a text + codes model's whole training) on one core
    import faiss

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fitted = item_codes(features, CodeSettings("opq", digits=4, codes_per_digit=16), root=tmp_path)
        assert torch.get_num_threads() == threads
        item_codes(features, CodeSettings("opq", digits=4, codes_per_digit=16), root=tmp_path)  # a cache load
        loaded = ItemQuantizer.from_bytes(fitted.settings, fitted.quantizer.to_bytes())
        loaded.decode(loaded.encode(features[:5]))
        fitted.codes_for(features[:3])
        assert torch.get_num_threads() == threads and faiss.omp_get_max_threads() == threads
    finally:
        torch.set_num_threads(before)


def _rewrite_cache(path, **changes):
    with np.load(path, allow_pickle=False) as stored:
        arrays = {**dict(stored), **changes}
    np.savez(path, **arrays)


@pytest.mark.parametrize("alteration", ["ten_rows", "code_9999", "one_code_moved", "other_quantizer"])
def test_an_altered_code_cache_with_its_key_kept_is_refitted(features, tmp_path, monkeypatch, caplog, alteration):
    settings = CodeSettings("pq", digits=4, codes_per_digit=16)
    first = item_codes(features, settings, root=tmp_path)
    (path,) = (tmp_path / "codes").glob("*.npz")
    stored = first.codes.astype(np.int16)
    if alteration == "ten_rows":
        _rewrite_cache(path, codes=stored[:10])
    elif alteration == "code_9999":
        stored[3, 1] = 9999
        _rewrite_cache(path, codes=stored)
    elif alteration == "one_code_moved":  # in range and shape: only the recorded sha256 tells
        stored[3, 1] = (stored[3, 1] + 1) % 16
        _rewrite_cache(path, codes=stored)
    else:  # a valid quantizer of the same structure fitted on other vectors, its sha256 recorded: not these codes'
        other = ItemQuantizer.fit(np.random.default_rng(5).normal(size=features.shape), settings).to_bytes()
        _rewrite_cache(path, quantizer=np.frombuffer(other, dtype=np.uint8),
                       quantizer_sha256=np.array(hashlib.sha256(other).hexdigest()))
    fits = []
    real_fit = ItemQuantizer.fit
    monkeypatch.setattr(codes_module.ItemQuantizer, "fit", classmethod(lambda cls, x, s: fits.append(s) or real_fit(x, s)))
    again = item_codes(features, settings, root=tmp_path)
    assert len(fits) == 1 and "code cache not used" in caplog.text
    np.testing.assert_array_equal(again.codes, first.codes)
    item_codes(features, settings, root=tmp_path)
    assert len(fits) == 1  # the refit replaced the altered file


def _pq_header(dim: int, digits: int, bits: int, floats: int) -> bytes:
    """The start of a serialised faiss IndexPQ whose centroid vector claims ``floats`` floats."""
    header = b"IxPq" + np.int32(dim).tobytes() + np.int64(0).tobytes() + np.int64(1 << 20).tobytes() * 2
    header += b"\x01" + np.int32(1).tobytes()  # is_trained, METRIC_L2
    return header + b"".join(np.uint64(v).tobytes() for v in (dim, digits, bits, floats))


def test_quantizer_bytes_claiming_more_than_they_hold_are_refused_before_faiss_reads_them(features, tmp_path, monkeypatch,
                                                                                        caplog):
    # faiss allocates the sizes a file claims before reading them: 118 bytes claiming 2^28 floats took 1 GB
    import faiss

    from unisrec_x.errors import DataError

    settings = CodeSettings("pq", digits=4, codes_per_digit=16)
    good = ItemQuantizer.fit(features, settings).to_bytes()
    crafted = _pq_header(32, 4, 4, 1 << 28)
    crafted += bytes(118 - len(crafted))
    size_field = slice(61, 69)  # the centroid count, after the 37-byte index header and d, M, nbits
    assert good[size_field] == np.uint64(4 * 16 * 8).tobytes() and good[:61] == crafted[:61]
    same_length = bytearray(good)  # a real quantizer's bytes with its centroid count changed
    same_length[size_field] = np.uint64(1 << 28).tobytes()
    huge_dim, many_digits = bytearray(good), bytearray(good)
    huge_dim[4:8] = np.int32(1 << 30).tobytes()
    many_digits[45:53] = np.uint64(1 << 40).tobytes()
    calls = []
    real = faiss.deserialize_index
    monkeypatch.setattr(faiss, "deserialize_index", lambda blob: calls.append(len(blob)) or real(blob))
    for blob in (crafted, bytes(same_length), bytes(huge_dim), bytes(many_digits), good[:100], good + b"\0", b"", b"IxPq"):
        with pytest.raises(DataError, match=r"quantizer\.faiss: not a faiss pq quantizer \("):
            ItemQuantizer.from_bytes(settings, blob, tmp_path / "quantizer.faiss")
    assert calls == []  # refused before faiss saw them
    for method in ("pq", "opq", "rq"):
        fitted = ItemQuantizer.fit(features, CodeSettings(method, digits=4, codes_per_digit=16))
        for claimed in (CodeSettings(method, 4, 16), CodeSettings(method, 8, 32)):
            # a real quantizer loads and encodes as before, under its own sizes whatever the settings claim
            # (ItemCodes.quantizer_problem names the difference)
            loaded = ItemQuantizer.from_bytes(claimed, fitted.to_bytes())
            assert loaded.shape() == (4, [4] * 4)
            np.testing.assert_array_equal(loaded.index.sa_encode(features), fitted.index.sa_encode(features))
        other = {"pq": "opq", "opq": "rq", "rq": "pq"}[method]
        with pytest.raises(DataError, match=f"not a faiss {other} quantizer"):
            ItemQuantizer.from_bytes(CodeSettings(other, digits=4, codes_per_digit=16), fitted.to_bytes())
    assert len(calls) == 6
    # in the code cache: refused, logged, fitted again
    first = item_codes(features, settings, root=tmp_path)
    (path,) = (tmp_path / "codes").glob("*.npz")
    _rewrite_cache(path, quantizer=np.frombuffer(crafted, dtype=np.uint8),
                   quantizer_sha256=np.array(hashlib.sha256(crafted).hexdigest()))
    calls.clear()
    np.testing.assert_array_equal(item_codes(features, settings, root=tmp_path).codes, first.codes)
    assert "not a faiss pq quantizer" in caplog.text and calls == []
