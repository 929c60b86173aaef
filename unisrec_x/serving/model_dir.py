"""A self-contained model directory: it survives the dataset moving and carries items added after
training (a Lightning checkpoint instead rebuilds its items from its dataset: ``checkpoint_source.py``):

    model.json          format, network arguments, text-encoder settings
    weights.pt          the network's state dict (loaded with weights_only=True)
    items.item          RecBole atomic file: item_id:token, text:token_seq, alias:token (id order;
                        alias is another name of the item, e.g. its ASIN, or empty); a model with
                        knowledge fields adds knowledge.<field>:token_seq, each field's text or empty
    item_features.npy   (N + 1, plm_dim) float32 text vectors, row 0 = padding (read with
                        allow_pickle=False; any float dtype or byte order becomes native float32)
    knowledge_features.npy  models with knowledge fields: (N + 1, fields, plm_dim) float32, each field's
                        vector (zero where empty), row 0 = padding; precomputed, so serving needs no encoder
    item_codes.npy      models with item codes: (N, digits + 1) int16 codes of items 1..N
    quantizer.faiss     ... and the faiss quantizer that gives new items their codes
    added-items.jsonl   items a server added since the directory was written (``journal.py``)

``model.json`` also records the sha256 of every other file (``checksums``: a damaged or edited file is
refused, not loaded) and a text fingerprint (``text_fingerprint``: a few items whose stored vectors the
text encoder must reproduce before new items are encoded). Directories written before either still load.
All files are opened through one directory handle before any is read, so a directory replaced meanwhile
(``--overwrite``) is read whole, the old version or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

import numpy as np
import torch

from unisrec_x.items.codes import CodeSettings, ItemCodes, ItemQuantizer, with_collision_digit
from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.errors import DataError, first_line
from unisrec_x.items.encoder import TextSettings, encoder_identity
from unisrec_x.serving.parts import ModelParts, TextFingerprint, load_weights
from unisrec_x.training.checkpoint import read_state_dict
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.runtime.outputs import OutputKind, atomic_directory
from unisrec_x.runtime.typed_args import checked_args, exact_keys, type_ok

if TYPE_CHECKING:
    from unisrec_x.items.encoder import TextEncoder
    from unisrec_x.serving.recommender import Recommender

log = logging.getLogger(__name__)

FORMAT = "unisrec-x-model"
VERSION = 1
def _model_dir_files(manifest: dict) -> set[str]:
    """The files a model directory with this manifest holds: ``--overwrite`` replaces nothing else
    (runtime/outputs.py). Its checksums list them; older manifests: code files only where it records codes."""
    checksums = manifest.get("checksums")
    if isinstance(checksums, dict):
        return {"model.json", "added-items.jsonl", *checksums}
    return (set(MODEL_DIR.files) - {"knowledge_features.npy"}  # older than checksums: older than knowledge too
            - ({"item_codes.npy", "quantizer.faiss"} if manifest.get("codes") is None else set()))


MODEL_DIR = OutputKind("model directory", "model.json", FORMAT,
                      frozenset({"model.json", "weights.pt", "items.item", "item_features.npy", "item_codes.npy",
                                 "quantizer.faiss", "knowledge_features.npy",
                                 "added-items.jsonl"}),  # serving/journal.py: items a server added since
                      expected=_model_dir_files)
ITEM_FIELDS = [("item_id", "token"), ("text", "token_seq"), ("alias", "token")]
CHECKSUMMED = ("weights.pt", "items.item", "item_features.npy", "item_codes.npy", "quantizer.faiss",
               "knowledge_features.npy")
KNOWLEDGE_COLUMN = "knowledge.{}"  # items.item's column of a knowledge field's texts
MIN_COSINE = 0.999  # a re-encoded stored item vs its stored vector (bfloat16 vs float32 stays above it)
MIN_CODE_AGREEMENT = 0.9  # models without stored vectors: share of code digits that must come out again


MANIFEST_KEYS = ("format", "version", "net", "text", "items", "codes", "checksums", "text_fingerprint")  # save_model_dir's
OPTIONAL_KEYS = ("codes", "checksums", "text_fingerprint")  # absent in directories written before they existed
_DIR_FD = hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd
_OPEN_TRIES = 20


def load_model_dir(directory: Path) -> ModelParts:
    """A model directory's parts; every file is checked, and a problem is a DataError naming it."""
    directory = Path(directory)
    files = _open_files(directory)
    try:
        return _load_opened(directory, files)
    finally:
        for handle in files.values():
            handle.close()


