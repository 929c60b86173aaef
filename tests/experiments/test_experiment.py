"""The experiment runner: finished arms are reused, changed ones re-run; tables summarise seeds."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from unisrec_x.experiments import runner as experiment
from unisrec_x.experiments.foundation import FOUNDATION, arm_command, markdown_table, run_arm, summarise


class _Exited:
    """A stand-in for the fit's child process (``subprocess.Popen``): already exited with ``returncode``."""

    def __init__(self, returncode: int) -> None:
        self.returncode = returncode

    def wait(self, timeout=None) -> int:
        return self.returncode


CODE_VERSION = experiment.code_version  # the real one; tests here see a fixed stand-in (below)


@pytest.fixture(autouse=True)
def _known_code_version(monkeypatch):
    """The runner asks git for the checkout's commit at each run; the tests below replace ``subprocess.Popen``
    (the fit's child process) with stand-ins, so git is asked once, first."""
    code = experiment.code_version()
    monkeypatch.setattr(experiment, "code_version", lambda: code)


def _finish(tmp_path, arm, seed, command, ndcg, defaults=experiment.DEFAULTS_VERSION):
    run_dir = tmp_path / arm.name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / experiment.RUN_LOG).write_text("the finished run's log\n")
    (run_dir / "finished.json").write_text(json.dumps({"command": shlex.join(command), "wall_s": 12.0,
                                                       "defaults": defaults}))
    metrics = {"recall@10": 0.1, "ndcg@10": ndcg, "recall@50": 0.2, "ndcg@50": 0.07}
    (run_dir / "test_metrics.json").write_text(json.dumps({"metrics": metrics, "fit_seconds": 10.0, "epochs_trained": 4}))


def test_finished_arm_is_reused_and_changed_command_reruns(tmp_path, monkeypatch):
    arm = FOUNDATION[0]
    _finish(tmp_path, arm, 1, arm_command(arm, 1, tmp_path, False, None), 0.05)
    calls = []
    monkeypatch.setattr(experiment.subprocess, "Popen", lambda *a, **k: calls.append(a) or pytest.fail("re-ran a finished arm"))
    result = run_arm(arm, 1, tmp_path, False, None)
    assert result["metrics"]["ndcg@10"] == 0.05 and result["wall_s"] == 12.0 and not calls

    monkeypatch.setattr(experiment.subprocess, "Popen", lambda *a, **k: calls.append(a) or _Exited(3))
    with pytest.raises(RuntimeError, match="failed"):  # --quick changes the command: the old run is not reused
        run_arm(arm, 1, tmp_path, True, None)
    assert len(calls) == 1


def test_a_run_made_under_older_defaults_is_not_reused(tmp_path, monkeypatch):
    arm = FOUNDATION[0]
    _finish(tmp_path, arm, 1, arm_command(arm, 1, tmp_path, False, None), 0.05, defaults=experiment.DEFAULTS_VERSION - 1)

    calls = []
    monkeypatch.setattr(experiment.subprocess, "Popen", lambda *a, **k: calls.append(a) or _Exited(3))
    with pytest.raises(RuntimeError, match="failed"):  # same command line, other defaults: trained again
        run_arm(arm, 1, tmp_path, False, None)
    assert len(calls) == 1


def test_a_folder_the_runner_did_not_make_is_refused_untouched(tmp_path, monkeypatch):
    arm = FOUNDATION[0]
    run_dir = tmp_path / arm.name / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("a user's file")
    monkeypatch.setattr(experiment.subprocess, "Popen", lambda *a, **k: pytest.fail("ran into a foreign folder"))
    with pytest.raises(FileExistsError, match="not made by unisrec-x experiment"):
        run_arm(arm, 1, tmp_path, False, None)
    assert (run_dir / "notes.txt").read_text() == "a user's file"


HOLDER = ("import fcntl, sys, time; h = open(sys.argv[1], 'a+'); fcntl.flock(h, fcntl.LOCK_EX); "
          "print('held', flush=True); time.sleep(60)")


