"""Output folders: what a user made is never replaced; what this tool wrote is swapped atomically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unisrec_x.errors import DataError
from unisrec_x.runtime.outputs import OutputKind, atomic_directory, exchange, recover

KIND = OutputKind("test folder", "manifest.json", "unisrec-x-test",
                  frozenset({"manifest.json", "data.txt", "extra.bin"}),  # extra.bin: only where the manifest says so
                  expected=lambda manifest: {"manifest.json", "data.txt"} | ({"extra.bin"} if manifest.get("extra")
                                                                            else set()))
ROOT = Path(__file__).resolve().parents[2]


def write_ours(directory: Path, payload: str, overwrite: bool = False, extra: bool = False) -> None:
    with atomic_directory(directory, KIND, overwrite) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format": KIND.format, "extra": extra}))
        (tmp / "data.txt").write_text(payload)
        if extra:
            (tmp / "extra.bin").write_bytes(b"x")


def siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()} - {path.name}


def test_new_and_empty_folders_are_written(tmp_path):
    write_ours(tmp_path / "new" / "out", "a")
    assert (tmp_path / "new" / "out" / "data.txt").read_text() == "a"
    (tmp_path / "empty").mkdir()
    write_ours(tmp_path / "empty", "b")
    assert (tmp_path / "empty" / "data.txt").read_text() == "b"
    assert siblings(tmp_path / "empty") == {"new"}  # no temporary or old folders left


def test_a_users_folder_is_refused_and_untouched(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a test folder written by unisrec-x"):
            write_ours(keep, "x", overwrite)
    assert [p.name for p in keep.iterdir()] == ["f"] and (keep / "f").read_text() == "mine"
    assert siblings(keep) == set()


def test_our_folder_is_replaced_only_when_asked_and_only_if_it_holds_nothing_else(tmp_path):
    out = tmp_path / "out"
    write_ours(out, "v1")
    with pytest.raises(DataError, match="pass --overwrite"):
        write_ours(out, "v2")
    assert (out / "data.txt").read_text() == "v1"
    write_ours(out, "v2", overwrite=True)
    assert (out / "data.txt").read_text() == "v2" and siblings(out) == set()
    (out / "notes.txt").write_text("a user's notes")  # a user's file inside makes it theirs too
    with pytest.raises(DataError, match="holds other files"):
        write_ours(out, "v3", overwrite=True)
    assert (out / "notes.txt").read_text() == "a user's notes"


def test_current_folder_its_parents_root_and_empty_path_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "f").write_text("mine")
    monkeypatch.chdir(work)
    for out, message in [(".", "current folder"), ("", "empty"), (str(tmp_path / "a"), "current folder"),
                         ("..", "current folder"), ("/", "current folder|root")]:
        with pytest.raises(DataError, match=message):
            write_ours(Path(out) if out else out, "x", overwrite=True)
    assert (work / "f").read_text() == "mine" and {p.name for p in work.iterdir()} == {"f"}


def test_files_and_links_are_refused_not_hidden(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("a user's file")
    with pytest.raises(DataError, match="not a folder"):
        write_ours(target, "x", overwrite=True)
    assert target.read_text() == "a user's file" and siblings(target) == set()
    write_ours(tmp_path / "real", "v1")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(DataError, match="symbolic link"):
        write_ours(tmp_path / "link", "x", overwrite=True)


def test_an_error_while_writing_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    write_ours(out, "v1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out, KIND, overwrite=True) as tmp:
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "data.txt").read_text() == "v1" and siblings(out) == set()


def test_swap_is_one_exchange_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the fallback is tested below")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_killed_between_the_fallback_renames_the_old_model_comes_back(tmp_path):
    out = tmp_path / "out"
    write_ours(out, "v1")
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import unisrec_x.runtime.outputs as outputs
        from tests.runtime.test_outputs import write_ours
        outputs.exchange = lambda a, b: False          # the platform without renameat2
        outputs._replace_step = lambda tmp, d: os._exit(9)  # killed after the first rename
        write_ours(Path({str(out)!r}), "v2", overwrite=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert not out.exists()  # the moment of the crash: the old folder is aside, the new one not yet in
    assert any(name.startswith(".out.old-") for name in siblings(out))
    recover(out, KIND)  # what every later read (Recommender.from_checkpoint) or write of the path does first
    assert (out / "data.txt").read_text() == "v1" and siblings(out) == set()


def test_leftovers_of_a_finished_swap_are_dropped_but_a_live_writer_is_left_alone(tmp_path):
    out = tmp_path / "out"
    write_ours(out, "v1")
    dead = tmp_path / ".out.tmp-999999999"  # no such process
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a running process, maybe mid-write
    dead.mkdir(), live.mkdir()
    users = tmp_path / ".out.old-999999998"  # named like ours, but a user's folder: left alone
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    recover(out, KIND)
    assert not dead.exists() and live.exists() and (users / "thesis.tex").read_text() == "mine"


# --- portability: no renameat2, no os.kill liveness check -----------------------------------------

def _tiny_model():
    """A 3-item text model (8-dim text vectors), as test_model_dir.py builds it."""
    import torch

    from unisrec_x.model.unisrec import UniSRec
    from unisrec_x.serving.recommender import Recommender, TextSettings

    torch.manual_seed(0)
    net = UniSRec(num_items=3, plm_dim=8, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    features = torch.randn(4, 8)
    features[0] = 0
    return Recommender(net, ["a", "b", "c"], ["Alpha", "Beta", "Gamma"], features, TextSettings("enc"))


def test_without_renameat2_model_directories_are_still_written_and_replaced(tmp_path, monkeypatch):
    import ctypes

    from unisrec_x.runtime import outputs
    from unisrec_x.serving.recommender import Recommender

    real = ctypes.CDLL

    def windows_cdll(name, *args, **kwargs):  # ctypes.CDLL(None) on Windows
        if name is None:
            raise TypeError("LoadLibrary() argument 1 must be str, not None")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", windows_cdll)
    assert outputs._renameat2() is None
    monkeypatch.setattr(outputs, "_renameat2_fn", None)  # every swap takes the two-rename fallback
    assert outputs.exchange(tmp_path, tmp_path) is False
    model, out = _tiny_model(), tmp_path / "model"
    model.save(out)
    with pytest.raises(DataError, match="pass --overwrite"):
        model.save(out)
    model.item_texts[0] = "Alpha, renamed"  # something to tell the versions apart
    model.save(out, overwrite=True)
    assert Recommender.from_checkpoint(out).item_texts[0] == "Alpha, renamed"
    assert not [name for name in siblings(out) if ".tmp-" in name or ".old-" in name]  # (.model.lock: the journal's)


IMPORT_WITHOUT_RENAMEAT2 = textwrap.dedent("""
    import ctypes

    class WindowsCDLL(ctypes.CDLL):  # CDLL(None), the process's own symbols, is a TypeError on Windows
        def __init__(self, name, *args, **kwargs):
            if name is None:
                raise TypeError("LoadLibrary() argument 1 must be str, not None")
            super().__init__(name, *args, **kwargs)

    ctypes.CDLL = WindowsCDLL
    import unisrec_x.serving.model_dir, unisrec_x.serving.export
    from unisrec_x.runtime import outputs
    print(outputs._renameat2_fn)
