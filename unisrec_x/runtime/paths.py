"""Where datasets and caches live; overridable so users can point at their own copies."""

from __future__ import annotations

import os
from pathlib import Path

from unisrec_x.errors import DataError

DATA_ROOT_ENV = "UNISREC_X_DATA_ROOT"
CACHE_DIR_ENV = "UNISREC_X_CACHE"
DEFAULT_DATA_ROOT = "../shared/data"


def data_root(override: str | Path | None = None) -> Path:
    """Resolve the data root: explicit value, then ``$UNISREC_X_DATA_ROOT``, then ``../shared/data``."""
    root = Path(override or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data root does not exist (set --data_root or ${DATA_ROOT_ENV} to the folder holding the datasets)",
            root.resolve(),
        )
    return root


def resolve_data_path(path: str | Path, root: str | Path | None = None) -> Path:
    """A relative dataset path is taken under the data root; an absolute one is used as is."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else data_root(root) / path


def cache_dir() -> Path:
    """Folder for derived artefacts (text features): ``$UNISREC_X_CACHE`` or ``~/.cache/unisrec-x``."""
    env = os.environ.get(CACHE_DIR_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "unisrec-x"
    return base


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary sibling and rename, so a crash never leaves a half-written file (a kill -9 can leave
    the sibling, ``.<name>.tmp-<pid>``; ``leftover_siblings`` finds those)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: no half-written sibling left behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` through ``atomic_write_bytes``: serialised in memory first, so a cut write leaves the old file."""
    import io

    import torch  # here, so reading paths never imports torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def leftover_siblings(folder: Path) -> list[Path]:
    """Temporary siblings (``atomic_write_bytes``) a killed writer left in ``folder``."""
    return sorted(folder.glob(".*.tmp-*")) if folder.is_dir() else []