def test_a_run_folder_in_use_by_another_runner_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("fcntl")
    arm = FOUNDATION[0]
    _finish(tmp_path, arm, 1, ["unisrec-x", "an", "older", "command"], 0.05)
    lock = tmp_path / arm.name / ".seed1.lock"
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:  # another process (a second runner, or a killed runner's still-running child) holds the folder
        assert other.stdout.readline().strip() == "held"
        monkeypatch.setattr(experiment.subprocess, "Popen", lambda *a, **k: pytest.fail("ran beside another runner"))
        with pytest.raises(RuntimeError, match="in use by another unisrec-x experiment"):
            run_arm(arm, 1, tmp_path, False, None)
    finally:
        other.kill()
        other.wait()
    assert (tmp_path / arm.name / "seed1" / "test_metrics.json").exists()  # its files are still there


def test_an_interrupted_run_of_the_runner_is_cleared_and_rerun(tmp_path, monkeypatch):
    arm = FOUNDATION[0]
    run_dir = tmp_path / arm.name / "seed1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / experiment.RUN_LOG).write_text("killed half-way\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"stale")

    def fake_popen(cmd, stdout, **kwargs):
        assert not (run_dir / "checkpoints").exists()  # the interrupted run's files went first
        if sys.platform != "win32":  # the child holds the folder's lock too, in case the runner is killed
            assert len(kwargs["pass_fds"]) == 1
        (run_dir / "test_metrics.json").write_text(json.dumps(
            {"metrics": {"ndcg@10": 0.04}, "fit_seconds": 1.0, "epochs_trained": 1}))
        return _Exited(0)

    monkeypatch.setattr(experiment.subprocess, "Popen", fake_popen)
    assert run_arm(arm, 1, tmp_path, False, None)["metrics"]["ndcg@10"] == 0.04


def test_summary_and_table_over_seeds(tmp_path):
    runs = [{"metrics": {"recall@10": r, "ndcg@10": r / 2, "recall@50": r * 2, "ndcg@50": r}, "epochs": 3, "wall_s": 5.0}
            for r in (0.1, 0.2, 0.3)]
    summary = summarise(runs)
    assert summary["recall@10"] == {"mean": pytest.approx(0.2), "std": pytest.approx(0.1)}
    table = markdown_table({"arms": {"a": {"label": "Arm A", "summary": summary, "runs": runs}}})
    assert "| Arm A | 0.2000 ± 0.1000 | 0.1000 ± 0.0500 |" in table and "3/3/3" in table


def test_a_cut_parts_time_counts_to_its_last_sign_of_life(tmp_path):
    """A fit logs at its start and end only, so a kill's time is its last heartbeat or the newest file it wrote
    (a checkpoint), whichever is later: never its log's last line."""
    from unisrec_x.experiments import resume

    run_dir = tmp_path / "seed1"
    (run_dir / "checkpoints").mkdir(parents=True)
    stamp = resume.new_stamp(["unisrec-x", "fit"], {"commit": "a" * 40, "dirty": False})
    resume.start_part(run_dir, stamp)
    started = stamp["parts"][0]["started"]
    for name, after in ((experiment.RUN_LOG, 5), ("checkpoints/last.ckpt", 100), ("metrics.csv", 60)):
        (run_dir / name).write_text("x")
        os.utime(run_dir / name, (started + after, started + after))
    assert resume.cut_part_seconds(run_dir, stamp["parts"][0]) == pytest.approx(100, abs=0.2)
    resume.heartbeat(run_dir, stamp, 130.0)  # a heartbeat after the checkpoint
    stamp = resume.read_stamp(run_dir)
    assert stamp["parts"][0]["alive_s"] == 130.0
    resume.prepare_resume(run_dir, stamp)
    assert stamp["parts"][0]["wall_s"] == pytest.approx(130, abs=0.2)
    assert (run_dir / resume.METRICS_PART.format(1)).is_file()


