"""Output folders: what a user made is never replaced; what this tool wrote is swapped atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unisrec_x.errors import DataError
from unisrec_x.runtime.outputs import OutputKind, atomic_directory, exchange, recover

KIND = OutputKind("test folder", "manifest.json", "unisrec-x-test", frozenset({"manifest.json", "data.txt"}))
ROOT = Path(__file__).resolve().parents[2]


def write_ours(directory: Path, payload: str, overwrite: bool = False) -> None:
    with atomic_directory(directory, KIND, overwrite) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format": KIND.format}))
        (tmp / "data.txt").write_text(payload)


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
        from tests.test_outputs import write_ours
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