""")


def test_the_serving_formats_import_where_the_c_library_cannot_be_opened():
    done = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_RENAMEAT2], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None"]


class _NoSuchProcessKernel32:
    """Stands in for Windows' kernel32: OpenProcess fails with ERROR_INVALID_PARAMETER (no such process)."""

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 (Windows' names)
        return 0


def test_on_windows_liveness_is_asked_of_the_system_never_by_a_signal(tmp_path, monkeypatch):
    """``os.kill(pid, 0)`` terminates the process on Windows; where the system cannot be asked, a
    leftover counts as a live writer's and is kept."""
    import ctypes

    def forbidden(pid, signal):
        raise AssertionError("os.kill on Windows would terminate the process")

    out = tmp_path / "out"
    write_ours(out, "v1")
    leftover = tmp_path / ".out.tmp-999999999"
    leftover.mkdir()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", forbidden)
    monkeypatch.delattr(ctypes, "WinDLL", raising=False)
    recover(out, KIND)
    assert leftover.exists()  # could not ask: kept
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error=False: _NoSuchProcessKernel32(), raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: 87, raising=False)
    recover(out, KIND)
    assert not leftover.exists() and (out / "data.txt").read_text() == "v1"


# --- what counts as ours -------------------------------------------------------------------------

def test_a_folder_or_link_bearing_one_of_our_names_is_the_users(tmp_path):
    """Names alone do not make a folder ours: every entry must be a regular file its manifest accounts for."""
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_text("a user's file")
    for make in (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")),  # a folder named like an optional file
                 lambda p: p.write_text("mine"),  # a file the manifest does not account for (no "extra")
                 lambda p: p.symlink_to(elsewhere)):  # a link
        write_ours(out, "v1")
        make(out / "extra.bin")
        with pytest.raises(DataError, match="holds other files or folders"):
            write_ours(out, "v2", overwrite=True)
        assert (out / "data.txt").read_text() == "v1" and os.path.lexists(out / "extra.bin")
        assert siblings(out) == {"elsewhere.bin"}
        shutil.rmtree(out)
    assert elsewhere.read_text() == "a user's file"
    write_ours(out, "v1", extra=True)  # a folder whose manifest records the optional file is ours
    write_ours(out, "v2", overwrite=True)
    assert (out / "data.txt").read_text() == "v2" and not (out / "extra.bin").exists()


# --- a folder that appears between the check and the swap ------------------------------------------

