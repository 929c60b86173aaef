"""Pretraining on real source slices: CLI run, resumable checkpoint, zero-shot on unseen items, DDP."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from unisrec_x.cli import main

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "configs" / "pretrain" / "pretrain.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def pretrained(real_root, tmp_path_factory, tiny_encoder) -> Path:
    """A few pretraining steps on 150 users of each default source domain (Games, Toys)."""
    work = tmp_path_factory.mktemp("pretrain")
    os.environ["UNISREC_X_CACHE"] = str(work / "cache")
    try:
        main(["fit", "-c", PRETRAIN, *QUIET, "--data.max_users", "150", "--data.batch_size", "128",
              "--data.text_encoder", tiny_encoder, "--data.data_root", str(real_root), "--trainer.max_steps", "6",
              "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
              "--trainer.logger.init_args.save_dir", str(work / "runs")])
    finally:
        del os.environ["UNISREC_X_CACHE"]
    return next((work / "runs").rglob("last.ckpt"))


def test_pretraining_writes_a_safe_resumable_checkpoint(pretrained):
    ckpt = torch.load(pretrained, weights_only=True)
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("net.item_embedding") for k in ckpt["state_dict"])
    assert {"optimizer_states", "loops"} <= set(ckpt)
    metrics = (pretrained.parents[1] / "metrics.csv").read_text()
    assert "train/seq_item" in metrics and "train/seq_seq" in metrics and "val/ndcg@10" in metrics


def test_zero_shot_on_items_never_seen_in_pretraining(pretrained, real_root, tiny_encoder, tmp_path):
    args = ["test", "-c", str(REPO / "configs" / "transfer" / "zero_shot.yaml"), *QUIET, "--data.max_users", "150",
            "--data.text_encoder", tiny_encoder,
            "--data.data_root", str(real_root), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    main([*args, "--model.init_args.pretrained", str(pretrained)])
    zero_shot = json.loads(next((tmp_path / "runs").rglob("test_metrics.json")).read_text())["metrics"]
    assert 0 <= zero_shot["ndcg@10"] <= zero_shot["recall@10"] <= zero_shot["recall@50"] <= 1
    # the same command without pretraining gives other numbers: the pretrained weights were used
    main([*args, "--model.init_args.pretrained", "null", "--trainer.logger.init_args.name", "untrained"])
    untrained = json.loads(next((tmp_path / "runs" / "untrained").rglob("test_metrics.json")).read_text())["metrics"]
    assert zero_shot != untrained


def test_zero_shot_carries_the_floor_chosen_on_the_sources_validation(pretrained, real_root, tiny_encoder, tmp_path):
    """--floor_blend_on: the weight and decay are chosen on the sources' validation rows (no target labels, no
    counts), recorded, and the target is tested with them; refused without floor_blend or with a fit's checkpoint."""
    from unisrec_x.data.datamodule import SeqRecDataModule
    from unisrec_x.evaluation.baselines import floor_grid

    args = ["test", "-c", str(REPO / "configs" / "transfer" / "zero_shot.yaml"), *QUIET, "--data.max_users", "150",
            "--data.text_encoder", tiny_encoder, "--data.data_root", str(real_root), "--model.init_args.pretrained",
            str(pretrained), "--floor_blend_on", "[games,toys]", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    main([*args, "--model.init_args.net.init_args.floor_blend", "true", "--trainer.logger.init_args.name", "blend"])
    record = json.loads(next((tmp_path / "blend").rglob("test_metrics.json")).read_text())
    choice = record["floor_blend"]
    assert choice["beta"] == 0 and choice["chosen_on"] == "validation rows of ['games', 'toys']"
    scores = choice["validation_ndcg@10"]
    assert scores["blend"] == max(scores["weights"].values()) == scores["weights"][str(choice["weight"])]
    sources = SeqRecDataModule(["games", "toys"], data_root=str(real_root), max_users=150, text_encoder=tiny_encoder)
    knobs, grid = floor_grid(sources.item_features, None, list(sources.val_dataloader()))
    assert choice["decay"] == knobs.decay and scores["floor"] == pytest.approx(grid[tuple(knobs)], abs=1e-6)
    # the test ranked with the choice: the same model tested alone scores the same only if the choice was "alone"
    plain = [a for a in args if a not in ("--floor_blend_on", "[games,toys]")]
    main([*plain, "--trainer.logger.init_args.name", "alone"])
    alone = json.loads(next((tmp_path / "alone").rglob("test_metrics.json")).read_text())["metrics"]
    assert (record["metrics"] == alone) == (choice["weight"] == 0)
    for refused_args in (args, [*args, "--model.init_args.net.init_args.floor_blend", "true", "--ckpt_path",
                                str(pretrained)]):
        with pytest.raises(SystemExit) as refused:
            main(refused_args)
        assert refused.value.code == 2


def test_ddp_two_processes_see_different_batches_and_end_identical(real_root, tiny_encoder, tmp_path):
    env = {**os.environ, "DDP_PROBE_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "UNISREC_X_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unisrec_x.cli", "fit", "-c", PRETRAIN, *QUIET, "--data.max_users", "60",
           "--data.dataset", "[office]", "--data.batch_size", "64", "--data.data_root", str(real_root), "--data.text_encoder", tiny_encoder,
           "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2", "--trainer.logger", "false",
           "--trainer.callbacks+=tests.ddp_probe.BatchProbe",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["targets"]) == len(ranks[1]["targets"]) >= 2
    assert ranks[0]["targets"] != ranks[1]["targets"]
    torch.testing.assert_close(torch.tensor(ranks[0]["weights"]), torch.tensor(ranks[1]["weights"]))
    # one epoch trains every training target (an odd batch count once dropped a batch per epoch)
    seen = Counter(t for r in ranks for batch in r["targets"] for t in torch.tensor(batch).flatten().tolist() if t)
    expected = Counter(ranks[0]["train_targets"])
    assert not expected - seen
    assert seen.total() > expected.total()  # this epoch's 5 batches do not split evenly: one was repeated


def test_position_wise_pretraining_on_long_histories(real_root, tiny_encoder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the saved config.yaml goes to ./runs
    caplog.set_level(logging.INFO, logger="unisrec_x.data.datamodule")
    main(["fit", "-c", PRETRAIN, *QUIET, "--data.max_users", "40", "--data.dataset", "[office, ml-100k]",
          "--data.batch_size", "256", "--data.training_examples", "positions", "--data.text_encoder", tiny_encoder,
          "--data.data_root", str(real_root), "--trainer.fast_dev_run", "2", "--trainer.logger", "false"])
    windows, targets = map(int, re.search(r"train: (\d+) windows hold (\d+) targets", caplog.text).groups())
    assert targets > 10 * windows  # ML-100k users have ~100 items: one pass trains dozens of targets
