"""`unisrec-x recommend | add-items | export` on the held-out real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serving.conftest import HELD_OUT, SAME_FILAMENT
from unisrec_x.cli import main
from unisrec_x.data.atomic import write_atomic
from unisrec_x.serving.recommender import Recommender


def run(words: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(words)
    return done.value.code


@pytest.fixture
def ckpt_args(held_out_checkpoint, real_root, shared_cache, monkeypatch) -> list[str]:
    monkeypatch.setenv("UNISREC_X_CACHE", str(shared_cache))
    return ["--ckpt", str(held_out_checkpoint), "--data_root", str(real_root)]


def test_recommend_prints_a_ranked_table(ckpt_args, capsys):
    assert run(["recommend", *ckpt_args, "--history", " ".join(SAME_FILAMENT), "-k", "4", "--exclude_seen"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "item", "alias", "score", "text"]  # Scientific's ids have ASIN aliases
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    assert all(line.split()[2].startswith("B") for line in lines[1:])
    assert not {line.split()[1] for line in lines[1:]} & set(SAME_FILAMENT)


def test_unknown_history_item_exits_2_naming_it(ckpt_args, capsys):
    assert run(["recommend", *ckpt_args, "--history", f"2 {HELD_OUT}"]) == 2
    assert f"unknown item(s): {HELD_OUT}" in capsys.readouterr().err


def test_add_items_writes_a_model_directory_that_ranks_the_new_item(ckpt_args, held_out_text, tmp_path, capsys):
    items = tmp_path / "new.item"
    write_atomic(items, [("item_id", "token"), ("title", "token_seq")], [(HELD_OUT, held_out_text)])
    assert run(["add-items", *ckpt_args, "--items", str(items), "--out", str(tmp_path / "model")]) == 0
    assert "added 1 items" in capsys.readouterr().out
    model = Recommender.from_checkpoint(tmp_path / "model")
    assert HELD_OUT in [r.item for r in model.recommend([SAME_FILAMENT], k=5, exclude_seen=True)[0]]  # of 4,386
    # the new directory serves the CLI too, with no data root involved
    assert run(["recommend", "--ckpt", str(tmp_path / "model"), "--history", HELD_OUT, "-k", "2"]) == 0


def test_add_items_with_a_malformed_file_names_it(ckpt_args, tmp_path, capsys):
    items = tmp_path / "bad.item"
    items.write_text("item_id:token\ttitle:token_seq\nX1\n")
    assert run(["add-items", *ckpt_args, "--items", str(items), "--out", str(tmp_path / "model")]) == 2
    assert "bad.item:2" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_export_and_missing_checkpoint(ckpt_args, tmp_path, capsys):
    assert run(["export", *ckpt_args, "--out", str(tmp_path / "export")]) == 0
    assert {p.name for p in (tmp_path / "export").iterdir()} == {
        "item_vectors.npy", "item_ids.json", "item_ids.txt", "query_encoder.pt", "manifest.json"}
    assert run(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "none.ckpt" in capsys.readouterr().err


def test_out_never_replaces_what_the_user_made(ckpt_args, held_out_text, tmp_path, monkeypatch, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("a")
    a_file = tmp_path / "model.bin"
    a_file.write_text("b")
    items = tmp_path / "new.item"
    write_atomic(items, [("item_id", "token"), ("title", "token_seq")], [(HELD_OUT, held_out_text)])
    monkeypatch.chdir(tmp_path)
    for command in (["export"], ["add-items", "--items", str(items)]):
        for out in (str(keep), ".", "", str(tmp_path.parent), "/", str(a_file)):
            assert run([*command, *ckpt_args, "--out", out, "--overwrite"]) == 2, (command, out)
            assert capsys.readouterr().err.startswith("error: ")
    assert (keep / "f").read_text() == "a" and a_file.read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "model.bin", "new.item"]
    # an export this tool wrote is replaced only when asked
    assert run(["export", *ckpt_args, "--out", "export"]) == 0
    assert run(["export", *ckpt_args, "--out", "export"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert run(["export", *ckpt_args, "--out", "export", "--overwrite"]) == 0
    # and a model directory is not an export (nor the other way round)
    assert run(["add-items", *ckpt_args, "--items", str(items), "--out", "export", "--overwrite"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "keep", "model.bin", "new.item"]


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_encoder):
    """A 2,000-item inductive model directory (32-dim text vectors of the tiny encoder): no training, no codes."""
    import torch

    from unisrec_x.items.encoder import TextEncoder
    from unisrec_x.model.unisrec import UniSRec
    from unisrec_x.serving.recommender import TextSettings

    torch.manual_seed(0)
    net = UniSRec(num_items=2000, plm_dim=32, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2)
    texts = [f"Item {k}" for k in range(2000)]
    features = torch.cat([torch.zeros(1, 32), torch.from_numpy(TextEncoder(tiny_encoder).encode(texts))])
    rec = Recommender(net, [f"i{k}" for k in range(2000)], texts, features, TextSettings(tiny_encoder))
    return rec.save(tmp_path / "tiny-model")


@pytest.fixture
def new_items(tmp_path):
    path = tmp_path / "new.item"
    write_atomic(path, [("item_id", "token"), ("text", "token_seq")], [("NEW-1", "a new thing")])
    return path


def one_error_line(capsys) -> str:
    """The one line of the error (the tiny encoder's loading bar, from transformers, aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_overwrite_never_deletes_a_users_folder_named_like_a_model_file(tiny_model_dir, new_items, tmp_path, capsys):
    """An inductive model directory never holds quantizer.faiss; a folder of that name in it is the user's."""
    out = tmp_path / "out"
    add = ["add-items", "--ckpt", str(tiny_model_dir), "--items", str(new_items), "--out", str(out)]
    assert run(add) == 0
    (out / "quantizer.faiss").mkdir()
    (out / "quantizer.faiss" / "notes.txt").write_text("notes")
    capsys.readouterr()
    assert run([*add, "--overwrite"]) == 2
    assert "holds other files or folders" in one_error_line(capsys)
    assert (out / "quantizer.faiss" / "notes.txt").read_text() == "notes"


@pytest.mark.parametrize("out", ["/dev/full/x", "/proc/self/x"])
def test_unwritable_out_is_one_line_and_exit_2(out, tiny_model_dir, new_items, capsys):
    if not Path(out).parent.exists():
        pytest.skip(f"no {Path(out).parent} here")
    for command in (["export"], ["add-items", "--items", str(new_items)]):
        assert run([*command, "--ckpt", str(tiny_model_dir), "--out", out]) == 2, command
        one_error_line(capsys)


def _pages(size: int) -> int:
    return -(-size // 4096) * 4096


@pytest.mark.parametrize("command", ["add-items", "export"])
def test_a_disk_that_fills_during_the_numpy_save_is_one_line_and_leaves_nothing(command, tiny_model_dir, new_items,
                                                                                tmp_path, capsys):
    from tests.runtime.tmpfs import fill, tmpfs

    words = [command, "--ckpt", str(tiny_model_dir)] + (["--items", str(new_items)] if command == "add-items" else [])
    assert run([*words, "--out", str(tmp_path / "reference")]) == 0  # the sizes of what it writes
    sizes = {p.name: _pages(p.stat().st_size) for p in (tmp_path / "reference").iterdir()}
    big = "item_features.npy" if command == "add-items" else "item_vectors.npy"
    before = {"add-items": ["model.json", "weights.pt", "items.item"], "export": []}[command]  # written before it
    with tmpfs(tmp_path / "disk", "2m") as disk:
        fill(disk, leave=sum(sizes[name] for name in before) + sizes[big] // 2)
        capsys.readouterr()
        assert run([*words, "--out", str(disk / "models" / "out")]) == 2
        assert "No space left on device" in one_error_line(capsys)
        assert left_behind(disk) == []


def left_behind(folder: Path) -> list[str]:
    """Files under ``folder`` other than the filler and the journal's lock files (``.<model>.lock``, kept by design)."""
    return [str(p) for p in folder.rglob("*") if p.name != "filler" and not p.name.endswith(".lock") and not p.is_dir()
            ] + [str(p) for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_an_empty_mount_point_as_out_is_filled_in_place(tiny_model_dir, new_items, tmp_path):
    from tests.runtime.tmpfs import tmpfs

    with tmpfs(tmp_path / "mnt", "2m") as mount:
        assert run(["add-items", "--ckpt", str(tiny_model_dir), "--items", str(new_items), "--out", str(mount)]) == 0
        assert Recommender.from_checkpoint(mount).num_items == 2001
        assert not [p for p in mount.iterdir() if p.name.startswith(".")]  # no temporary folder inside
        assert not [p for p in mount.parent.iterdir() if ".tmp-" in p.name]  # ... nor beside it


def test_overwrite_refuses_a_model_file_its_manifest_does_not_account_for(tiny_model_dir, new_items, tmp_path, capsys):
    """A regular file named quantizer.faiss in an inductive model directory (no codes) is not one unisrec-x wrote."""
    out = tmp_path / "out"
    add = ["add-items", "--ckpt", str(tiny_model_dir), "--items", str(new_items), "--out", str(out)]
    assert run(add) == 0
    (out / "quantizer.faiss").write_text("a user's notes")
    capsys.readouterr()
    assert run([*add, "--overwrite"]) == 2
    assert "holds other files or folders" in one_error_line(capsys)
    assert (out / "quantizer.faiss").read_text() == "a user's notes"


def test_a_disk_that_fills_during_the_torchscript_save_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    """torch's TorchScript writer aborts the process (SIGABRT, thrown from a destructor) when a write to
    its file fails, so the export saves it to a buffer first; the CLI runs in a subprocess here so that an
    abort fails this test instead of ending pytest."""
    import subprocess
    import sys

    from tests.runtime.tmpfs import fill, tmpfs

    assert run(["export", "--ckpt", str(tiny_model_dir), "--out", str(tmp_path / "reference")]) == 0
    sizes = {p.name: _pages(p.stat().st_size) for p in (tmp_path / "reference").iterdir()}
    before = [name for name in ("item_vectors.npy", "item_ids.json", "item_ids.txt") if name in sizes]  # written before it
    with tmpfs(tmp_path / "disk", "2m") as disk:
        fill(disk, leave=sum(sizes[name] for name in before) + sizes["query_encoder.pt"] // 2)
        done = subprocess.run([sys.executable, "-c", "import sys; from unisrec_x.cli import main; main(sys.argv[1:])",
                               "export", "--ckpt", str(tiny_model_dir), "--out", str(disk / "out")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in done.stderr
        assert left_behind(disk) == []