CREATOR = textwrap.dedent("""
    import glob, os, sys, time
    target, new_folder = sys.argv[1], sys.argv[2] == "new"
    pattern = os.path.join(glob.escape(os.path.dirname(target)), "." + glob.escape(os.path.basename(target)) + ".tmp-*")
    deadline = time.monotonic() + 60
    while not glob.glob(pattern):  # the writer has checked the path and is filling its temporary folder
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.0005)
    if new_folder:
        os.mkdir(target)
    with open(os.path.join(target, "thesis.tex"), "w") as f:
        f.write("mine")
""")


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
@pytest.mark.parametrize("case", ["a new folder, no --overwrite", "our folder, a file added, --overwrite"])
def test_a_folder_that_appears_while_writing_is_never_replaced(case, swap, tmp_path, monkeypatch):
    """A real process creates the user's file as soon as the temporary folder appears; the writer,
    past its check, must not swap it out and delete it."""
    from unisrec_x.runtime import outputs

    if swap == "two renames":
        monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    else:
        a, b = tmp_path / "probe-a", tmp_path / "probe-b"
        a.mkdir(), b.mkdir()
        if not exchange(a, b):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
        a.rmdir(), b.rmdir()
    target, new = tmp_path / "target", case.startswith("a new")
    if not new:
        write_ours(target, "v1")
    user = subprocess.Popen([sys.executable, "-c", CREATOR, str(target), "new" if new else "add"])
    try:
        with pytest.raises(DataError, match="appeared at the output path while it was written"):
            with atomic_directory(target, KIND, overwrite=not new) as tmp:
                (tmp / "manifest.json").write_text(json.dumps({"format": KIND.format}))
                (tmp / "data.txt").write_text("v2")
                deadline = time.monotonic() + 60
                while not (target / "thesis.tex").exists() and time.monotonic() < deadline:
                    time.sleep(0.001)
    finally:
        assert user.wait(60) == 0
    assert (target / "thesis.tex").read_text() == "mine"
    users = {"thesis.tex"} if new else {"thesis.tex", "manifest.json", "data.txt"}
    assert {p.name for p in target.iterdir()} == users
    assert new or (target / "data.txt").read_text() == "v1"
    assert siblings(target) == set()


# --- outputs that cannot be written ----------------------------------------------------------------

@pytest.mark.parametrize("out, message", [("/dev/full/x", "is not a folder"), ("/dev/full/x/y", "is not a folder"),
                                          ("/proc/self/x", "cannot write in")])
def test_unwritable_outputs_are_refused_in_one_line(out, message):
    if not os.path.exists(out.split("/x")[0]):
        pytest.skip(f"no {out.split('/x')[0]} here")
    with pytest.raises(DataError, match=message) as err:
        write_ours(Path(out), "x")
    assert len(str(err.value).splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    import numpy as np

    from tests.runtime.tmpfs import fill, tmpfs

    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk, leave=64 << 10)
        out = disk / "new" / "parents" / "out"
        for write in ("text", "numpy"):
            with pytest.raises(DataError, match="No space left on device") as err:
                with atomic_directory(out, KIND) as tmp:
                    (tmp / "manifest.json").write_text(json.dumps({"format": KIND.format}))
                    if write == "text":
                        (tmp / "data.txt").write_text("x" * (256 << 10))
                    else:
                        np.save(tmp / "data.txt", np.zeros(256 << 10, np.uint8), allow_pickle=False)
            assert str(err.value).startswith(str(out)) and len(str(err.value).splitlines()) == 1
            assert {p.name for p in disk.iterdir()} == {"filler"}  # no temporary folder, no parents made for it


def test_an_empty_mount_point_is_filled_in_place(tmp_path):
    from tests.runtime.tmpfs import tmpfs

    with tmpfs(tmp_path / "mnt", "64k") as mount:
        write_ours(mount, "v1")
        assert {p.name for p in mount.iterdir()} == {"manifest.json", "data.txt"} and siblings(mount) == set()
        with pytest.raises(DataError, match="mount point"):  # no atomic swap possible: refused, left as it is
            write_ours(mount, "v2", overwrite=True)
        assert (mount / "data.txt").read_text() == "v1" and siblings(mount) == set()
        for path in mount.iterdir():
            path.unlink()
        with pytest.raises(DataError, match="No space left on device"):  # too small for it: emptied again
            write_ours(mount, "x" * (128 << 10))
        assert list(mount.iterdir()) == [] and siblings(mount) == set()


def test_a_killed_in_place_fill_leaves_nothing_the_next_write_trips_over(tmp_path):
    """A writer killed while filling a mount point in place leaves its temporary folder inside it."""
    out = tmp_path / "out"  # stands for the mount point: the leftover lies inside, not beside it
    (out / ".out.tmp-999999999").mkdir(parents=True)
    (out / ".out.tmp-999999999" / "data.txt").write_text("half")
    write_ours(out, "v1")
    assert {p.name for p in out.iterdir()} == {"manifest.json", "data.txt"} and siblings(out) == set()
