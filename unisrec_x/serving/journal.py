"""Items added to a served model, kept on disk until a model directory takes them in.

``unisrec-x serve`` answers ``POST /items`` 201 only once the new items are in the model's journal
and fsync'd, so an acknowledged item survives ``kill -9`` or a power cut. Loading the model
(``serve``, ``recommend``, ``add-items``, ``export``, ``Recommender.from_checkpoint``) replays the
journal on top, so every command sees the catalog the server answered with. ``add-items`` and
``save`` into the model's own directory compact it: the items go into the new directory, whose
journal starts empty.

Where: ``added-items.jsonl`` inside a model directory (it travels, and is replaced, with the
directory), ``<checkpoint>.items.jsonl`` beside a checkpoint file, or ``--journal PATH``.

Format: one JSON object per line, appended whole and never rewritten::

    {"v": 1, "id": "NEW-1", "text": "...", "vector": "<base64 little-endian float32>", "crc32": "1a2b3c4d"}

``vector`` is the text encoder's output for ``text``, so replay appends exactly the rows the server
added without loading the encoder; ``crc32`` covers ``[v, id, text, vector]``. A record of a model with
knowledge fields adds ``"fields": {"title": "...", ...}`` (each field's text); its ``vector`` is the text
vector (where the model reads one text) followed by each field's vector, and ``crc32`` covers
``[v, id, text, vector, fields]``. A last line without its newline is a write a crash cut short (never
acknowledged): replay skips it with a warning and the next append cuts it off. Any other bad line is a
``DataError`` naming the file and line. Replay is idempotent: an id already in the model with the same
text is skipped (a crash between a compaction's swap and the clearing of an outside journal), with
another text it is refused.

Writers of one model (a server's append, ``add-items``' read-modify-write, ``save`` over the
source) hold a ``flock`` on ``.<name>.lock`` beside the model; readers take no lock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import threading
import time
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from unisrec_x.errors import DataError
from unisrec_x.runtime.locks import try_lock, wait_lock

if TYPE_CHECKING:
    from unisrec_x.serving.recommender import Recommender

log = logging.getLogger(__name__)

JOURNAL_NAME = "added-items.jsonl"  # inside a model directory (listed in model_dir.MODEL_DIR)
CHECKPOINT_SUFFIX = ".items.jsonl"  # beside a checkpoint file: last.ckpt -> last.ckpt.items.jsonl
VERSION = 1
KEYS = ("v", "id", "text", "vector", "crc32")
KNOWLEDGE_KEYS = (*KEYS, "fields")  # a record of a model with knowledge fields
SERVE_LOCK_WAIT = 5.0  # seconds a POST /items waits for add-items to finish before it gets 503


class JournalUnavailable(Exception):
    """The journal cannot take items now; ``status`` is the HTTP answer (503 busy or failing disk,
    409 the model was rewritten under the server). Nothing was added."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Record(NamedTuple):
    token: str
    text: str
    vector: np.ndarray  # (plm_dim,) float32; with knowledge fields ((text?) + fields) * plm_dim
    line: int
    fields: dict[str, str] | None = None  # knowledge field -> text


def default_journal(model: str | Path) -> Path:
    """Where the journal of ``model`` (a model directory or a checkpoint file) lives by default."""
    model = Path(model)
    return model / JOURNAL_NAME if model.is_dir() else model.with_name(model.name + CHECKPOINT_SUFFIX)


def lock_file(model: str | Path) -> Path:
    """``.<name>.lock`` beside the model: outside a directory that a compaction swaps away."""
    model = Path(model).resolve()
    return model.parent / f".{model.name}.lock"


def encode_record(token: str, text: str, vector: np.ndarray, fields: dict[str, str] | None = None) -> bytes:
    """One journal line, newline included."""
    packed = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    extra = () if fields is None else (fields,)
    record = {"v": VERSION, "id": token, "text": text, "vector": packed,
              **({} if fields is None else {"fields": fields}), "crc32": _crc(VERSION, token, text, packed, *extra)}
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _crc(version: object, token: object, text: object, vector: object, *fields: object) -> str:
    payload = json.dumps([version, token, text, vector, *fields], ensure_ascii=False, separators=(",", ":"))
    return f"{zlib.crc32(payload.encode('utf-8')):08x}"


