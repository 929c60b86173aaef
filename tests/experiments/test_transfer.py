"""The transfer benchmark's bookkeeping: recorded user samples, result files keyed by command, rows over seeds."""

from __future__ import annotations

import json

import pytest

from unisrec_x import transfer
from unisrec_x.experiments.transfer import ARMS, REGIMES, arm_command, run_one, user_sample
from unisrec_x.experiments.transfer_report import rows_of

ARM = {a.name: a for a in ARMS}


def test_user_sample_is_drawn_once_and_reused(real_root, tmp_path):
    path = user_sample("scientific/Scientific", 0.05, tmp_path, str(real_root))
    users = path.read_text().split()
    assert path.name == "users-5pct.txt" and len(users) == len(set(users))
    from unisrec_x.data.datamodule import SeqRecDataModule

    everyone = SeqRecDataModule("scientific/Scientific", data_root=str(real_root)).data.domains[0].users
    assert set(users) <= set(everyone) and len(users) == round(0.05 * len(everyone))
    path.write_text("".join(f"{u}\n" for u in users[:10]))  # a recorded sample is never redrawn
    assert user_sample("scientific/Scientific", 0.05, tmp_path, str(real_root)).read_text().split() == users[:10]


def test_popularity_arm_runs_in_process_and_its_result_is_reused(real_root, tmp_path, monkeypatch):
    users = user_sample("scientific/Scientific", 0.2, tmp_path, str(real_root))
    args = (ARM["popularity"], "scientific/Scientific", "20%", 1, tmp_path, tmp_path / "runs", users, None, False, str(real_root), 1)
    record = run_one(*args)
    saved = json.loads((tmp_path / "scientific-Scientific" / "20pct" / "popularity" / "seed1.json").read_text())
    assert saved == record and saved["regime"] == "20%" and str(users) in saved["command"]
    assert 0 < record["metrics"]["ndcg@10"] < record["metrics"]["recall@50"] < 1
    assert 0 < record["metrics"]["long_tail/rows"] and record["metrics"]["long_tail/ndcg@10"] < record["metrics"]["ndcg@10"]
    monkeypatch.setattr(transfer, "baseline", lambda *a: pytest.fail("re-ran a finished arm"))
    assert run_one(*args) == record


def test_trained_arm_reruns_only_when_its_command_changes(tmp_path, monkeypatch):
    arm = ARM["sasrec"]
    calls = []

    def fake_run(cmd, run_dir, threads):
        calls.append(cmd)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"recall@10": 0.1, "ndcg@10": 0.05, "recall@50": 0.2, "ndcg@50": 0.07, "long_tail/rows": 9.0,
                   "long_tail/recall@10": 0.0, "long_tail/ndcg@10": 0.0, "long_tail/recall@50": 0.1, "long_tail/ndcg@50": 0.02}
        (run_dir / "test_metrics.json").write_text(json.dumps({"metrics": metrics, "epochs_trained": 3, "peak_rss_mb": 900}))
        return 1.0

    monkeypatch.setattr(transfer, "run_process", fake_run)
    base = (arm, "office", "100%", 1, tmp_path, tmp_path / "runs", None, None)
    first = run_one(*base, False, None, 1)
    assert run_one(*base, False, None, 1) == first and len(calls) == 1
    assert "--data.dataset office" in first["command"] and "--seed_everything 1" in first["command"]
    run_one(*base, True, None, 1)  # --quick is another command: run again
    assert len(calls) == 2


def test_rows_have_mean_and_std_over_seeds_and_a_long_tail_slice():
    def record(seed, ndcg, tail):
        return {"target": "t", "regime": "5%", "arm": "sasrec", "seed": seed,
                "metrics": {"recall@10": 2 * ndcg, "ndcg@10": ndcg, "recall@50": 4 * ndcg, "ndcg@50": 2 * ndcg,
                            "long_tail/rows": 7.0, "long_tail/recall@10": tail, "long_tail/ndcg@10": tail,
                            "long_tail/recall@50": tail, "long_tail/ndcg@50": tail}}

    rows = rows_of([record(1, 0.01, 0.0), record(2, 0.02, 0.1), record(3, 0.03, 0.2)], ARMS)
    every, tail = (next(r for r in rows if r["slice"] == s) for s in ("all", "long-tail"))
    assert every["seeds"] == [1, 2, 3] and every["ndcg@10_mean"] == pytest.approx(0.02)
    assert every["ndcg@10_std"] == pytest.approx(0.01) and every["recall@10_mean"] == pytest.approx(0.04)
    assert tail["rows"] == 7 and tail["ndcg@10_mean"] == pytest.approx(0.1) and tail["regime"] in REGIMES


