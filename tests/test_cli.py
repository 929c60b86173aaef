"""The CLI on a real slice of Scientific: every shipped config runs, a short fit writes its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    # the long-tail slice: test rows whose target is a training target at most 5 times
    from unisrec_x.data.datamodule import SeqRecDataModule

    data = SeqRecDataModule("scientific/Scientific", max_users=150)
    counts = torch.bincount(data.examples("train").targets, minlength=data.num_items + 1)
    rare = int((counts[data.examples("test").targets] <= 5).sum())
    assert 0 < rare < len(data.examples("test").targets)
    assert out["metrics"]["long_tail/rows"] == rare
    assert 0.0 <= out["metrics"]["long_tail/ndcg@10"] <= out["metrics"]["long_tail/recall@10"] <= 1.0


@pytest.mark.parametrize("lr, kept", [(30.0, "initial.ckpt"), (1e-3, "best")])
def test_select_initial_tests_the_starting_weights_only_when_no_epoch_beats_them(slice_env, lr, kept):
    """An absurd learning rate wrecks the untrained text model (which ranks like text-kNN); a sane one improves it."""
    config = next(c for c in CONFIGS if c.endswith("unisrec_inductive.yaml"))
    runs = slice_env / f"runs-{lr}"
    main(["fit", "-c", config, *SLICE, "--data.max_users", "300", "--trainer.max_epochs", "2", "--select_initial", "true",
          "--optimizer.init_args.lr", str(lr), "--trainer.logger.init_args.save_dir", str(runs)])
    out = json.loads(next(runs.rglob("test_metrics.json")).read_text())
    assert kept in Path(out["checkpoint"]).name
    initial = next(runs.rglob("initial.ckpt"))
    assert torch.load(initial, weights_only=True)["global_step"] == 0  # the weights before any step


def test_missing_dataset_exits_with_a_clear_message(slice_env, caplog):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", CONFIGS[0], "--data.dataset", "scientific/Nope", "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    assert "no interactions: neither Nope.train.inter nor Nope.inter exists" in caplog.text


def test_sampled_softmax_trains_from_the_cli(slice_env):
    config = next(c for c in CONFIGS if c.endswith("unisrec_transductive.yaml"))
    main(["fit", "-c", config, *SLICE, "--model.init_args.loss", "sampled", "--model.init_args.num_negatives", "64",
          "--model.init_args.negative_sampling", "popularity", "--trainer.fast_dev_run", "2", "--trainer.logger", "false"])


def _own_dataset(real_root: Path, folder: Path, blank_titles: int) -> None:
    """A user's own plain files: the first 150 Scientific users, 7 items with a blank title."""
    from unisrec_x.data.atomic import read_atomic, write_atomic
    from unisrec_x.data.text import read_text_file

    test = read_atomic(real_root / "scientific" / "Scientific.test.inter")
    rows, items = [], []
    for user, history, target in list(zip(*(test.column(f) for f in test.fields)))[:150]:
        for position, item in enumerate([*history.split(), target]):
            rows.append((user, item, str(position)))
            items.append(item)
    write_atomic(folder / "Mine.inter", [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")], rows)
    prefix = real_root / "scientific" / "Scientific"
    texts = read_text_file(f"{prefix}.text", f"{prefix}.item2index")
    catalog = sorted(set(items), key=int)
    write_atomic(folder / "Mine.item", [("item_id", "token"), ("title", "token_seq")],
                 [(item, "" if i < blank_titles else texts[item]) for i, item in enumerate(catalog)])


def test_id_only_model_needs_no_item_text(real_root, slice_env, isolated_cache, monkeypatch, caplog):
    mine = slice_env / "mine"
    _own_dataset(real_root, mine, blank_titles=7)
    own = ["--data.data_root", str(mine), "--data.dataset", "Mine", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    sasrec = next(c for c in CONFIGS if c.endswith("sasrec.yaml"))
    monkeypatch.setenv("UNISREC_X_CACHE", str(isolated_cache))
    main(["fit", "-c", sasrec, *own, "--trainer.fast_dev_run", "1"])
    assert not any(isolated_cache.rglob("*.npy"))  # no text was encoded
    (mine / "Mine.item").unlink()  # and none has to exist
    main(["fit", "-c", sasrec, *own, "--trainer.fast_dev_run", "1"])
    _own_dataset(real_root, mine, blank_titles=7)
    inductive = next(c for c in CONFIGS if c.endswith("unisrec_inductive.yaml"))
    with pytest.raises(SystemExit) as exit_info:  # a text model still refuses items without text
        main(["fit", "-c", inductive, *own, "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2 and "has no text (7 items in all" in caplog.text


@pytest.mark.parametrize("scheme", ["positions", "prefixes"])
def test_each_training_scheme_from_the_cli(slice_env, scheme):
    config = next(c for c in CONFIGS if c.endswith("unisrec_transductive.yaml"))
    main(["fit", "-c", config, *SLICE, "--data.training_examples", scheme, "--data.batch_size", "256",
          "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
          "--trainer.logger.init_args.save_dir", str(slice_env / "runs")])
    metrics = next((slice_env / "runs").rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/ndcg@10" in metrics
    out = json.loads(next((slice_env / "runs").rglob("test_metrics.json")).read_text())
    assert 0.0 <= out["metrics"]["ndcg@10"] <= out["metrics"]["recall@10"] <= 1.0
    assert f"training_examples: {scheme}" in next((slice_env / "runs").rglob("config.yaml")).read_text()


@pytest.mark.parametrize("words", [[], ["experiment", "transfer"], ["experiment", "schemes"], ["prepare"], ["recommend"],
                                   ["add-items"], ["export"], ["serve"]], ids=lambda w: "-".join(w) or "fit")
def test_every_command_prints_its_help(words, capsys):
    """Help text goes through %-formatting: a literal "5%" in one crashed `experiment transfer --help`."""
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out
    if not words:  # the top level names the commands LightningCLI does not know about
        assert all(name in out for name in ("experiment", "prepare", "serve"))


def test_patience_sets_early_stopping_and_must_be_positive(slice_env):
    """A learning rate of 0 never improves on the first validation: patience p stops after 1 + p epochs."""
    config = next(c for c in CONFIGS if c.endswith("unisrec_inductive.yaml"))
    runs = slice_env / "runs"
    main(["fit", "-c", config, *SLICE, "--trainer.max_epochs", "10", "--patience", "2", "--optimizer.init_args.lr", "0",
          "--trainer.logger.init_args.save_dir", str(runs)])
    assert json.loads(next(runs.rglob("test_metrics.json")).read_text())["epochs_trained"] == 3
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, *SLICE, "--patience", "0", "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])


def test_a_resumed_run_keeps_the_patience_it_is_given():
    from lightning.pytorch.callbacks import EarlyStopping

    from unisrec_x.cli import FlagPatience

    saved = EarlyStopping(monitor="val/ndcg@10", mode="max", patience=10).state_dict()
    resumed = FlagPatience(monitor="val/ndcg@10", mode="max", patience=40)
    resumed.load_state_dict({**saved, "wait_count": 7})
    assert resumed.patience == 40 and resumed.wait_count == 7
