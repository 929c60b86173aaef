"""Runs survive kills, repeat exactly, stop on NaN, and refuse unsafe or mismatched checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unisrec_x.cli import main
from unisrec_x.data.sequences import SeqBatch
from unisrec_x.training.guards import NonFiniteLossError
from unisrec_x.training.module import SeqRecModule
from unisrec_x.model.unisrec import UniSRec

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "scientific" / "unisrec_transductive.yaml")


def _args(tiny_encoder, root, save_dir):
    return ["fit", "-c", CONFIG, "--data.max_users", "150", "--data.batch_size", "64", "--data.text_encoder", tiny_encoder,
            "--data.data_root", str(root), "--trainer.max_epochs", "2", "--trainer.val_check_interval", "3",
            "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(save_dir)]


def _args_in(tiny_encoder, root, save_dir, *extra: str) -> list[str]:
    """``_args`` logging straight into ``save_dir / "v"`` (checkpoints in ``save_dir/v/checkpoints``)."""
    return [*_args(tiny_encoder, root, save_dir), "--trainer.logger.init_args.name", ".",
            "--trainer.logger.init_args.version", "v", *extra]


def _metrics(save_dir: Path) -> dict:
    return json.loads(next(save_dir.rglob("test_metrics.json")).read_text())["metrics"]


def _validations(save_dir: Path) -> list[tuple[int, float]]:
    """(step, validation N@10) of every part of a run logged in ``save_dir/v`` (``metrics*.csv``)."""
    import csv

    rows = []
    for path in sorted((save_dir / "v").glob("metrics*.csv")):
        with open(path, newline="") as handle:
            rows += [(int(r["step"]), float(r["val/ndcg@10"])) for r in csv.DictReader(handle) if r.get("val/ndcg@10")]
    return sorted(set(rows))


def _cut_at(monkeypatch, hook: str, step: int, run) -> None:
    """``run()`` with ``SeqRecModule.<hook>`` interrupted at global step ``step``, as a kill there would."""
    original = getattr(SeqRecModule, hook)

    def cut(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise KeyboardInterrupt(f"killed in {hook} at step {step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SeqRecModule, hook, cut)
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            run()
    finally:
        monkeypatch.setattr(SeqRecModule, hook, original)


@pytest.fixture
def env(tmp_path, tiny_encoder, real_root):
    return {**os.environ, "UNISREC_X_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_same_seed_same_metrics(tmp_path, tiny_encoder, real_root, monkeypatch):
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    main(_args(tiny_encoder, real_root, tmp_path / "a"))
    main(_args(tiny_encoder, real_root, tmp_path / "b"))
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_encoder, real_root, env):
    cli = [sys.executable, "-m", "unisrec_x.cli"]
    subprocess.run(cli + _args(tiny_encoder, real_root, tmp_path / "whole"), env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    victim = subprocess.Popen(cli + _args(tiny_encoder, real_root, tmp_path / "killed"), env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = None
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:  # wait for a mid-epoch checkpoint, then kill -9
        found = list((tmp_path / "killed").rglob("last.ckpt"))
        if found and torch.load(found[0], weights_only=True)["global_step"] >= 6:
            last = found[0]
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert last is not None, "no checkpoint appeared before the run ended"
    state = torch.load(last, weights_only=True)
    steps_per_epoch = state["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] > 0  # inside an epoch
    resumed = subprocess.run(cli + _args(tiny_encoder, real_root, tmp_path / "killed") + ["--ckpt_path", str(last)],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert state["global_step"] >= 6 and steps_per_epoch >= 5  # killed after two validations, mid-epoch
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "whole")


def test_nan_loss_stops_naming_the_step():
    net = UniSRec(num_items=5, plm_dim=8, hidden_dim=16, inner_dim=16, max_seq_len=5)
    features = torch.randn(6, 8)
    features[3] = float("nan")
    net.set_item_features(features)
    module = SeqRecModule(net)
    batch = SeqBatch(torch.tensor([[1, 3]]), torch.tensor([2]), torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(NonFiniteLossError, match="loss is nan at global step 0"):
        module.training_step(batch, 0)


@pytest.mark.parametrize("damage, message", [("missing", "checkpoint not found"), ("truncate", "truncated or corrupted"),
                                              ("pickle", "refused")])
def test_bad_ckpt_path_exits_cleanly(tmp_path, tiny_encoder, real_root, monkeypatch, caplog, damage, message):
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.ckpt"
    if damage == "truncate":
        torch.save({"state_dict": {"net.x": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "pickle":
        torch.save({"state_dict": {}, "callback": print}, path)  # any non-tensor object, here a function reference
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "-c", CONFIG, "--data.max_users", "50", "--data.text_encoder", tiny_encoder,
              "--data.data_root", str(real_root), "--ckpt_path", str(path), "--trainer.logger", "false"])
    assert exit_info.value.code == 2 and message in caplog.text and str(path) in caplog.text


def test_checkpoint_with_another_item_count_says_so(tmp_path, tiny_encoder, real_root, monkeypatch, caplog):
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    main(_args(tiny_encoder, real_root, tmp_path / "run")[:-2] + ["--trainer.logger", "false", "--trainer.max_epochs", "1",
                                                                  "--trainer.default_root_dir", str(tmp_path / "run")])
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    with pytest.raises(SystemExit):
        main(["test", "-c", CONFIG, "--data.max_users", "60", "--data.text_encoder", tiny_encoder,
              "--data.data_root", str(real_root), "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    assert "checkpoint has another item count" in caplog.text


def test_a_killed_experiment_run_resumes_where_it_was_cut_and_ends_as_an_uninterrupted_one(
        tmp_path, tiny_encoder, real_root, env, monkeypatch):
    """The experiment runner resumes a cut run of the same command and code from its last checkpoint (a session's
    end no longer throws an hour of training away): same test metrics and validation curve as a run never cut."""
    from unisrec_x.experiments import resume, runner

    code = {"commit": "c" * 40, "dirty": False}  # a clean checkout: only then may a run span two processes
    monkeypatch.setattr(runner, "code_version", lambda: code)
    for name in ("UNISREC_X_CACHE", "PYTHONPATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, env[name])

    def command(run_dir: Path) -> list[str]:
        return ["unisrec-x", *_args(tiny_encoder, real_root, run_dir.parent), "--trainer.logger.init_args.name", ".",
                "--trainer.logger.init_args.version", run_dir.name]

    whole, cut = tmp_path / "whole" / "seed1", tmp_path / "cut" / "seed1"
    runner.run_process(command(whole), whole)
    child = ("import json, sys; from pathlib import Path; from unisrec_x.experiments import runner; "
             f"runner.code_version = lambda: {code!r}; runner.HEARTBEAT_S = 0.5; "
             "runner.run_process(json.loads(sys.argv[1]), Path(sys.argv[2]))")
    victim = subprocess.Popen([sys.executable, "-c", child, json.dumps(command(cut)), str(cut)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, step = time.time() + 300, None
    while time.time() < deadline and victim.poll() is None:  # a checkpoint after two validations, then kill -9 all
        step = resume.checkpoint_step(cut / resume.LAST) if (cut / resume.LAST).is_file() else None
        if step is not None and step >= 6:
            break
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    victim.wait()
    while time.time() < deadline:  # the fit (its grandchild, which holds the folder's lock too) is gone as well
        try:
            os.killpg(victim.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert step is not None and step >= 6 and not (cut / "test_metrics.json").exists()

    runner.run_process(command(cut), cut)
    stamp = resume.read_stamp(cut)
    assert stamp["finished"] and len(stamp["parts"]) == 2 and stamp["parts"][1]["resumed_at_step"] >= 6
    # the cut part's time counts up to the kill (its heartbeats), not only to its log's last line
    cut_part = stamp["parts"][0]
    assert killed_at - cut_part["started"] - 2.0 <= cut_part["wall_s"] <= killed_at - cut_part["started"] + 1.0
    assert stamp["wall_s"] == pytest.approx(sum(p["wall_s"] for p in stamp["parts"]), abs=0.2)
    assert (cut / resume.METRICS_PART.format(1)).is_file()  # the cut part's rows were kept
    assert _metrics(cut) == pytest.approx(_metrics(whole), rel=1e-5)

    def curve(run_dir):
        return [float(r["val/ndcg@10"]) for r in resume.metrics_rows(run_dir) if r.get("val/ndcg@10")]

    assert len(curve(whole)) >= 3 and curve(cut) == pytest.approx(curve(whole), rel=1e-5)
    before = (cut / "test_metrics.json").stat().st_mtime_ns
    runner.run_process(command(cut), cut)  # finished: not run again
    assert (cut / "test_metrics.json").stat().st_mtime_ns == before


def test_a_last_checkpoint_on_a_validation_step_keeps_the_best_and_the_test(tmp_path, tiny_encoder, real_root,
                                                                            monkeypatch):
    """``--last_every_n_steps`` equal to the validation interval: each validation still saves its best checkpoint
    and the state after it, so the test runs on the weights validation chose, as without the flag."""
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))

    def fit(name: str, *extra: str) -> Path:
        main(_args_in(tiny_encoder, real_root, tmp_path / name, "--trainer.max_steps", "13", *extra))
        return tmp_path / name

    plain, every = fit("plain"), fit("every", "--last_every_n_steps", "3")
    best = sorted(p.name for p in plain.rglob("best*.ckpt"))
    assert best and sorted(p.name for p in every.rglob("best*.ckpt")) == best
    assert _metrics(every) == pytest.approx(_metrics(plain), rel=1e-5)
    last = torch.load(next(every.rglob("last.ckpt")), weights_only=True)
    states = [v for k, v in last["callbacks"].items() if k.startswith("ResumingModelCheckpoint")]
    assert states and states[0]["best_model_path"].endswith(best[-1])  # the last state knows the best


def test_a_run_killed_inside_a_validation_on_a_last_checkpoint_step_validates_there_again(
        tmp_path, tiny_encoder, real_root, monkeypatch):
    """``--last_every_n_steps 3`` with a validation every 3 steps, the fit cut inside the step-6 validation: the
    resumed run validates at step 6 again (a last.ckpt written just before that validation made Lightning count
    it as done), so its validations and test are an uninterrupted run's."""
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))

    def args(name: str) -> list[str]:
        return _args_in(tiny_encoder, real_root, tmp_path / name, "--trainer.max_steps", "10", "--last_every_n_steps", "3")

    main(args("whole"))
    _cut_at(monkeypatch, "validation_step", 6, lambda: main(args("cut")))
    last = tmp_path / "cut" / "v" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] < 6  # the state before the interrupted validation
    os.replace(tmp_path / "cut" / "v" / "metrics.csv", tmp_path / "cut" / "v" / "metrics.part1.csv")
    main([*args("cut"), "--ckpt_path", str(last)])
    assert len(_validations(tmp_path / "whole")) >= 3 and _validations(tmp_path / "cut") == _validations(tmp_path / "whole")
    assert _metrics(tmp_path / "cut") == pytest.approx(_metrics(tmp_path / "whole"), rel=1e-5)