def _load_opened(directory: Path, files: dict[str, BinaryIO]) -> ModelParts:
    manifest_path = directory / "model.json"
    manifest = _read_manifest(manifest_path, directory, files.get("model.json"))
    try:
        net = UniSRec(**checked_args(manifest["net"], UniSRec.__init__, "net", manifest_path))
    except ValueError as err:  # sizes out of range, hidden_dim not divisible by n_heads, ...
        raise DataError(f"net: {err}", manifest_path) from None
    knows = net.knowledge is not None
    needed = (["weights.pt", "items.item"] + ["item_features.npy"] * net.use_text
              + ["item_codes.npy", "quantizer.faiss"] * net.use_codes + ["knowledge_features.npy"] * knows)
    _check_sums(directory, files, manifest.get("checksums"), needed)
    weights = files.get("weights.pt")
    if weights is None:
        raise DataError("checkpoint not found", directory / "weights.pt")
    load_weights(net, read_state_dict(directory / "weights.pt", weights), directory / "weights.pt")
    tokens, texts, aliases, knowledge_texts = _read_items(directory / "items.item", files.get("items.item"),
                                                          net.knowledge_fields)
    if manifest["items"] != len(tokens) or ((net.use_item_id or net.counts_items) and net.num_items != len(tokens)):
        raise DataError(f"model.json counts {manifest['items']} items (net.num_items {net.num_items}) but items.item has "
                        f"{len(tokens)} (expected the same count)", manifest_path)
    features = (_read_features(directory / "item_features.npy", files.get("item_features.npy"), tokens, (net.plm_dim,))
                if net.use_text else None)
    knowledge = (_read_features(directory / "knowledge_features.npy", files.get("knowledge_features.npy"), tokens,
                                (len(net.knowledge_fields), net.plm_dim)) if knows else None)
    # a text top's stored vectors are not the frozen ones the quantizer was fitted on: nothing to compare
    codes = (_read_codes(directory, files, manifest.get("codes"), net, len(tokens),
                         None if net.text_top is not None else features) if net.use_codes else None)
    text = manifest["text"]
    text = None if text is None else TextSettings(**checked_args(text, TextSettings, "text", manifest_path))
    fingerprint = None
    if text is not None and (net.use_text or net.use_codes or knows):
        fingerprint = _read_fingerprint(manifest.get("text_fingerprint"), set(tokens), manifest_path)
    return ModelParts(net, tokens, texts, features, text, aliases, codes, fingerprint, knowledge, knowledge_texts)


