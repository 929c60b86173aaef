"""`unisrec-x recommend | add-items | export` on the held-out real model."""

from __future__ import annotations

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
        "item_vectors.npy", "item_ids.txt", "query_encoder.pt", "manifest.json"}
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