def _parse(raw: bytes, path: Path, line: int) -> Record:
    def damaged(why: str) -> DataError:
        return DataError(f"damaged journal record: {why} (expected one record per line as unisrec-x serve writes "
                         "them; restore the file from a backup, or delete the line to drop that item)", path, line)

    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise damaged(f"not a JSON line ({type(err).__name__})") from None
    if not isinstance(record, dict) or sorted(record) not in (sorted(KEYS), sorted(KNOWLEDGE_KEYS)):
        raise damaged(f"keys {sorted(record) if isinstance(record, dict) else type(record).__name__} "
                      f"(expected {', '.join(KEYS)}, and fields for a model with knowledge fields)")
    version, token, text, packed, crc = (record[k] for k in KEYS)
    if not all(isinstance(v, str) for v in (token, text, packed, crc)):
        raise damaged("id, text, vector and crc32 must be strings")
    fields = record.get("fields")
    if "fields" in record and not (isinstance(fields, dict) and all(isinstance(v, str) for v in fields.values())):
        raise damaged("fields must map field names to texts")
    try:
        checksum = _crc(version, token, text, packed, *(() if fields is None else (fields,)))
    except UnicodeEncodeError:  # a lone surrogate escaped into the JSON
        raise damaged("text that is not valid UTF-8") from None
    if crc != checksum:
        raise damaged(f"checksum {crc} does not match its content ({checksum})")
    if version != VERSION:
        raise DataError(f"journal record of version {version!r}; this unisrec-x reads version {VERSION}", path, line)
    try:
        data = base64.b64decode(packed, validate=True)
    except (binascii.Error, ValueError):
        raise damaged("vector is not base64") from None
    if not data or len(data) % 4:
        raise damaged(f"vector has {len(data)} bytes (expected float32 values, 4 bytes each)")
    vector = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        raise damaged("vector holds NaN or inf")
    return Record(token, text, vector, line, fields)


def _identity(path: Path) -> tuple | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size


class ItemJournal:
    """The journal of one model: read and replayed at load, appended to by a server, cleared by compaction.

    It remembers what the model and the journal were when read, so a writer can tell whether someone
    else (``add-items``, another server) has written them since.
    """

    def __init__(self, path: str | Path, model: str | Path) -> None:
        """Make it before the model is read: a rewrite of the model directory after this is noticed."""
        self.path = Path(path).absolute()
        self.model = Path(model).resolve()
        self._model_seen = self._model_identity()
        self._journal_seen: tuple | None = None

    def _model_identity(self) -> tuple | None:
        return _identity(self.model)[:2] if self.model.is_dir() else None

    def changed(self) -> bool:
        """Whether the model directory was replaced or the journal written by someone else since it was read."""
        return self._model_identity() != self._model_seen or _identity(self.path) != self._journal_seen

    def rebase(self) -> None:
        """Take the model and journal as they are now as this process's own (after its own compaction)."""
        self._model_seen, self._journal_seen = self._model_identity(), _identity(self.path)

    def read(self) -> list[Record]:
        """Every complete record; a last line cut short by a crash is skipped with a warning."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
                stat = os.fstat(handle.fileno())
        except FileNotFoundError:
            self._journal_seen = None
            return []
        except OSError as err:
            raise DataError(f"cannot read the journal ({err.strerror})", self.path) from None
        self._journal_seen = (stat.st_dev, stat.st_ino, len(data))
        lines = data.split(b"\n")
        if lines[-1]:
            log.warning("%s:%d: skipping a last record cut short by a crash while it was written (it was never "
                        "acknowledged)", self.path, len(lines))
        return [_parse(raw, self.path, number) for number, raw in enumerate(lines[:-1], 1)]

    def replay(self, recommender: "Recommender") -> int:
        """Add the journal's items to ``recommender`` from their stored vectors; returns how many were new."""
        records = self.read()
        if not records:
            return 0
        net = recommender.net
        if not (net.use_text or net.use_codes or net.knowledge is not None):
            raise DataError(f"the journal holds {len(records)} added items but this model has no text side "
                            "(ID-only, e.g. SASRec), so it cannot have added them", self.path)
        reads_text, fields = int(net.use_text or net.use_codes), net.knowledge_fields
        size = net.plm_dim * (reads_text + len(fields))
        new: dict[str, Record] = {}
        for record in records:
            token, text, line = record.token, record.text, record.line
            if token in recommender.aliases:
                raise DataError(f"item {token!r} is already in the model as an alias of {recommender.aliases[token]!r}",
                                self.path, line)
            known = recommender.token_to_id.get(token)
            earlier = new.get(token)
            if known is not None or earlier is not None:
                old = recommender.item_texts[known - 1] if known is not None else earlier.text
                if old != text:
                    where = "in the model" if known is not None else f"on line {earlier.line}"
                    raise DataError(f"item {token!r} is already {where} with another text (expected the same "
                                    "item or a new id; was the journal written for another model?)", self.path, line)
                continue  # already compacted into the model, or journaled twice: the same item
            if record.vector.shape != (size,):
                raise DataError(f"item {token!r} has a vector of {record.vector.size} values, expected {size} "
                                "(the model's text-vector size, times its knowledge fields and text; was the journal "
                                "written for another model?)", self.path, line)
            if sorted(record.fields or {}) != sorted(fields):
                raise DataError(f"item {token!r} has the knowledge fields {sorted(record.fields or {})}, expected "
                                f"{sorted(fields)} (was the journal written for another model?)", self.path, line)
            new[token] = record
        if new:
            vectors = torch.from_numpy(np.stack([r.vector for r in new.values()])).view(len(new), -1, net.plm_dim)
            recommender._append(list(new), [r.text for r in new.values()], vectors[:, 0] if reads_text else None,
                                vectors[:, reads_text:] if fields else None,
                                {f: [r.fields[f] for r in new.values()] for f in fields} if fields else None)
        log.info("%s: replayed %d added items (%d already in the model)", self.path, len(new), len(records) - len(new))
        return len(new)

    def append(self, tokens: Sequence[str], texts: Sequence[str], features: torch.Tensor | None,
               knowledge: torch.Tensor | None = None, fields: dict[str, list[str]] | None = None) -> None:
        """Write the items and fsync them (and the folder, when the file is new). The caller holds
        ``model_lock(self.model)``; on any failure the file is left as it was and nothing counts.

        ``features`` (n, plm_dim) where the model reads one text per item; ``knowledge`` (n, fields, plm_dim)
        and ``fields`` (field -> n texts) for a model with knowledge fields."""
        if self.changed():
            raise JournalUnavailable(f"{self.model} was rewritten since this server loaded it (add-items, save or "
                                     "another server wrote it); restart `unisrec-x serve` to add items", 409)
        parts = [p.detach().to(torch.float32).cpu().reshape(len(tokens), -1) for p in (features, knowledge)
                 if p is not None]
        vectors = torch.cat(parts, dim=1).numpy()  # (n, (text?) + fields) * plm_dim
        per_item = ([None] * len(tokens) if fields is None
                    else [{f: v[i] for f, v in fields.items()} for i in range(len(tokens))])
        lines = b"".join(encode_record(t, x, v, f) for t, x, v, f in zip(tokens, texts, vectors, per_item))
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise JournalUnavailable(f"{self.path}: cannot write the journal ({err.strerror}); nothing was added",
                                     503) from None
        start = None
        try:
            start = _drop_torn_tail(fd, self.path)
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            stat = os.fstat(fd)
        except OSError as err:  # disk full, I/O error
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # a record half written must not count after a restart
            raise JournalUnavailable(f"{self.path}: cannot write the journal ({err.strerror}); nothing was added",
                                     503) from None
        finally:
            os.close(fd)
        if created:
            _fsync_folder(self.path.parent)
        self._journal_seen = (stat.st_dev, stat.st_ino, stat.st_size)

    def clear(self) -> None:
        """Empty the journal (its items are in the model now); the caller holds the model's lock."""
        try:
            with open(self.path, "r+b") as handle:
                handle.truncate(0)
                os.fsync(handle.fileno())
        except FileNotFoundError:
            pass


