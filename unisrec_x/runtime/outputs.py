"""Output folders (model directories, exports): refuse what this tool did not write, swap in atomically.

A user's ``--out`` may name anything: a folder of their own, the current folder, ``/``, a file.
Only a folder this tool wrote (its manifest says so and it holds nothing but regular files its
manifest accounts for) may be replaced, and only when the caller asks for it; an empty folder is
filled. Everything else is refused before anything is written, so a typo never costs a user their files.

The new folder is built in a hidden sibling and moved in. Where the path is free, a plain rename:
a folder never replaces a file or a non-empty folder, so one that appeared meanwhile makes it fail
instead of being lost. Where something is there, it is swapped out (on Linux one
``renameat2(RENAME_EXCHANGE)``, so the path always holds the old folder or the new one) and checked
again once it is out of the way: what is not ours to replace by then goes back and the write is
refused. Where ``renameat2`` is missing (Windows, macOS, old kernels) the old folder is renamed aside
first; a process killed between the two renames leaves it beside the path, and the next write or
read of that path puts it back (``recover``). An empty mount point cannot be renamed over: it is
filled in place, from a temporary folder inside it (on its own file system).

A write that fails (disk full, read-only or pseudo file system) is a one-line ``DataError`` and
leaves nothing behind: no temporary folder, no parent folder it created.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from unisrec_x.errors import DataError, first_line

log = logging.getLogger(__name__)


class OutputKind(NamedTuple):
    """What this tool writes into one kind of folder: recognised by its manifest and file names."""

    name: str  # e.g. "model directory", used in messages
    manifest: str  # JSON file with {"format": format, ...}
    format: str
    files: frozenset[str]  # every name the folder may hold
    #: the names a folder with this manifest holds (e.g. code files only where it records codes); default ``files``
    expected: Callable[[dict], Iterable[str]] | None = None


def _real_dir(path: Path) -> bool:
    """A folder itself, not a link to one (``Path.is_dir`` follows links)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _entries(directory: Path) -> list[os.DirEntry] | None:
    """``directory``'s entries, or ``None`` where it is not a real folder or cannot be read."""
    if not _real_dir(directory):
        return None
    try:
        with os.scandir(directory) as found:
            return list(found)
    except OSError:
        return None


def _only_our_files(entries: list[os.DirEntry], names: Iterable[str]) -> bool:
    """Every entry a regular file of one of ``names``: a folder or link named like one of ours is a user's."""
    names = frozenset(names)
    return all(e.name in names and e.is_file(follow_symlinks=False) for e in entries)


def _owned(directory: Path, kind: OutputKind) -> bool:
    """True when ``directory`` is one this tool wrote as ``kind`` and holds nothing a user added."""
    entries = _entries(directory)
    if entries is None or kind.manifest not in {e.name for e in entries} or not _only_our_files(entries, kind.files):
        return False
    manifest = directory / kind.manifest
    try:
        if manifest.stat().st_size > 1 << 20:
            return False
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    if not isinstance(content, dict) or content.get("format") != kind.format:
        return False
    return kind.expected is None or _only_our_files(entries, kind.files & frozenset(kind.expected(content)))


def _replaceable(directory: Path, kind: OutputKind, overwrite: bool) -> bool:
    """What may be deleted in the output's favour: an empty real folder, or (when asked) one of ours."""
    entries = _entries(directory)
    return entries is not None and (not entries or (overwrite and _owned(directory, kind)))


def _mount_point(path: Path) -> bool:
    try:
        return _real_dir(path) and os.path.ismount(path)
    except OSError:
        return False