def test_weights_kept_every_n_steps_beside_the_best_and_the_last(tmp_path, tiny_encoder, real_root, monkeypatch):
    """``--keep_every_n_steps``: the weights at steps 3 and 6 stay (what a pretraining's first part buys can be
    measured later) beside the best and last checkpoints; a run cut between last.ckpt and the kept file of the
    same step writes that kept file when it resumes."""
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))

    def fit(steps: int, *extra: str) -> None:
        main(_args_in(tiny_encoder, real_root, tmp_path / "run", "--trainer.max_steps", str(steps), "--test_after_fit",
                      "false", "--keep_every_n_steps", "3", *extra))

    fit(6)
    folder = tmp_path / "run" / "v" / "checkpoints"
    kept = {p.name: torch.load(p, weights_only=True) for p in folder.glob("step=*.ckpt")}
    assert sorted(kept) == ["step=3.ckpt", "step=6.ckpt"]
    assert [kept[name]["global_step"] for name in sorted(kept)] == [3, 6]
    assert all("optimizer_states" not in state and any(k.startswith("net.") for k in state["state_dict"])
               for state in kept.values())
    assert list(folder.glob("best-*.ckpt")) and torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    (folder / "step=6.ckpt").unlink()  # as if killed between last.ckpt and it
    fit(7, "--ckpt_path", str(folder / "last.ckpt"))
    again = torch.load(folder / "step=6.ckpt", weights_only=True)
    assert again["global_step"] == 6 and "optimizer_states" not in again
    for key, value in kept["step=6.ckpt"]["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key


@pytest.mark.parametrize("every, last_step", [(None, 3), (2, 4)])
def test_last_checkpoint_every_n_steps_between_validations(tmp_path, tiny_encoder, real_root, monkeypatch, every,
                                                            last_step):
    """``--last_every_n_steps`` rewrites last.ckpt between validations (a validation every 3 steps here; the run
    stops at step 5 without one), so a kill loses at most that many steps instead of a validation interval."""
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    main([*_args(tiny_encoder, real_root, tmp_path / "run"), "--trainer.max_steps", "5", "--test_after_fit", "false",
          *(["--last_every_n_steps", str(every)] if every else [])])
    assert torch.load(next((tmp_path / "run").rglob("last.ckpt")), weights_only=True)["global_step"] == last_step


def test_a_checkpoint_write_cut_before_its_rename_leaves_the_previous_checkpoint_whole(tmp_path, tiny_encoder,
                                                                                       real_root, monkeypatch):
    """A kill while ``last.ckpt`` is rewritten (Lightning's writer copied it in from the temp folder, so a cut copy
    left a truncated file and the run started over) leaves the previous checkpoint, which still resumes."""
    from unisrec_x.experiments import resume
    from unisrec_x.runtime import paths

    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    main(_args_in(tiny_encoder, real_root, tmp_path / "run", "--trainer.max_steps", "6"))
    last = tmp_path / "run" / "v" / "checkpoints" / "last.ckpt"
    before, cut = last.read_bytes(), []

    def killed_before_rename(src, dst):
        cut.append(dst)
        raise OSError("killed between the write and the rename")

    monkeypatch.setattr(paths.os, "replace", killed_before_rename)
    with pytest.raises(OSError, match="killed between"):
        main(_args_in(tiny_encoder, real_root, tmp_path / "run", "--trainer.max_steps", "12", "--ckpt_path", str(last)))
    assert cut and str(cut[0]).endswith(".ckpt")  # the write that was cut was a checkpoint's
    assert last.read_bytes() == before and resume.checkpoint_step(last) == 6
    assert not paths.leftover_siblings(last.parent)  # the failed write took its temporary file with it
    monkeypatch.undo()
    killed = last.parent / f".last.ckpt.tmp-{os.getpid() + 1}"  # what a kill -9 mid-write leaves
    killed.write_bytes(before[:100])
    resume.prepare_resume(last.parent.parent, {"parts": [{"started": time.time()}]})
    assert not killed.exists() and last.read_bytes() == before  # a resume clears it, keeps the checkpoint


def test_a_fit_with_a_text_top_resumes_on_the_table_it_was_saved_with(tmp_path, tiny_encoder, real_root, monkeypatch):
    """A trained text top (straight-through, so every step's values are the table's): the fit cut after its step-3
    checkpoint resumes on the table made at step 0, not one recomputed from the step-3 weights, so it refreshes at
    step 4 as an uninterrupted run does and ends with the same validations and test metrics."""
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    net = "--model.init_args.net.init_args."

    def args(name: str) -> list[str]:
        return _args_in(tiny_encoder, real_root, tmp_path / name, "--trainer.max_steps", "10", "--last_every_n_steps", "3",
                        "--trainer.val_check_interval", "5", f"{net}text_top_layers", "1", f"{net}text_top_heads", "2",
                        f"{net}text_top_inner_dim", "64", "--model.init_args.text_top_lr", "0.01",
                        "--model.init_args.text_refresh_steps", "4", "--model.init_args.text_straight_through", "true")

    main(args("whole"))
    _cut_at(monkeypatch, "training_step", 4, lambda: main(args("cut")))
    last = tmp_path / "cut" / "v" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and saved["text_top_table"]["step"] == 0
    assert not (tmp_path / "cut" / "v" / "metrics.csv").exists()  # nothing validated before the cut
    main([*args("cut"), "--ckpt_path", str(last)])
    whole, cut = _validations(tmp_path / "whole"), _validations(tmp_path / "cut")
    assert len(whole) == 2 and [step for step, _ in cut] == [step for step, _ in whole]
    assert [score for _, score in cut] == pytest.approx([score for _, score in whole], rel=1e-5)
    assert _metrics(tmp_path / "cut") == pytest.approx(_metrics(tmp_path / "whole"), rel=1e-5)
