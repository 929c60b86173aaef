"""Item text vectors cached on disk: ``.npy`` (memory-mapped on load) + ``.json`` key.

The key holds encoder, pooling, max length and a hash of the texts, so a changed text or
encoder re-encodes; a checksum of the array catches truncated or altered files. Encoding
writes shards as it goes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from unisrec_x.runtime.locks import building
from unisrec_x.runtime.paths import atomic_write_bytes, cache_dir
from unisrec_x.items.encoder import Pooling, Precision, TextEncoder, encoder_identity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_ROWS = 1024


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (NUL-separated, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _array_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class FeatureCache:
    """Looks up, validates and (re)builds the feature matrix for one list of texts."""

    def __init__(self, encoder: str, pooling: Pooling = "cls", max_length: int = 512, batch_size: int = 64,
                 root: str | Path | None = None, variant: str = "clean", precision: Precision = "float32") -> None:
        """
        Args:
            encoder: encoder name or path (see ``TextEncoder``).
            pooling: ``cls`` or ``mean``.
            max_length: token limit per text.
            batch_size: texts per forward pass when encoding.
            root: cache folder (default ``$UNISREC_X_CACHE`` or ``~/.cache/unisrec-x``).
            variant: names what was done to the texts before encoding (e.g. word drop), kept in the key.
            precision: the encoder's ``float32`` or ``bfloat16`` (kept in the key when not float32, so
                float32 keys are those of earlier versions).
        """
        self.encoder, self.pooling, self.max_length, self.batch_size = encoder, pooling, max_length, batch_size
        self.root = Path(root) if root is not None else cache_dir() / "text-features"
        self.variant, self.precision = variant, precision

    def key(self, texts: Sequence[str]) -> dict:
        return {"format": FORMAT_VERSION, "encoder": encoder_identity(self.encoder), "pooling": self.pooling,
                "max_length": self.max_length, "variant": self.variant, "texts_sha256": texts_digest(texts),
                "num_texts": len(texts), **({"precision": self.precision} if self.precision != "float32" else {})}

    def paths(self, key: dict, name: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        stem = self.root / f"{name}-{digest}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def load(self, texts: Sequence[str], name: str = "items") -> np.ndarray | None:
        """The cached matrix (memory-mapped) if present and valid; ``None`` otherwise, with the reason logged."""
        key = self.key(texts)
        return self._load(key, *self.paths(key, name))

    def _load(self, key: dict, npy: Path, meta_path: Path) -> np.ndarray | None:
        if not npy.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                log.warning("%s: cache key differs from the request; re-encoding", meta_path)
                return None
            array = np.load(npy, mmap_mode="r", allow_pickle=False)
            if array.shape != (key["num_texts"], meta["dim"]) or array.dtype != np.float32:
                log.warning("%s: shape %s/%s does not match %d texts x %d; re-encoding", npy, array.shape, array.dtype,
                            key["num_texts"], meta["dim"])
                return None
            if hashlib.sha256(npy.read_bytes()).hexdigest() != meta["file_sha256"]:
                log.warning("%s: checksum mismatch (file altered or truncated); re-encoding", npy)
                return None
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            log.warning("%s: unreadable cache (%s); re-encoding", npy, err)
            return None
        return array

    def get(self, texts: Sequence[str], name: str = "items",
            make_encoder: Callable[[], TextEncoder] | None = None) -> np.ndarray:
        """Return the feature matrix, encoding (resumably) on a miss."""
        key = self.key(texts)  # hashes every text: computed once per call
        npy, meta_path = self.paths(key, name)
        cached = self._load(key, npy, meta_path)
        if cached is None:
            # One builder at a time (DDP ranks, parallel runs): whoever waits re-checks and finds a hit.
            with building(npy.with_suffix(".lock")):
                cached = self._load(key, npy, meta_path)
                if cached is None:
                    return self._build(texts, key, npy, meta_path, make_encoder)
        log.info("text features: cache hit %s", npy)
        return cached


    def _build(self, texts: Sequence[str], key: dict, npy: Path, meta_path: Path,
               make_encoder: Callable[[], TextEncoder] | None) -> np.ndarray:
        from tqdm.auto import tqdm

        encoder = make_encoder() if make_encoder else TextEncoder(self.encoder, self.pooling, self.max_length, self.batch_size,
                                                                    self.precision)
        shard_dir = npy.with_suffix(".shards")
        shard_dir.mkdir(parents=True, exist_ok=True)
        out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
        done = np.zeros(len(texts), dtype=bool)
        for shard in sorted(shard_dir.glob("*.npz")):  # resume: rows finished by an earlier run
            try:
                with np.load(shard, allow_pickle=False) as part:
                    out[part["rows"]] = part["vectors"]
                    done[part["rows"]] = True
            except (ValueError, OSError, KeyError):
                shard.unlink()
        todo = np.flatnonzero(~done)
        if len(done) - len(todo):
            log.info("text features: resuming, %d of %d already encoded", len(done) - len(todo), len(texts))
        pending_rows: list[np.ndarray] = []
        bar = tqdm(total=len(todo), desc=f"encoding {npy.stem}", unit="text", disable=len(todo) < 256)
        for rows, vectors in encoder.batches([texts[i] for i in todo]):
            rows = todo[rows]
            out[rows] = vectors
            pending_rows.append(rows)
            bar.update(len(rows))
            if sum(map(len, pending_rows)) >= SHARD_ROWS:
                self._write_shard(shard_dir, out, pending_rows)
                pending_rows = []
        bar.close()
        payload = _array_bytes(out)
        atomic_write_bytes(npy, payload)
        meta = {"key": key, "dim": encoder.dim, "file_sha256": hashlib.sha256(payload).hexdigest()}
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
        for shard in shard_dir.glob("*"):
            shard.unlink()
        shard_dir.rmdir()
        return np.load(npy, mmap_mode="r", allow_pickle=False)

    @staticmethod
    def _write_shard(shard_dir: Path, out: np.ndarray, pending: list[np.ndarray]) -> None:
        rows = np.concatenate(pending)
        buf = io.BytesIO()
        np.savez(buf, rows=rows, vectors=out[rows])
        index = len(list(shard_dir.glob("*.npz")))
        atomic_write_bytes(shard_dir / f"{index:06d}.npz", buf.getvalue())