def _open_files(directory: Path) -> dict[str, BinaryIO]:
    """The files ``load_model_dir`` reads, all opened before any is read, all of one version of the directory.

    ``--overwrite`` swaps a new directory in whole (``atomic_directory``), then deletes the old one: files
    opened one by one as the load goes could come from both (99 of 802 loads under a writer in a loop were
    mixed). Opened through one directory handle, they all belong to the directory it holds, whatever the
    path names meanwhile; when that directory was swapped out before all were open (its deletion may have
    taken some), they are opened again. Where ``dir_fd`` is missing, the directory's identity (device,
    inode) before and after the opening tells whether it changed.
    """
    files: dict[str, BinaryIO] = {}
    for attempt in range(_OPEN_TRIES):
        files, handle = {}, None
        try:
            handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY) if _DIR_FD else None
            identity = _identity(os.fstat(handle) if handle is not None else os.stat(directory))
            for name in ("model.json", *CHECKSUMMED):
                try:
                    fd = (os.open(name, os.O_RDONLY, dir_fd=handle) if handle is not None
                          else os.open(directory / name, os.O_RDONLY))
                except FileNotFoundError:
                    continue  # named by its reader, if the model needs it
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # e.g. a folder under that name: as good as missing
                    os.close(fd)
                    continue
                files[name] = os.fdopen(fd, "rb")
            if _identity(os.stat(directory)) == identity:
                return files
        except (FileNotFoundError, NotADirectoryError):  # the path is missing for a moment (the fallback swap)
            pass
        finally:
            if handle is not None:
                os.close(handle)
        if attempt + 1 < _OPEN_TRIES:
            for opened in files.values():
                opened.close()
            time.sleep(0.001 * attempt)
    if _DIR_FD:
        return files  # one directory's files still; any it lost are named as missing
    for opened in files.values():
        opened.close()
    raise DataError("the model directory kept changing while it was read (is another process replacing it?); "
                    "try again", directory)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _sha256(handle: BinaryIO) -> str:
    digest = hashlib.file_digest(handle, "sha256").hexdigest()
    handle.seek(0)
    return digest


def _check_sums(directory: Path, files: dict[str, BinaryIO], sums: object, needed: Sequence[str]) -> None:
    """Every file the model reads against the sha256 that model.json records, before any is parsed (damaged
    bytes never reach torch, numpy or faiss). A directory written before checksums has none to check."""
    if sums is None:
        return
    manifest_path = directory / "model.json"
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise DataError("checksums must map file names to sha256 hex digests", manifest_path)
    unknown = sorted(set(sums) - set(CHECKSUMMED))
    if unknown:
        raise DataError(f"checksums has unknown files {', '.join(unknown)} (expected some of {', '.join(CHECKSUMMED)})",
                        manifest_path)
    for name in needed:
        if name not in files:
            continue  # its reader names it as missing
        if name not in sums:
            raise DataError(f"model.json records no checksum for {name}", manifest_path)
        if _sha256(files[name]) != sums[name]:
            raise DataError("checksum does not match model.json (file altered or damaged)", directory / name)


def _read_codes(directory: Path, files: dict[str, BinaryIO], settings: object, net: UniSRec, items: int,
                features: torch.Tensor | None) -> ItemCodes:
    """The codes and quantizer of a code model, checked against its network; problems name the file."""
    manifest_path = directory / "model.json"
    if settings is None:
        raise DataError("the network uses item codes but model.json has no \"codes\" settings", manifest_path)
    arguments = checked_args(settings, CodeSettings, "codes", manifest_path)
    try:
        settings = CodeSettings(**arguments)
    except ValueError as err:  # e.g. codes_per_digit not a power of two
        raise DataError(f"codes: {err}", manifest_path) from None
    path = directory / "item_codes.npy"
    if "item_codes.npy" not in files:
        raise DataError("code model without item_codes.npy", path)
    try:
        codes = np.load(files["item_codes.npy"], allow_pickle=False)
    except Exception as err:  # truncated, object arrays, a damaged header
        raise DataError(f"item_codes.npy cannot be read as a .npy array ({first_line(err)})", path) from None
    if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu":
        raise DataError(f"item_codes.npy must hold integer codes, got {getattr(codes, 'dtype', type(codes).__name__)}", path)
    quantizer_path = directory / "quantizer.faiss"
    if "quantizer.faiss" not in files:
        raise DataError("code model without quantizer.faiss", quantizer_path)
    try:
        quantizer = ItemQuantizer.from_bytes(settings, files["quantizer.faiss"].read())
    except Exception as err:  # faiss raises RuntimeError on anything it cannot parse
        raise DataError(f"quantizer.faiss cannot be read as a faiss index ({first_line(err)})", quantizer_path) from None
    codes = codes.astype(np.int64)
    loaded = ItemCodes(codes, quantizer, with_collision_digit(codes[:, :-1])[1] if codes.ndim == 2 else 0)
    problem = loaded.settings_problem(net.code_digits, net.codes_per_digit)
    if problem:
        raise DataError(problem, manifest_path)
    problem = loaded.codes_problem(items)
    if problem:
        raise DataError(problem, path)
    problem = loaded.quantizer_problem(net.plm_dim, None if features is None else features[1:].numpy())
    if problem:
        raise DataError(problem, quantizer_path)
    return loaded