@pytest.mark.parametrize("case", ["same", "other commit", "dirty", "other command", "truncated"])
def test_a_cut_run_resumes_only_for_the_same_command_on_the_same_clean_code(tmp_path, monkeypatch, case):
    import torch

    from unisrec_x.experiments import resume

    cmd = ["unisrec-x", "fit", "--seed_everything", "1"]
    code = {"commit": "a" * 40, "dirty": False}
    run_dir = tmp_path / "seed1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / experiment.RUN_LOG).write_text("cut half-way\n")
    stamp = resume.new_stamp(cmd, code)
    resume.start_part(run_dir, stamp)
    torch.save({"state_dict": {}, "global_step": 7}, run_dir / resume.LAST)
    if case == "truncated":
        (run_dir / resume.LAST).write_bytes((run_dir / resume.LAST).read_bytes()[:20])
    (run_dir / "metrics.csv").write_text("step,val/ndcg@10\n6,0.05\n")
    now = {"same": code, "other commit": {"commit": "b" * 40, "dirty": False}, "dirty": {**code, "dirty": True},
           "other command": code, "truncated": code}[case]
    monkeypatch.setattr(experiment, "code_version", lambda: now)
    given = []

    def fake_popen(words, stdout, **kwargs):
        given.append(words)
        return _Exited(0)

    monkeypatch.setattr(experiment.subprocess, "Popen", fake_popen)
    experiment.run_process(cmd + (["--trainer.max_epochs", "3"] if case == "other command" else []), run_dir)
    resumed = "--ckpt_path" in given[0]
    assert resumed == (case == "same")
    assert (run_dir / resume.LAST).exists() == resumed  # a run not resumed starts from an emptied folder
    assert (run_dir / resume.METRICS_PART.format(1)).exists() == resumed  # the cut part's rows are kept
    stamp = resume.read_stamp(run_dir)
    assert stamp["finished"] and len(stamp["parts"]) == (2 if resumed else 1)
    experiment.run_process(cmd + (["--trainer.max_epochs", "3"] if case == "other command" else []), run_dir)
    assert len(given) == (1 if now["dirty"] is False else 2)  # a finished run of clean code is not run again


def test_the_code_version_names_the_commit_and_sees_a_changed_or_new_code_file_but_not_results(tmp_path,
                                                                                                monkeypatch):
    def git(*words):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", *words], check=True,
                       capture_output=True)

    for path in ("unisrec_x/model.py", "configs/a.yaml", "results/r.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    monkeypatch.setattr(experiment, "REPO_ROOT", tmp_path)
    clean = CODE_VERSION()
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "results" / "r.json").write_text("v2\n")  # a result is not code
    assert CODE_VERSION() == clean
    (tmp_path / "unisrec_x" / "new.py").write_text("x = 1\n")  # a new module is (asked afresh, not cached)
    assert CODE_VERSION() == {**clean, "dirty": True}
    (tmp_path / "unisrec_x" / "new.py").unlink()
    (tmp_path / "configs" / "a.yaml").write_text("v2\n")
    assert CODE_VERSION()["dirty"] is True


def test_a_finished_run_whose_results_were_removed_runs_again(tmp_path, monkeypatch):
    """A user deletes a finished run's test_metrics.json to have it run again: the runner runs it (it used to
    take the stamp's word, skip the run and fail on the missing file)."""
    run_dir, given = tmp_path / "seed1", []

    def fake_popen(words, stdout, **kwargs):
        given.append(words)
        (run_dir / "test_metrics.json").write_text(json.dumps({"metrics": {"ndcg@10": 0.04}}))
        return _Exited(0)

    monkeypatch.setattr(experiment, "code_version", lambda: {"commit": "a" * 40, "dirty": False})
    monkeypatch.setattr(experiment.subprocess, "Popen", fake_popen)
    cmd = ["unisrec-x", "fit", "--seed_everything", "1"]
    experiment.run_process(cmd, run_dir)
    experiment.run_process(cmd, run_dir)
    assert len(given) == 1  # finished, its results in place: not run again
    (run_dir / "test_metrics.json").unlink()
    experiment.run_process(cmd, run_dir)
    assert len(given) == 2 and (run_dir / "test_metrics.json").is_file()
