"""The CLI on a real slice of Scientific: every shipped config runs, a short fit writes its metrics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from unisrec_x import cli as cli_module
from unisrec_x.cli import main

CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs" / "scientific").glob("*.yaml"))
SLICE = ["--data.max_users", "150", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def slice_env(real_root, shared_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("UNISREC_X_CACHE", str(shared_cache))
    monkeypatch.setenv("UNISREC_X_DATA_ROOT", str(real_root))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def built(monkeypatch):
    """The ``UniSRecCLI`` objects ``main`` builds, so a test can check the model, trainer and metrics it ran with."""
    made = []

    class Recorded(cli_module.UniSRecCLI):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli_module, "UniSRecCLI", Recorded)
    return made


def assert_one_checked_step(cli) -> None:
    """fast_dev_run 1: one optimizer step with a finite positive loss, one validation batch with metrics in range."""
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.global_step == 1
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert 0.0 <= metrics["val/ndcg@10"] <= metrics["val/recall@10"] <= metrics["val/recall@50"] <= 1.0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).stem)
def test_each_config_fast_dev_run(slice_env, built, config):
    main(["fit", "-c", config, *SLICE, "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])
    (cli,) = built
    assert_one_checked_step(cli)
    net = cli.model.net  # the network the YAML describes, sized from the data
    for key, value in yaml.safe_load(Path(config).read_text())["model"]["init_args"]["net"]["init_args"].items():
        assert getattr(net, key) == value, key
    assert net.num_items == cli.datamodule.num_items < 4385  # the 150-user slice's catalog, not all of Scientific's
    if net.use_codes:
        assert net.item_codes.shape == (net.num_items + 1, net.code_digits + 1)


def test_a_config_naming_the_old_lit_class_path_still_fits(slice_env, built, tmp_path):
    """Configs written before the layout of issue 27 name ``unisrec_x.lit.module.SeqRecModule``."""
    from unisrec_x.training.module import SeqRecModule

    config = next(c for c in CONFIGS if c.endswith("unisrec_inductive.yaml"))
    text = Path(config).read_text()
    assert "unisrec_x.training.module.SeqRecModule" in text
    old = tmp_path / "old_layout.yaml"
    old.write_text(text.replace("unisrec_x.training.module.SeqRecModule", "unisrec_x.lit.module.SeqRecModule"))
    main(["fit", "-c", str(old), *SLICE, "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])
    (cli,) = built
    assert type(cli.model) is SeqRecModule and cli.model.net.use_text and not cli.model.net.use_item_id
    assert_one_checked_step(cli)


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


def test_sampled_softmax_trains_from_the_cli(slice_env, built, monkeypatch):
    from unisrec_x.training.module import SeqRecModule

    paths = []
    loss_path = SeqRecModule.loss_path
    monkeypatch.setattr(SeqRecModule, "loss_path", lambda self, batch: paths.append(loss_path(self, batch)) or paths[-1])
    config = next(c for c in CONFIGS if c.endswith("unisrec_transductive.yaml"))
    main(["fit", "-c", config, *SLICE, "--model.init_args.loss", "sampled", "--model.init_args.num_negatives", "64",
          "--model.init_args.negative_sampling", "popularity", "--data.batch_size", "256", "--trainer.fast_dev_run", "2",
          "--trainer.logger", "false"])
    (cli,) = built
    model = cli.model  # the flags reached the module, and both steps took the sampled loss
    assert (model.loss, model.num_negatives, model.negative_sampling) == ("sampled", 64, "popularity")
    assert paths == ["sampled", "sampled"] and cli.trainer.global_step == 2
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss) and loss > 0


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


def test_id_only_model_needs_no_item_text(real_root, slice_env, isolated_cache, monkeypatch, caplog, built):
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
    for cli in built:  # both fits trained on the user's own items
        assert_one_checked_step(cli)
        assert cli.model.net.num_items == cli.datamodule.num_items > 0 and not cli.model.net.use_text
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
    out = json.loads(next(runs.rglob("test_metrics.json")).read_text())
    assert out["epochs_trained"] == 3
    # the score the fit was selected on: the best of its validations (all equal here: lr 0)
    scores = [float(row["val/ndcg@10"]) for row in csv.DictReader(open(next(runs.rglob("metrics.csv"))))
              if row.get("val/ndcg@10")]
    assert len(scores) == 3 and out["best_validation"] == {"val/ndcg@10": round(max(scores), 6)}
    with pytest.raises(SystemExit):
        main(["fit", "-c", config, *SLICE, "--patience", "0", "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])


def test_a_resumed_run_keeps_the_patience_it_is_given():
    from lightning.pytorch.callbacks import EarlyStopping

    from unisrec_x.cli import FlagPatience

    saved = EarlyStopping(monitor="val/ndcg@10", mode="max", patience=10).state_dict()
    resumed = FlagPatience(monitor="val/ndcg@10", mode="max", patience=40)
    resumed.load_state_dict({**saved, "wait_count": 7})
    assert resumed.patience == 40 and resumed.wait_count == 7


def test_a_run_cut_after_early_stopping_stops_again_at_once_on_resume():
    """A fit stopped by early stopping and cut before its test ends must not train on when resumed (it could end
    on another checkpoint than the run never cut); a larger --patience given at the resume lets it go on."""
    from types import SimpleNamespace

    from unisrec_x.cli import FlagPatience

    state = {"wait_count": 3, "stopped_epoch": 9, "best_score": torch.tensor(0.05), "patience": 3}
    for patience, stops in ((3, True), (5, False)):
        callback = FlagPatience(monitor="val/ndcg@10", mode="max", patience=patience)
        callback.load_state_dict(state)
        trainer = SimpleNamespace(should_stop=False)
        callback.on_train_start(trainer, None)
        assert trainer.should_stop is stops
