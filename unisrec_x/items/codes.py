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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from unisrec_x.runtime.paths import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)
CodeMethod = Literal["pq", "opq", "rq"]
FORMAT_VERSION = 2  # 2: cache files carry sha256s of their features, codes and quantizer
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
        x = _float32(features)
        n, dim = x.shape
        if settings.method in ("pq", "opq") and dim % settings.digits:
            raise ValueError(f"{settings.method}: the text-vector size {dim} is not divisible by digits={settings.digits}")
        if n < settings.codes_per_digit:
            raise ValueError(f"{n} items cannot be split into {settings.codes_per_digit} codes per digit: "
                             "lower codes_per_digit")
        with faiss_threads(1) as faiss:  # deterministic assignments whatever the machine's core count
            index = _new_index(faiss, settings, dim)
            index.train(x)
        return cls(settings, index)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """(n, d) text vectors -> (n, digits) int64 codes in ``[0, codes_per_digit)``."""
        x = _float32(features)
        with faiss_threads():
            packed = self.index.sa_encode(x)  # (n, code bytes), digits packed LSB first
        return unpack_codes(packed, self.settings.digits, self.settings.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, digits) codes -> (n, d) reconstructions (the codebook entries, summed or joined)."""
        with faiss_threads():
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
        with faiss_threads() as faiss:
            return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, settings: CodeSettings, blob: bytes, path: str | Path | None = None) -> "ItemQuantizer":
        """The quantizer serialised in ``blob`` (read from ``path``, named in errors), refused unless it is a
        well-formed ``settings.method`` quantizer (``_check_serialised``): faiss allocates whatever sizes a
        file claims before reading them, so 118 bytes claiming 2^28 floats took a gigabyte before failing."""
        with faiss_threads() as faiss:
            _check_serialised(faiss, settings, blob, path)
            return cls(settings, faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)))


def _new_index(faiss, settings: CodeSettings, dim: int):
    """An untrained faiss index of ``settings``' method and sizes for ``dim``-d vectors."""
    if settings.method == "rq":
        index = faiss.IndexResidualQuantizer(dim, settings.digits, settings.bits)
        index.rq.cp.seed = settings.seed
        index.rq.cp.min_points_per_centroid = 1  # small catalogs: train on what there is, without warnings
        return index
    pq = faiss.IndexPQ(dim, settings.digits, settings.bits)
    pq.pq.cp.seed = settings.seed
    pq.pq.cp.min_points_per_centroid = 1
    if settings.method == "pq":
        return pq
    opq = faiss.OPQMatrix(dim, settings.digits)
    opq.pq = pq.pq  # the rotation is learned jointly with this PQ's codebooks
    opq.verbose = False
    return faiss.IndexPreTransform(opq, pq)


def _trained_template(faiss, settings: CodeSettings, dim: int, fill: int) -> np.ndarray:
    """What a trained quantizer of ``settings`` for ``dim``-d vectors serialises to, its learned floats
    (codebooks, OPQ rotation, RQ's norm range) filled with the byte ``fill``."""
    index = _new_index(faiss, settings, dim)
    ksub = settings.codes_per_digit
    value = float(np.full(4, fill, np.uint8).view(np.float32)[0])

    def filled(vector, size: int) -> None:
        faiss.copy_array_to_vector(np.full(size, value, np.float32), vector)

    if settings.method == "rq":
        filled(index.rq.codebooks, settings.digits * ksub * dim)
        index.rq.norm_min = index.rq.norm_max = value
        index.rq.is_trained = True
    else:
        pq_index = index if settings.method == "pq" else faiss.downcast_index(index.index)
        filled(pq_index.pq.centroids, dim * ksub)
        pq_index.is_trained = True
        if settings.method == "opq":
            opq = faiss.downcast_VectorTransform(index.chain.at(0))
            filled(opq.A, dim * dim)
            opq.is_trained = True
    index.is_trained = True
    return faiss.serialize_index(index)


_HEADER = 37  # a faiss index header under the L2 metric: type tag, d, ntotal, 2 dummies, is_trained, metric


