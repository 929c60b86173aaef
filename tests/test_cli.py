"""The CLI on a real slice of Scientific: every shipped config runs, a short fit writes its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unisrec_x.cli import main

CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs" / "scientific").glob("*.yaml"))
SLICE = ["--data.max_users", "150", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def slice_env(real_root, shared_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("UNISREC_X_CACHE", str(shared_cache))
    monkeypatch.setenv("UNISREC_X_DATA_ROOT", str(real_root))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).stem)
def test_each_config_fast_dev_run(slice_env, config):
    main(["fit", "-c", config, *SLICE, "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])


def test_short_fit_writes_test_metrics_of_best_checkpoint(slice_env):
    config = next(c for c in CONFIGS if c.endswith("unisrec_transductive.yaml"))
    main(["fit", "-c", config, *SLICE, "--trainer.max_epochs", "3",
          "--trainer.logger.init_args.save_dir", str(slice_env / "runs")])
    out = json.loads(next((slice_env / "runs").rglob("test_metrics.json")).read_text())
    assert out["checkpoint"].endswith(".ckpt") and "best" in Path(out["checkpoint"]).name
    assert set(out["metrics"]) >= {"recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr@10", "hit@10"}
    assert 0.0 <= out["metrics"]["ndcg@10"] <= out["metrics"]["recall@10"] <= out["metrics"]["recall@50"] <= 1.0
    assert out["metrics"]["recall@50"] > 0  # 3 epochs on 150 real users ranks some targets in the top 50


def test_missing_dataset_exits_with_a_clear_message(slice_env, caplog):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", CONFIGS[0], "--data.dataset", "scientific/Nope", "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    assert "no interactions: neither Nope.train.inter nor Nope.inter exists" in caplog.text


def test_sampled_softmax_trains_from_the_cli(slice_env):
    config = next(c for c in CONFIGS if c.endswith("unisrec_transductive.yaml"))
    main(["fit", "-c", config, *SLICE, "--model.init_args.loss", "sampled", "--model.init_args.num_negatives", "64",
          "--model.init_args.negative_sampling", "popularity", "--trainer.fast_dev_run", "2", "--trainer.logger", "false"])
