"""Output folders (model directories, exports): refuse what this tool did not write, swap in atomically.

A user's ``--out`` may name anything: a folder of their own, the current folder, ``/``, a file.
Only a folder this tool wrote (its manifest says so and it holds nothing else) may be replaced,
and only when the caller asks for it; an empty folder is filled. Everything else is refused
before anything is written, so a typo never costs a user their files.

The new folder is built in a hidden sibling and swapped in. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)``: at every instant the path holds the old folder or the new one.
Where that call is missing, the old folder is renamed aside first; a process killed between
the two renames leaves it beside the path, and the next write or read of that path puts it back
(``recover``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from unisrec_x.errors import DataError

log = logging.getLogger(__name__)


class OutputKind(NamedTuple):
    """What this tool writes into one kind of folder: recognised by its manifest and file names."""

    name: str  # e.g. "model directory", used in messages
    manifest: str  # JSON file with {"format": format, ...}
    format: str
    files: frozenset[str]  # every name the folder may hold


def _owned(directory: Path, kind: OutputKind) -> bool:
    """True when ``directory`` is one this tool wrote as ``kind`` and holds nothing a user added."""
    names = {p.name for p in directory.iterdir()}
    if kind.manifest not in names or not names <= kind.files:
        return False
    manifest = directory / kind.manifest
    try:
        if manifest.stat().st_size > 1 << 20:
            return False
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("format") == kind.format


def check_output_path(directory: str | Path, kind: OutputKind, overwrite: bool) -> Path:
    """Refuse an output path that would destroy something the user made; returns it made absolute."""
    if str(directory).strip() == "":
        raise DataError("the output path is empty: name a new folder to write the "
                        f"{kind.name} into")
    given = Path(directory).expanduser()
    if given.is_symlink():
        raise DataError(f"the output path is a symbolic link; name a real folder for the {kind.name}", given)
    path = given.absolute()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise DataError(f"refusing to replace the current folder or one of its parents with a {kind.name}; "
                        "name a new folder", given)
    if resolved.parent == resolved:
        raise DataError(f"refusing to write a {kind.name} over the file-system root", given)
    recover(resolved, kind)
    if not resolved.exists():
        return resolved
    if not resolved.is_dir():
        raise DataError(f"the output path exists and is not a folder; refusing to replace it with a {kind.name}", given)
    if not any(resolved.iterdir()):
        return resolved  # an empty folder: nothing to lose
    if not _owned(resolved, kind):
        raise DataError(f"the output folder exists and is not a {kind.name} written by unisrec-x "
                        f"(no {kind.manifest} of format {kind.format!r}, or it holds other files); "
                        "refusing to replace it: name a new folder", given)
    if not overwrite:
        raise DataError(f"a {kind.name} already exists here; pass --overwrite (overwrite=True) to replace it", given)
    return resolved


# --- the swap -----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_ASIDE = re.compile(r"^\.(?P<name>.+)\.(?P<what>old|tmp)-(?P<pid>\d+)$")


def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


_renameat2_fn = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call; False where the platform or file system cannot."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(directory: Path, kind: OutputKind) -> None:
    """Undo what a killed writer left beside ``directory``: put an old folder back where the path
    is missing, and drop finished leftovers (temporary folders, old folders already replaced).

    Only a sibling that holds nothing but ``kind``'s files is touched (an old folder must also carry
    its manifest), so a folder of the user's that happens to match the naming is never moved or deleted.
    """
    parent = directory.parent
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        found = _ASIDE.match(entry.name)
        if not found or found["name"] != directory.name or _alive(int(found["pid"])) or not entry.is_dir():
            continue
        ours = _owned(entry, kind) if found["what"] == "old" else {p.name for p in entry.iterdir()} <= kind.files
        if not ours:
            continue
        if found["what"] == "old" and not directory.exists():
            entry.rename(directory)
            log.warning("%s: an interrupted write left the previous folder aside; it is back in place", directory)
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_directory(directory: str | Path, kind: OutputKind, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it takes ``directory``'s place in one step.

    ``directory`` is checked first (``check_output_path``): nothing is written when it is refused.
    On an error inside the block the temporary folder is removed and ``directory`` is untouched.
    """
    directory = check_output_path(directory, kind, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        unexpected = {p.name for p in tmp.iterdir()} - kind.files
        if unexpected:
            raise RuntimeError(f"{kind.name} writer produced unlisted files {sorted(unexpected)}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists() and exchange(tmp, directory):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        return
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    _replace_step(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _replace_step(tmp: Path, directory: Path) -> None:
    """The second rename of the fallback swap (a seam for the crash test)."""
    tmp.rename(directory)
