"""Feature cache: hit, invalidation, corruption and resume, with a stub encoder; one real encode."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_close_f32
from unisrec_x.items.feature_cache import FeatureCache
from unisrec_x.items.encoder import TextEncoder


class StubEncoder:
    """Deterministic vectors from text length; counts how many texts it encoded."""

    dim = 4

    def __init__(self, fail_after: int | None = None) -> None:
        self.seen = 0
        self.fail_after = fail_after

    def batches(self, texts):
        for start in range(0, len(texts), 8):
            if self.fail_after is not None and self.seen >= self.fail_after:
                raise KeyboardInterrupt
            rows = np.arange(start, min(start + 8, len(texts)))
            self.seen += len(rows)
            yield rows, np.array([[len(texts[i]), i % 3, 1.0, 0.0] for i in rows], np.float32)


TEXTS = [f"item number {i} " + "x" * (i % 7) for i in range(50)]


def _cache(tmp_path, **kw):
    return FeatureCache("stub", root=tmp_path, **kw)


def test_hit_and_invalidation(tmp_path):
    stub = StubEncoder()
    first = _cache(tmp_path).get(TEXTS, "d", lambda: stub)
    assert stub.seen == 50 and first.shape == (50, 4)
    again = StubEncoder()
    np.testing.assert_array_equal(_cache(tmp_path).get(TEXTS, "d", lambda: again), first)
    assert again.seen == 0  # cache hit
    changed = StubEncoder()
    _cache(tmp_path).get(TEXTS[:-1] + ["another text"], "d", lambda: changed)
    assert changed.seen == 50  # one changed text re-encodes
    pooled = StubEncoder()
    _cache(tmp_path, pooling="mean").get(TEXTS, "d", lambda: pooled)
    assert pooled.seen == 50  # other pooling, other key


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    cache = _cache(tmp_path)
    cache.get(TEXTS, "d", StubEncoder)
    npy, meta = cache.paths(cache.key(TEXTS), "d")
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-40])
    elif damage == "flip":
        raw = bytearray(npy.read_bytes())
        raw[-5] ^= 0xFF
        npy.write_bytes(bytes(raw))
    else:
        meta.write_text("{not json")
    assert cache.load(TEXTS, "d") is None
    stub = StubEncoder()
    rebuilt = cache.get(TEXTS, "d", lambda: stub)
    assert stub.seen == 50 and rebuilt[0, 0] == len(TEXTS[0])


def test_interrupted_encoding_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr("unisrec_x.items.feature_cache.SHARD_ROWS", 16)
    cache = _cache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.get(TEXTS, "d", lambda: StubEncoder(fail_after=32))
    npy, _ = cache.paths(cache.key(TEXTS), "d")
    assert not npy.exists()
    resumed = StubEncoder()
    out = cache.get(TEXTS, "d", lambda: resumed)
    assert resumed.seen == 50 - 32  # the two finished shards were reused
    np.testing.assert_array_equal(out[:, 0], [len(t) for t in TEXTS])


def test_packaged_encoder_offline_cls_and_mean():
    texts = ["Gorilla Glue, waterproof polyurethane glue", "Sanding roll 80 grit", "3D printer filament 1.75mm PLA"]
    cls = TextEncoder(pooling="cls", batch_size=2)
    vectors = cls.encode(texts)
    assert vectors.shape == (3, 384) and np.isfinite(vectors).all()
    rows, batch = zip(*cls.batches(texts))
    merged = np.zeros_like(vectors)
    merged[np.concatenate(rows)] = np.concatenate(batch)
    assert_close_f32(merged, vectors)  # length-sorted batching changes nothing
    mean = TextEncoder(pooling="mean").encode(texts)
    assert not np.allclose(mean, vectors)
    sim = (vectors @ vectors.T) / np.outer(np.linalg.norm(vectors, axis=1), np.linalg.norm(vectors, axis=1))
    assert sim[0, 1] < 0.999  # distinct texts give distinct vectors