def _check_parent(path: Path, given: Path, kind: OutputKind) -> None:
    """The nearest existing folder above ``path`` must be one this process may write in (``/dev/full/x``,
    ``/proc/self/x``, a read-only mount are refused here, before anything is loaded)."""
    parent = path.parent
    while not os.path.lexists(parent) and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{parent} is not a folder, so no {kind.name} can be written below it", given)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"cannot write in {parent} (no permission, or a read-only or pseudo file system); "
                        f"name a folder to write the {kind.name} into", given)


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
    _check_parent(resolved, given, kind)
    recover(resolved, kind)
    if not os.path.lexists(resolved):
        return resolved
    if not resolved.is_dir():
        raise DataError(f"the output path exists and is not a folder; refusing to replace it with a {kind.name}", given)
    if not any(resolved.iterdir()):
        return resolved  # an empty folder: nothing to lose (an empty mount point is filled in place)
    if not _owned(resolved, kind):
        raise DataError(f"the output folder exists and is not a {kind.name} written by unisrec-x "
                        f"(no {kind.manifest} of format {kind.format!r}, or it holds other files or folders); "
                        "refusing to replace it: name a new folder", given)
    if not overwrite:
        raise DataError(f"a {kind.name} already exists here; pass --overwrite (overwrite=True) to replace it", given)
    if _mount_point(resolved):
        raise DataError(f"the output folder is a mount point: it cannot be swapped atomically, only filled when "
                        f"empty; empty it or name a new folder for the {kind.name}", given)
    return resolved


# --- the swap -----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_ASIDE = re.compile(r"^\.(?P<name>.+)\.(?P<what>old|tmp)-(?P<pid>\d+)$")
#: a rename that failed because something is at the target (a file, a non-empty folder; Windows: anything)
_OCCUPIED = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


