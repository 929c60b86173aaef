"""Semantic item IDs: a short tuple of discrete codes per item, learned from its text vector.

Similar texts share codes, so a rare item borrows what its code-mates learned, a new item gets
codes from its text alone, and the item parameters are (digits x codes per digit) vectors instead
of one per item (VQ-Rec, Hou et al. WWW 2023: product quantization; TIGER, NeurIPS 2023: residual
quantization). The quantizers are faiss's: ``pq`` (product quantization), ``opq`` (PQ after a
learned rotation, VQ-Rec's choice) and ``rq`` (residual quantization).

Two items with identical codes would get identical vectors; as in TIGER, an extra digit numbers
the items of each such group (0, 1, ...), so every item keeps a tuple of its own (up to
``codes_per_digit`` items per group; larger groups wrap around and are reported).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from unisrec_x.runtime.paths import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)
CodeMethod = Literal["pq", "opq", "rq"]
FORMAT_VERSION = 1
CHECKPOINT_KEY = "item_codes"  # a code model's checkpoint entry: its codes and quantizer (ItemCodes.to_state)


@dataclass(frozen=True)
class CodeSettings:
    """How codes are fitted; every field is part of the cache key."""

    method: CodeMethod = "opq"
    digits: int = 32
    codes_per_digit: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("pq", "opq", "rq"):
            raise ValueError(f"code method must be 'pq', 'opq' or 'rq', got {self.method!r}")
        bits = int(self.codes_per_digit).bit_length() - 1
        if self.codes_per_digit < 2 or self.codes_per_digit > 256 or 1 << bits != self.codes_per_digit:
            raise ValueError(f"codes_per_digit must be a power of two from 2 to 256, got {self.codes_per_digit}")
        if self.digits < 1:
            raise ValueError(f"digits must be at least 1, got {self.digits}")

    @property
    def bits(self) -> int:
        return int(self.codes_per_digit).bit_length() - 1


class ItemQuantizer:
    """A fitted faiss quantizer: text vectors (n, d) -> codes (n, digits), and back to reconstructions."""

    def __init__(self, settings: CodeSettings, index) -> None:
        self.settings, self.index = settings, index

    @classmethod
    def fit(cls, features: np.ndarray, settings: CodeSettings) -> "ItemQuantizer":
        faiss = _faiss()

        x = _float32(features)
        n, dim = x.shape
        if settings.method in ("pq", "opq") and dim % settings.digits:
            raise ValueError(f"{settings.method}: the text-vector size {dim} is not divisible by digits={settings.digits}")
        if n < settings.codes_per_digit:
            raise ValueError(f"{n} items cannot be split into {settings.codes_per_digit} codes per digit: "
                             "lower codes_per_digit")
        faiss.omp_set_num_threads(1)  # deterministic assignments whatever the machine's core count
        if settings.method == "rq":
            index = faiss.IndexResidualQuantizer(dim, settings.digits, settings.bits)
            index.rq.cp.seed = settings.seed
            index.rq.cp.min_points_per_centroid = 1  # small catalogs: train on what there is, without warnings
        else:
            pq = faiss.IndexPQ(dim, settings.digits, settings.bits)
            pq.pq.cp.seed = settings.seed
            pq.pq.cp.min_points_per_centroid = 1
            if settings.method == "pq":
                index = pq
            else:
                opq = faiss.OPQMatrix(dim, settings.digits)
                opq.pq = pq.pq  # the rotation is learned jointly with this PQ's codebooks
                opq.verbose = False
                index = faiss.IndexPreTransform(opq, pq)
        index.train(x)
        return cls(settings, index)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """(n, d) text vectors -> (n, digits) int64 codes in ``[0, codes_per_digit)``."""
        packed = self.index.sa_encode(_float32(features))  # (n, code bytes), digits packed LSB first
        return unpack_codes(packed, self.settings.digits, self.settings.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, digits) codes -> (n, d) reconstructions (the codebook entries, summed or joined)."""
        return self.index.sa_decode(pack_codes(codes, self.settings.bits))

    def shape(self) -> tuple[int, list[int]]:
        """(digits, bits of each digit) of the faiss index itself, whatever ``settings`` claim."""
        faiss = _faiss()
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexPreTransform):  # OPQ: rotation, then PQ
            index = faiss.downcast_index(index.index)
        if isinstance(index, faiss.IndexPQ):
            return index.pq.M, [index.pq.nbits] * index.pq.M
        if isinstance(index, faiss.IndexResidualQuantizer):
            return index.rq.M, faiss.vector_to_array(index.rq.nbits).tolist()
        raise ValueError(f"a faiss {type(index).__name__} is not an item quantizer (expected PQ, OPQ or RQ)")

    def to_bytes(self) -> bytes:
        faiss = _faiss()
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, settings: CodeSettings, blob: bytes) -> "ItemQuantizer":
        faiss = _faiss()
        return cls(settings, faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)))