def test_report_only_reports_finished_arms_and_runs_nothing(real_root, tmp_path, monkeypatch):
    results = tmp_path / "results"
    users = user_sample("scientific/Scientific", 0.2, results, str(real_root))
    done = run_one(ARM["popularity"], "scientific/Scientific", "20%", 1, results, tmp_path / "runs", users, None, False,
                   str(real_root), 1)
    monkeypatch.setattr(transfer, "baseline", lambda *a: pytest.fail("ran a baseline"))
    monkeypatch.setattr(transfer, "run_process", lambda *a: pytest.fail("ran an arm"))
    transfer.main(["--report_only", "--targets", "scientific/Scientific", "--regimes", "20%", "--arms", "popularity", "sasrec",
                   "zero_shot", "--results", str(results), "--runs", str(tmp_path / "runs"), "--report", str(tmp_path / "out"),
                   "--data_root", str(real_root)])
    report = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert {(r["arm"], r["slice"]) for r in report["rows"]} == {("popularity", "all"), ("popularity", "long-tail")}
    row = next(r for r in report["rows"] if r["slice"] == "all")
    assert row["ndcg@10_mean"] == done["metrics"]["ndcg@10"] and report["pretraining"] is None
    assert (tmp_path / "out" / "transfer-scientific-Scientific.png").exists()


def test_an_edited_config_file_is_a_new_command(tmp_path, monkeypatch):
    config = tmp_path / "arm.yaml"
    config.write_text("model: {}\n")
    arm = transfer.Arm("custom", "Custom", ["-c", str(config)])
    calls = []

    def fake_run(cmd, run_dir, threads):
        calls.append(cmd)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"recall@10": 0.1, "ndcg@10": 0.05, "recall@50": 0.2, "ndcg@50": 0.07}
        (run_dir / "test_metrics.json").write_text(json.dumps({"metrics": metrics, "epochs_trained": 3}))

    monkeypatch.setattr(transfer, "run_process", fake_run)
    args = (arm, "office", "100%", 1, tmp_path / "results", tmp_path / "runs", None, None, False, None, 1)
    first = run_one(*args)
    assert str(config) in first["configs"] and run_one(*args) == first and len(calls) == 1
    config.write_text("model: {lr: 2}\n")  # same command line, other meaning
    run_one(*args)
    assert len(calls) == 2


@pytest.mark.parametrize("regime, interval", [("5%", 20), ("20%", 5), ("100%", 1)])
def test_few_shot_fits_validate_after_about_one_full_split_of_sequences(tmp_path, regime, interval):
    """At 5% of the users an epoch is one step: validating per epoch stopped runs after ten steps."""
    from unisrec_x.cli import trainer_defaults

    assert transfer.MAX_EPOCHS == trainer_defaults()["max_epochs"]
    words = arm_command(ARM["scratch_inductive"], "office", regime, 1, tmp_path / "seed1", None, None, False, None)
    flag = "--trainer.check_val_every_n_epoch"
    assert int(words[words.index(flag) + 1] if flag in words else 1) == interval
    if interval > 1:  # as many validations (so as much patience) as a full-data run may make
        assert int(words[words.index("--trainer.max_epochs") + 1]) == transfer.MAX_EPOCHS * interval
    quick = arm_command(ARM["scratch_inductive"], "office", regime, 1, tmp_path / "seed1", None, None, True, None)
    assert int(quick[quick.index("--trainer.max_epochs") + 1]) == transfer.QUICK_EPOCHS * interval
    zero_shot = arm_command(ARM["zero_shot"], "office", "zero-shot", 1, tmp_path / "seed1", None, "w.pt", True, None)
    assert zero_shot[1] == "test" and "--trainer.max_epochs" not in zero_shot and "--data.max_users" in zero_shot


def test_every_trained_arms_command_parses(tmp_path, capsys):
    """A misspelt argument in an arm would only surface hours into a benchmark run."""
    from unisrec_x.cli import main

    for arm in ARMS:
        if arm.kind not in ("fit", "test"):
            continue
        regime = "zero-shot" if arm.kind == "test" else arm.regimes[0]
        cmd = arm_command(arm, "scientific/Scientific", regime, 1, tmp_path / arm.name, None, "w.pt", False, None)
        with pytest.raises(SystemExit) as exit_:
            main([*cmd[1:], "--print_config"])
        assert exit_.value.code in (None, 0), arm.name
        printed = capsys.readouterr().out
        assert "use_text:" in printed and "memory_dropout:" in printed, arm.name
        for flag, value in zip(cmd, cmd[1:]):
            if flag.endswith("memory_dropout"):
                assert f"memory_dropout: {value}" in printed, arm.name