def _renameat2():
    """``renameat2`` of the C library (glibc 2.28+), or ``None``: off Linux ``CDLL(None)`` is no C
    library (Windows raises TypeError), and musl or an old glibc lacks the symbol."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


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


def _alive_windows(pid: int) -> bool:
    """``os.kill(pid, 0)`` would terminate the process on Windows: ask for its exit code instead.
    Anything unexpected counts as alive, so a leftover is kept rather than a live writer's folder deleted."""
    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = ctypes.c_ulong()
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    except Exception:
        return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process; a number no process has (a user's name)
        return True
    return True


def recover(directory: Path, kind: OutputKind) -> None:
    """Undo what a killed writer left beside ``directory`` (or inside it, for a mount point filled in
    place): put an old folder back where the path is missing, and drop finished leftovers
    (temporary folders, old folders already replaced).

    Only a real folder that holds nothing but ``kind``'s regular files is touched (an old folder must
    also carry its manifest), so a folder of the user's that happens to match the naming is never
    moved or deleted.
    """
    places = [directory.parent] + ([directory] if _real_dir(directory) else [])
    for place in places:
        if not place.is_dir():
            continue
        for entry in sorted(place.iterdir()):
            found = _ASIDE.match(entry.name)
            if (not found or found["name"] != directory.name or (place == directory and found["what"] != "tmp")
                    or _alive(int(found["pid"]))):
                continue
            entries = _entries(entry)
            if entries is None:
                continue
            ours = _owned(entry, kind) if found["what"] == "old" else _only_our_files(entries, kind.files)
            if not ours:
                continue
            if found["what"] == "old" and not os.path.lexists(directory):
                entry.rename(directory)
                log.warning("%s: an interrupted write left the previous folder aside; it is back in place", directory)
            else:
                shutil.rmtree(entry, ignore_errors=True)


class _Stranded(DataError):
    """A user's folder could not be put back and sits at the temporary path: that must not be removed."""


@contextmanager
def atomic_directory(directory: str | Path, kind: OutputKind, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it takes ``directory``'s place in one step (an
    empty mount point, which cannot be renamed over, is filled in place).

    ``directory`` is checked first (``check_output_path``): nothing is written when it is refused.
    On an error inside the block the temporary folder (and any parent folder made for it) is removed
    and ``directory`` is untouched; an ``OSError`` (disk full, read-only) becomes a one-line DataError.
    """
    directory = check_output_path(directory, kind, overwrite)
    in_place = _mount_point(directory)  # checked empty above
    made = [p for p in directory.parents if not os.path.lexists(p)]
    tmp = (directory if in_place else directory.parent) / f".{directory.name}.tmp-{os.getpid()}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        _remove_made(made)
        raise _write_error(err, directory, kind, None) from None
    try:
        yield tmp
        unexpected = {p.name for p in tmp.iterdir()} - kind.files
        if unexpected:
            raise RuntimeError(f"{kind.name} writer produced unlisted files {sorted(unexpected)}")
        if in_place:
            _fill_in_place(tmp, directory, kind)
        else:
            _swap_in(tmp, directory, kind, overwrite)
    except BaseException as err:
        problem = _write_error(err, directory, kind, tmp) if isinstance(err, OSError) else None
        if not isinstance(err, _Stranded):
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_made(made)
        if problem is not None:
            raise problem from None
        raise


def _swap_in(tmp: Path, directory: Path, kind: OutputKind, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``directory``; whatever is there by now is checked once it is out of the way."""
    try:
        os.rename(tmp, directory)  # never over a file or a non-empty folder: what appeared since the check stays
        return
    except OSError as err:
        if err.errno not in _OCCUPIED:
            raise
    if exchange(tmp, directory):
        aside = tmp
    else:
        aside = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.rename(directory, aside)
    if not _replaceable(aside, kind, overwrite):
        _put_back(aside, tmp, directory)
        raise DataError(f"something that is not a {kind.name} to replace appeared at the output path while it was "
                        f"written{'' if overwrite else ' (without --overwrite)'}; it is left as it is, nothing was "
                        "written: name a new folder", directory)
    if aside != tmp:
        _replace_step(tmp, directory)
    shutil.rmtree(aside, ignore_errors=True)


def _put_back(aside: Path, tmp: Path, directory: Path) -> None:
    """Return a swapped-out folder that is not ours to ``directory``; if that fails, say where it is."""
    try:
        if aside == tmp:
            if exchange(tmp, directory):
                return
        else:
            os.rename(aside, directory)
            return
    except OSError:
        pass
    raise _Stranded(f"the folder found at the output path while writing could not be put back: it is at {aside}; "
                    "move it back by hand", directory)


def _replace_step(tmp: Path, directory: Path) -> None:
    """The second rename of the fallback swap (a seam for the crash test)."""
    tmp.rename(directory)


def _fill_in_place(tmp: Path, directory: Path, kind: OutputKind) -> None:
    """Move the files of ``tmp`` (inside ``directory``, same file system) up into the empty mount point,
    the manifest last, never over a file that appeared meanwhile; on failure the ones moved are removed."""
    names = sorted(p.name for p in tmp.iterdir())
    names.sort(key=lambda name: name == kind.manifest)
    moved: list[Path] = []
    try:
        for name in names:
            target = directory / name
            try:
                os.link(tmp / name, target)  # fails where the name exists
                os.unlink(tmp / name)
            except OSError as err:
                if err.errno == errno.EEXIST:
                    raise DataError(f"{name} appeared in the output folder while the {kind.name} was written; "
                                    "nothing was written: name a new folder", directory) from None
                if os.path.lexists(target):
                    raise
                os.rename(tmp / name, target)  # a file system without hard links
            moved.append(target)
        tmp.rmdir()
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise


def _remove_made(made: list[Path]) -> None:
    """Remove the parent folders made for an output that failed (deepest first; only while empty)."""
    for path in made:
        try:
            path.rmdir()
        except OSError:
            return


def _write_error(err: OSError, directory: Path, kind: OutputKind, tmp: Path | None) -> DataError:
    """One line for an output that could not be written; measured before the temporary folder is removed."""
    if err.errno in (errno.EBUSY, errno.EXDEV):
        reason = "it is a mount point or lies on another file system than its folder, so it cannot be swapped in"
    else:
        reason = err.strerror or first_line(err)
        if err.errno is None and tmp is not None:  # numpy's short write: "N requested and M written"
            try:
                if shutil.disk_usage(tmp).free < 1 << 20:
                    reason = f"No space left on device ({reason})"
            except OSError:
                pass
    return DataError(f"cannot write the {kind.name}: {reason}; nothing was written", directory)