def _declared(blob: bytes, method: CodeMethod, dim: int) -> tuple[int, int]:
    """(digits, bits) where a serialised ``method`` quantizer of ``dim``-d vectors declares them, read
    without trusting them (the caller compares the whole file with what they imply)."""
    at = _HEADER + 8  # IndexPQ: ProductQuantizer's d, M, nbits; IndexResidualQuantizer: d, M, nbits[M]
    if method == "opq":  # the PQ index follows the rotation: nt, "LTra", have_bias, A (d x d), b, d_in, d_out, is_trained
        at += _HEADER + 34 + 4 * dim * dim
    bits_at = at + (16 if method == "rq" else 8)  # RQ: M, then a vector of M widths (its size first)
    if len(blob) < bits_at + 8:
        raise ValueError(f"{len(blob)} bytes are too few for its {dim}-d vectors")
    return tuple(int(np.frombuffer(blob, dtype="<u8", count=1, offset=o)[0]) for o in (at, bits_at))


def _check_serialised(faiss, settings: CodeSettings, blob: bytes, path: str | Path | None) -> None:
    """Refuse (``DataError`` naming ``path``) bytes that are not a trained ``settings.method`` quantizer.

    The vector size (header), digits and bits (where the method stores them) are read from the file
    and checked against its length before anything of their size exists; then every byte but the
    learned floats' must equal what a quantizer of those sizes serialises to (every size field, flag
    and type tag), so faiss never reads a size the file cannot hold. Digits and bits other than the
    settings' pass here: ``ItemQuantizer.shape`` and ``ItemCodes.quantizer_problem`` report them.
    """
    from unisrec_x.errors import DataError

    what = f"not a faiss {settings.method} quantizer"
    dim = int(np.frombuffer(blob[4:8], dtype="<i4")[0]) if len(blob) >= 8 else 0
    if dim < 1:
        raise DataError(f"{what} ({len(blob)} bytes, its header gives {dim}-d vectors)", path)
    if 4 * dim * (dim if settings.method == "opq" else 1) > len(blob):
        raise DataError(f"{what} (its {len(blob)} bytes cannot hold a quantizer of the {dim}-d vectors its header "
                        "gives)", path)
    try:
        digits, bits = _declared(blob, settings.method, dim)
        if not (1 <= bits <= 8 and 1 <= digits <= len(blob)):
            raise ValueError(f"it declares {digits} digits of {bits} bits")
        declared = CodeSettings(settings.method, digits, 1 << bits, settings.seed)
        if settings.method != "rq" and dim % digits:
            raise ValueError(f"{dim}-d vectors cannot be cut into {digits} digits")
    except ValueError as err:
        raise DataError(f"{what} ({err})", path) from None
    ksub = declared.codes_per_digit
    floats = {"pq": dim * ksub, "opq": dim * dim + dim * ksub, "rq": digits * ksub * dim}[settings.method]
    if 4 * floats > len(blob):
        raise DataError(f"{what} (its {len(blob)} bytes cannot hold the {floats} floats of {digits} digits x {bits} bits "
                        f"for {dim}-d vectors)", path)
    blank, marked = _trained_template(faiss, declared, dim, 0), _trained_template(faiss, declared, dim, 0x5A)
    data = np.frombuffer(blob, dtype=np.uint8)
    if len(data) != len(blank):
        raise DataError(f"{what} ({len(data)} bytes; one of {digits} digits x {bits} bits for {dim}-d vectors has "
                        f"{len(blank)})", path)
    fixed = blank == marked  # every byte but the learned floats'
    if not np.array_equal(data[fixed], blank[fixed]):
        at = int(np.flatnonzero(fixed & (data != blank))[0])
        raise DataError(f"{what} (byte {at} differs from the structure of one of {digits} digits x {bits} bits "
                        f"for {dim}-d vectors)", path)


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
    settings refit. A cache file is used only if it proves to be these features' codes (``_read_cache``);
    a truncated, altered or foreign one is logged and refitted, not trusted.
    """
    x = _float32(features)
    features_sha256 = hashlib.sha256(x.tobytes()).hexdigest()
    key = hashlib.sha256((features_sha256 + json.dumps({**asdict(settings), "format": FORMAT_VERSION,
                                                        "shape": x.shape}, sort_keys=True)).encode()).hexdigest()
    path = Path(root or cache_dir()) / "codes" / f"{key[:32]}.npz"
    if path.exists():
        try:
            cached = _read_cache(path, key, features_sha256, x, settings)
            if cached is not None:
                return cached
        except Exception as err:  # truncated, altered or foreign: refit below
            log.warning("%s: code cache not used (%s); fitting again", path, err)
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

    stored = codes.astype(np.int16)  # codes_per_digit <= 256
    blob = quantizer.to_bytes()
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), codes=stored, quantizer=np.frombuffer(blob, dtype=np.uint8),
             collided=np.array(collided), features_sha256=np.array(features_sha256),
             codes_sha256=np.array(hashlib.sha256(stored.tobytes()).hexdigest()),
             quantizer_sha256=np.array(hashlib.sha256(blob).hexdigest()))
    atomic_write_bytes(path, buffer.getvalue())
    return ItemCodes(codes, quantizer, collided)


def _read_cache(path: Path, key: str, features_sha256: str, x: np.ndarray, settings: CodeSettings) -> ItemCodes | None:
    """The cached codes in ``path`` if they are those of ``x`` under ``settings``; ``None`` for another
    key's file (same name prefix); ``ValueError`` saying why not otherwise.

    A file whose key is right may still have been altered or half-written over: its codes must have
    the catalog's shape and range, the features, codes and quantizer their recorded sha256s, and the
    quantizer must be well-formed (``ItemQuantizer.from_bytes``) and give these codes
    (``ItemCodes.quantizer_problem``: its vector size, digits, bits and encodings).
    """
    with np.load(path, allow_pickle=False) as stored:
        if str(stored["key"]) != key:
            return None
        if str(stored["features_sha256"]) != features_sha256:
            raise ValueError("fitted from other text vectors")
        codes, blob, collided = stored["codes"], stored["quantizer"].tobytes(), int(stored["collided"])
        codes_sha256, quantizer_sha256 = str(stored["codes_sha256"]), str(stored["quantizer_sha256"])
    expected = (len(x), settings.digits + 1)
    if codes.dtype != np.int16 or codes.shape != expected:
        raise ValueError(f"codes are {codes.dtype} {codes.shape}, expected int16 {expected}")
    if codes.min() < 0 or codes.max() >= settings.codes_per_digit:
        raise ValueError(f"codes lie outside [0, {settings.codes_per_digit})")
    if hashlib.sha256(np.ascontiguousarray(codes).tobytes()).hexdigest() != codes_sha256:
        raise ValueError("codes differ from the sha256 recorded when they were fitted")
    if hashlib.sha256(blob).hexdigest() != quantizer_sha256:
        raise ValueError("quantizer differs from the sha256 recorded when it was fitted")
    if not 0 <= collided <= len(x):
        raise ValueError(f"{collided} collided items of {len(x)}")
    loaded = ItemCodes(codes.astype(np.int64), ItemQuantizer.from_bytes(settings, blob, path), collided)
    problem = loaded.quantizer_problem(x.shape[1], x)
    if problem:
        raise ValueError(problem)
    return loaded


@contextmanager
def faiss_threads(threads: int | None = None) -> Iterator:
    """faiss (with ``threads`` OpenMP threads, default as they are); afterwards faiss's and torch's thread
    counts are what they were. Both use the process's OpenMP runtime, so ``faiss.omp_set_num_threads(1)``
    left alone would make every later torch op single-threaded (issue 27: a codes fit trained on one core).
    """
    import torch

    faiss = _faiss()
    saved_faiss, saved_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    try:
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        yield faiss
    finally:
        faiss.omp_set_num_threads(saved_faiss)
        torch.set_num_threads(saved_torch)


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