def _drop_torn_tail(fd: int, path: Path) -> int:
    """Cut off a last line without its newline (a crash mid-write), so the next record starts a line."""
    def read(offset: int, count: int) -> bytes:  # os.pread is missing on Windows
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, count)

    size = os.fstat(fd).st_size
    if size == 0 or read(size - 1, 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        newline = read(start, end - start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    log.warning("%s: cutting off a last record left unfinished by a crash (%d bytes, never acknowledged)",
                path, size - end)
    os.ftruncate(fd, end)
    return end


def _fsync_folder(folder: Path) -> None:
    """Make a new file's name durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_held: dict[Path, list] = {}  # lock file -> [thread that holds it, depth]: a holder may take it again
_held_guard = threading.Lock()


@contextmanager
def model_lock(model: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the model's writers' lock (reentrant within a thread). ``timeout=None`` waits as long as it
    takes; otherwise ``JournalUnavailable`` (503) after ``timeout`` seconds. Where the file system has no
    locks, or the lock file cannot be made, it warns and goes on unguarded (as the experiment runner does)."""
    path, me = lock_file(model), threading.get_ident()
    with _held_guard:
        entry = _held.get(path)
        if entry is not None and entry[0] == me:
            entry[1] += 1
    if entry is not None and entry[0] == me:
        try:
            yield
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    handle = _acquire(path, Path(model), timeout)
    mine = [me, 1]
    with _held_guard:
        _held[path] = mine
    try:
        yield
    finally:
        with _held_guard:
            if _held.get(path) is mine:
                del _held[path]
        if handle is not None:
            handle.close()  # releases the flock


@contextmanager
def model_locks(*models: str | Path) -> Iterator[None]:
    """The locks of those of ``models`` that exist (a new folder has no reader or server yet), always
    taken in one order, so two writers never wait on each other."""
    with ExitStack() as stack:
        for model in sorted({Path(m).resolve() for m in models}):
            if model.exists():
                stack.enter_context(model_lock(model))
        yield


def _acquire(path: Path, model: Path, timeout: float | None):
    try:
        handle = open(path, "a+")
    except OSError as err:  # a read-only folder: no journal can be written beside the model either
        log.info("cannot create the lock file %s (%s); %s is not guarded against concurrent writers",
                 path, err.strerror, model)
        return None
    held = try_lock(handle)
    if held:
        return handle
    if held is None:  # no flock here (Windows, some NFS, FUSE, CIFS mounts)
        handle.close()
        log.warning("cannot lock %s; %s is not guarded against concurrent writers", path, model)
        return None
    if timeout is None:
        log.warning("%s is being written by another unisrec-x process (serve or add-items); waiting for it", model)
        wait_lock(handle)
        return handle
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if try_lock(handle):
            return handle
    handle.close()
    raise JournalUnavailable(f"{model} is being rewritten by another unisrec-x process (add-items?) for over "
                             f"{timeout:g} s; nothing was added, try again", 503)