def unpack_codes(packed: np.ndarray, digits: int, bits: int) -> np.ndarray:
    """faiss's packed codes (n, bytes), each digit ``bits`` wide, least significant bit first -> (n, digits)."""
    flat = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8), axis=1, bitorder="little")[:, :digits * bits]
    weights = 1 << np.arange(bits, dtype=np.int64)
    return (flat.reshape(len(packed), digits, bits).astype(np.int64) * weights).sum(-1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of ``unpack_codes``."""
    codes = np.asarray(codes, dtype=np.int64)
    flat = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(len(codes), -1)
    return np.packbits(flat, axis=1, bitorder="little")


def with_collision_digit(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Append TIGER's extra digit: the rank of each item within its group of identical code tuples.

    Returns ``(codes (n, digits + 1), items that shared their tuple with another)``.
    """
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - np.repeat(starts, sizes)
    return np.concatenate([codes, rank[:, None]], axis=1), int(sizes[sizes > 1].sum())


@dataclass
class ItemCodes:
    """Codes of a catalog (n, digits + 1, the last digit resolving collisions) and the quantizer that made them."""

    codes: np.ndarray
    quantizer: ItemQuantizer
    collided: int

    def codes_for(self, features: np.ndarray) -> np.ndarray:
        """Codes of new items (``Recommender.add_items``): their text's codes, and as collision digit the
        next free rank in their tuple's group (items of the catalog first, then earlier new ones)."""
        new = self.quantizer.encode(features)
        digits, per_digit = self.settings.digits, self.settings.codes_per_digit
        taken = Counter(_row_keys(self.codes[:, :digits]))
        rank = np.empty(len(new), dtype=np.int64)
        for i, key in enumerate(_row_keys(new)):
            rank[i] = taken[key]
            taken[key] += 1
        if rank.max(initial=0) >= per_digit:
            log.warning("%d new items share a code tuple with %d or more items: their collision digit wraps around",
                        int((rank >= per_digit).sum()), per_digit)
        return np.concatenate([new, (rank % per_digit)[:, None]], axis=1)

    def extended(self, features: np.ndarray) -> tuple["ItemCodes", np.ndarray]:
        """These codes with new items' appended (a new object: a reader never sees half an update),
        and the new items' codes."""
        new = self.codes_for(features)
        return ItemCodes(np.concatenate([self.codes, new]), self.quantizer, self.collided), new

    @property
    def settings(self) -> CodeSettings:
        return self.quantizer.settings

    def table(self):
        """The codes as a network's code table (``UniSRec.set_item_codes``): row 0 is the padding item."""
        import torch

        codes = torch.from_numpy(self.codes)
        return torch.cat([codes.new_zeros(1, codes.shape[1]), codes])

    def settings_problem(self, digits: int, codes_per_digit: int) -> str | None:
        """Why these codes' settings do not fit a network with these sizes, or ``None``."""
        settings = self.settings
        if (settings.digits, settings.codes_per_digit) != (digits, codes_per_digit):
            return (f"codes have {settings.digits} digits x {settings.codes_per_digit} but the network expects "
                    f"{digits} x {codes_per_digit}")
        return None

    def codes_problem(self, items: int) -> str | None:
        """Why these codes cannot be the codes of ``items`` items under their settings, or ``None``."""
        digits, codes_per_digit = self.settings.digits, self.settings.codes_per_digit
        if self.codes.shape != (items, digits + 1):
            return f"codes have shape {self.codes.shape}, expected ({items}, {digits + 1}) for {items} items"
        if self.codes.size and (self.codes.min() < 0 or self.codes.max() >= codes_per_digit):
            return f"codes lie outside [0, {codes_per_digit})"
        return None

    def quantizer_problem(self, plm_dim: int, features: np.ndarray | None = None) -> str | None:
        """Why the quantizer cannot give new items codes like these, or ``None``: its input size and code
        width, and (given the items' text vectors) whether it reproduces most of their digits (a
        refit on another BLAS may move a few; a foreign quantizer agrees on ~1 in codes_per_digit)."""
        settings, index = self.settings, self.quantizer.index
        if index.d != plm_dim:
            return f"the quantizer encodes {index.d}-d text vectors, the network reads {plm_dim}-d"
        digits, bits = self.quantizer.shape()
        if (digits, bits) != (settings.digits, [settings.bits] * settings.digits):
            return (f"the quantizer has {digits} digits of {sorted(set(bits))} bits, the codes "
                    f"{settings.digits} of {settings.bits}")
        if features is not None and len(features):
            sample = min(len(features), 256)
            agree = float((self.quantizer.encode(features[:sample]) == self.codes[:sample, :-1]).mean())
            if agree < 0.5:
                return f"the quantizer reproduces only {agree:.0%} of the items' code digits: it is not theirs"
        return None

    def to_state(self) -> dict:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``): a checkpoint keeps
        the codes its model was trained with, instead of trusting a refit on another machine or BLAS."""
        import torch

        return {"codes": torch.from_numpy(self.codes.astype(np.int16)), "collided": self.collided,
                "quantizer": torch.from_numpy(np.frombuffer(self.quantizer.to_bytes(), dtype=np.uint8).copy()),
                "settings": asdict(self.settings)}

    @classmethod
    def from_state(cls, state: dict) -> "ItemCodes":
        settings = CodeSettings(**state["settings"])
        quantizer = ItemQuantizer.from_bytes(settings, state["quantizer"].numpy().tobytes())
        return cls(state["codes"].numpy().astype(np.int64), quantizer, int(state["collided"]))


def checked_state(state: object, items: int, digits: int, codes_per_digit: int, plm_dim: int,
                  features: np.ndarray | None, path: str | Path | None) -> ItemCodes:
    """A checkpoint's codes (``ItemCodes.to_state``) for ``items`` items of a network with these sizes
    (and, given them, these items' text vectors), else a ``DataError`` naming the checkpoint."""
    from unisrec_x.errors import DataError, first_line

    try:
        codes = ItemCodes.from_state(state)
    except Exception as err:  # a missing key, a bad setting, bytes faiss cannot parse
        raise DataError(f"checkpoint's item codes cannot be read ({first_line(err)})", path) from None
    problem = (codes.settings_problem(digits, codes_per_digit) or codes.codes_problem(items)
               or codes.quantizer_problem(plm_dim, features))
    if problem:
        raise DataError(f"checkpoint's item codes do not fit this model and data: {problem}", path)
    return codes


def _row_keys(codes: np.ndarray) -> list[bytes]:
    """One hashable key per code tuple."""
    return [row.tobytes() for row in np.ascontiguousarray(codes, dtype=np.int16)]


def item_codes(features: np.ndarray, settings: CodeSettings, root: str | Path | None = None) -> ItemCodes:
    """Fit (or load from the cache) the codes of ``features`` (n, d) under ``settings``.

    The cache key is a hash of the features' bytes and the settings, so changed text vectors or
    settings refit; a damaged cache file is refitted, not trusted.
    """
    x = _float32(features)
    key = hashlib.sha256(x.tobytes() + json.dumps({**asdict(settings), "format": FORMAT_VERSION,
                                                    "shape": x.shape}, sort_keys=True).encode()).hexdigest()
    path = Path(root or cache_dir()) / "codes" / f"{key[:32]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) == key:
                    quantizer = ItemQuantizer.from_bytes(settings, stored["quantizer"].tobytes())
                    return ItemCodes(stored["codes"].astype(np.int64), quantizer, int(stored["collided"]))
        except Exception as err:  # a truncated or foreign file: refit below
            log.warning("%s: unreadable code cache (%s); fitting again", path, err)
    quantizer = ItemQuantizer.fit(x, settings)
    codes, collided = with_collision_digit(quantizer.encode(x))
    log.info("item codes (%s, %d digits x %d): %d of %d items shared their code tuple with another%s",
             settings.method, settings.digits, settings.codes_per_digit, collided, len(x),
             f" (extra digit up to {codes[:, -1].max()})" if collided else "")
    largest = int(codes[:, -1].max()) + 1
    if largest > settings.codes_per_digit:  # a group larger than one digit can number
        codes[:, -1] %= settings.codes_per_digit
        log.warning("up to %d items share one code tuple, more than codes_per_digit=%d can tell apart: %d items still "
                    "share their codes (use more digits or codes per digit)", largest,
                    settings.codes_per_digit, len(codes) - len(np.unique(codes, axis=0)))
    import io

    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), codes=codes.astype(np.int16),  # codes_per_digit <= 256
             quantizer=np.frombuffer(quantizer.to_bytes(), dtype=np.uint8), collided=np.array(collided))
    atomic_write_bytes(path, buffer.getvalue())
    return ItemCodes(codes, quantizer, collided)


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # not its probing of CPU-specific builds
    try:
        import faiss
    except ImportError:
        raise ImportError("item codes need faiss: pip install 'unisrec-x[codes]' (faiss-cpu)") from None
    return faiss


def _float32(features: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"text features must be a non-empty (items, dim) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("text features hold NaN or inf")
    return x