def _read_manifest(path: Path, directory: Path, handle: BinaryIO | None) -> dict:
    """``model.json`` as a dict with exactly ``MANIFEST_KEYS``, or a DataError saying what is wrong."""
    if handle is None:
        raise DataError("not a model directory: model.json is missing", directory)
    raw = handle.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"bytes that are not UTF-8 at byte {err.start} (model.json must be UTF-8 JSON)", path, line) from None
    except json.JSONDecodeError as err:
        raise DataError(f"model.json is not valid JSON ({err.msg})", path, err.lineno) from None
    except RecursionError:
        raise DataError("model.json is nested too deeply to be a manifest", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"model.json is not a {FORMAT} v{VERSION} manifest (expected \"format\": \"{FORMAT}\", "
                        f"\"version\": {VERSION})", path)
    exact_keys(manifest, MANIFEST_KEYS, "model.json", path, optional=OPTIONAL_KEYS)
    if not type_ok(manifest["items"], int):
        raise DataError(f"items {manifest['items']!r} is not an integer (expected the number of items)", path)
    return manifest


def _read_items(path: Path, handle: BinaryIO | None, fields: Sequence[str] = ()
                ) -> tuple[list[str], list[str], dict[str, str], dict[str, list[str]]]:
    """Tokens, texts, alias -> token and each knowledge field's texts of ``items.item``; a repeated id or alias
    names its line."""
    if handle is None:
        raise DataError("file not found", path)
    columns = [KNOWLEDGE_COLUMN.format(f) for f in fields]
    table = read_atomic(path, required=["item_id", "text", *columns], raw=handle.read())
    tokens, texts = table.column("item_id"), table.column("text")
    alias_column = table.column("alias") if "alias" in table.fields else [""] * len(tokens)
    first_line: dict[tuple[str, str], int] = {}
    for kind, values in (("item", tokens), ("alias", alias_column)):
        for value, line in zip(values, table.lines):
            if (kind, value) in first_line and (value or kind == "item"):
                raise DataError(f"{kind} {value!r} appears a second time (first on line {first_line[kind, value]}; "
                                "expected each once)", path, line)
            first_line[kind, value] = line
    return (tokens, texts, {a: t for a, t in zip(alias_column, tokens) if a},
            {f: table.column(c) for f, c in zip(fields, columns)})


def _read_features(path: Path, handle: BinaryIO | None, tokens: Sequence[str], row_shape: tuple[int, ...]) -> torch.Tensor:
    """``(N + 1, *row_shape)`` text vectors (``item_features.npy``: (plm_dim,); ``knowledge_features.npy``:
    (fields, plm_dim)): any float dtype and byte order, converted to native float32; all finite."""
    name = path.name
    if handle is None:
        raise DataError(f"{'text' if name == 'item_features.npy' else 'knowledge'} model without {name}", path)
    try:
        array = np.load(handle, allow_pickle=False)
    except Exception as err:  # truncated, header-only, object arrays, a damaged header (ValueError, EOFError, TokenError...)
        raise DataError(f"{name} cannot be read as a numeric .npy array ({first_line(err)})", path) from None
    if not isinstance(array, np.ndarray):  # an .npz archive under this name
        array.close()
        raise DataError(f"{name} is an .npz archive (expected one .npy array)", path)
    if array.dtype.kind != "f":
        raise DataError(f"{name} has dtype {array.dtype} (expected floating-point text vectors, e.g. float32)", path)
    expected = (len(tokens) + 1, *row_shape)
    if array.shape != expected:
        raise DataError(f"{name} has shape {array.shape}, expected ({', '.join(map(str, expected))}) "
                        f"for {len(tokens)} items", path)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        array = array.astype(np.float32)  # also native byte order: torch refuses big-endian arrays
    bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
    if bad.size:
        item = "the padding row" if bad[0] == 0 else f"item {tokens[bad[0] - 1]!r}"
        raise DataError(f"{name} row {bad[0]} ({item}) has NaN or inf values ({bad.size} rows in all; "
                        "expected finite numbers)", path)
    return torch.from_numpy(array)


# --- text fingerprint -----------------------------------------------------------------------------


def _read_fingerprint(given: object, tokens: set[str], manifest_path: Path) -> TextFingerprint:
    if given is None:
        return TextFingerprint((), "", manifest_path)  # written before fingerprints: unverified
    if (not isinstance(given, dict) or set(given) != {"items", "sha256"} or not isinstance(given["sha256"], str)
            or not isinstance(given["items"], list) or not given["items"]
            or not all(isinstance(t, str) and t in tokens for t in given["items"])):
        raise DataError("text_fingerprint must be {\"items\": [ids of stored items], \"sha256\": \"...\"}", manifest_path)
    return TextFingerprint(tuple(given["items"]), given["sha256"], manifest_path)


def _settings_digest(text: TextSettings, texts: Sequence[str]) -> str:
    """What makes a text's vector: the encoder (its version, if packaged), pooling, token limit, precision."""
    try:
        identity = encoder_identity(text.encoder)
    except Exception:  # the packaged encoder not installed here: its name stands for it
        identity = text.encoder
    key = [identity, text.pooling, text.max_tokens, text.precision, list(texts)]
    return hashlib.sha256(json.dumps(key, ensure_ascii=True).encode()).hexdigest()


def _fingerprint(recommender: "Recommender") -> dict | None:
    """Up to three stored items: the first, the last and the one with the longest text (a shorter token
    limit changes its vector), with the digest of the settings and their texts."""
    net, texts = recommender.net, recommender.item_texts
    if recommender.text is None or not (net.use_text or net.use_codes or net.knowledge is not None) or not texts:
        return None
    rows = sorted({0, len(texts) - 1, max(range(len(texts)), key=lambda i: len(texts[i]))})
    return {"items": [recommender.item_tokens[r] for r in rows],
            "sha256": _settings_digest(recommender.text, [texts[r] for r in rows])}


def verify_text_encoder(recommender: "Recommender", encoder: "TextEncoder") -> None:
    """Refuse an encoder that does not give the fingerprint's items their stored vectors again: new items
    would be encoded unlike the catalog (pooling ``mean`` for ``cls`` gave cosine 0.34 and ranked a copy
    of an item last). Runs once, when ``add_items`` loads the encoder anyway."""
    fingerprint: TextFingerprint | None = recommender.text_fingerprint
    if fingerprint is None:
        return
    if not fingerprint.items:
        log.warning("%s: no text fingerprint (written by an older unisrec-x), so its text settings are not "
                    "verified; new items may be encoded unlike the stored ones", fingerprint.manifest)
        return
    rows = [recommender.token_to_id[t] for t in fingerprint.items]
    texts = [recommender.item_texts[r - 1] for r in rows]
    net = recommender.net
    if net.use_text or net.knowledge is not None:
        if net.use_text:
            fresh, stored, labels = (np.asarray(encoder.encode(texts), dtype=np.float32), net.item_features[rows].numpy(),
                                     [repr(t) for t in fingerprint.items])
        else:  # knowledge fields alone: each stored field vector with a text
            fresh, stored, labels = _field_pairs(recommender, encoder, rows)
            if not labels:
                return  # the fingerprint's items have no field text: nothing to compare
        norms = np.linalg.norm(fresh, axis=1) * np.linalg.norm(stored, axis=1)
        cosine = (fresh * stored).sum(1) / np.maximum(norms, 1e-12)
        worst = int(cosine.argmin())
        if cosine[worst] > MIN_COSINE:
            return
        found = f"cosine {cosine[worst]:.3f} to the stored vector of item {labels[worst]}, expected > {MIN_COSINE}"
    else:  # codes only: no vectors are stored, but their codes must come out again
        codes = recommender.item_codes.quantizer.encode(np.asarray(encoder.encode(texts), dtype=np.float32))
        agreement = float((codes == recommender.item_codes.codes[np.array(rows) - 1, :codes.shape[1]]).mean())
        if agreement >= MIN_CODE_AGREEMENT:
            return
        found = f"{agreement:.0%} of their code digits come out again, expected at least {MIN_CODE_AGREEMENT:.0%}"
    if _settings_digest(recommender.text, texts) != fingerprint.sha256:
        why = "its text settings (encoder, pooling, max_tokens, precision) were changed after the items were encoded"
    else:
        why = f"the encoder {recommender.text.encoder!r} now computes other vectors (other weights or version?)"
    raise DataError(f"the text encoder does not reproduce the stored items ({found}): {why}; new items would not "
                    "be comparable with them", fingerprint.manifest)


def _field_pairs(recommender: "Recommender", encoder: "TextEncoder", rows: list[int]
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The fingerprint items' non-empty knowledge fields: fresh vectors, stored vectors and names."""
    pairs = [(row, column, texts[row - 1]) for row in rows
             for column, texts in enumerate(recommender.knowledge_texts.values()) if texts[row - 1]]
    if not pairs:
        return np.zeros((0, 0)), np.zeros((0, 0)), []
    fresh = np.asarray(encoder.encode([text for _, _, text in pairs]), dtype=np.float32)
    stored = np.stack([recommender.net.knowledge_features[row, column].numpy() for row, column, _ in pairs])
    names = list(recommender.knowledge_texts)
    return fresh, stored, [f"{recommender.item_tokens[row - 1]!r} ({names[column]})" for row, column, _ in pairs]


def save_model_dir(recommender: "Recommender", directory: Path, overwrite: bool = False) -> Path:
    """Write into a sibling temp folder, then swap it in: a crash never leaves half a model.
    An existing model directory is replaced only with ``overwrite``; anything else is refused."""
    net = recommender.net
    manifest = {
        "format": FORMAT, "version": VERSION,
        "net": {**net.init_args, "num_items": net.num_items},
        "text": recommender.text._asdict() if recommender.text else None,
        "items": recommender.num_items,
        "codes": asdict(recommender.item_codes.settings) if recommender.item_codes is not None else None,
        "text_fingerprint": _fingerprint(recommender),
    }
    with atomic_directory(directory, MODEL_DIR, overwrite) as tmp:
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        (tmp / "weights.pt").write_bytes(buffer.getvalue())
        fields = recommender.knowledge_texts
        write_atomic(tmp / "items.item", ITEM_FIELDS + [(KNOWLEDGE_COLUMN.format(f), "token_seq") for f in fields],
                     [(t, text, recommender.alias_of.get(t, ""), *(texts[row] for texts in fields.values()))
                      for row, (t, text) in enumerate(zip(recommender.item_tokens, recommender.item_texts))])
        if net.use_text:
            np.save(tmp / "item_features.npy", net.item_features.numpy().astype(np.float32))
        if recommender.item_codes is not None:
            np.save(tmp / "item_codes.npy", recommender.item_codes.codes.astype(np.int16))  # codes_per_digit <= 256
            (tmp / "quantizer.faiss").write_bytes(recommender.item_codes.quantizer.to_bytes())
        if net.knowledge is not None:
            np.save(tmp / "knowledge_features.npy", net.knowledge_features.numpy().astype(np.float32))
        manifest["checksums"] = {}
        for name in CHECKSUMMED:
            if (tmp / name).is_file():
                with open(tmp / name, "rb") as written:
                    manifest["checksums"][name] = _sha256(written)
        (tmp / "model.json").write_text(json.dumps(manifest, indent=2))
    return Path(directory).resolve()

