"""The transfer benchmark's pretraining on the source domains: its command, one run per variant, and the weights
(and the weights it kept along the way) that the pretrained arms load."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import statistics
import time
from pathlib import Path

import torch

from unisrec_x.experiments import runner
from unisrec_x.experiments.arms import PRETRAININGS, TEXT_MODEL
from unisrec_x.experiments.records import config_digests, finished
from unisrec_x.experiments.resume import metrics_rows
from unisrec_x.experiments.runner import DEFAULTS_VERSION, stamped_code, with_flags
from unisrec_x.runtime.paths import atomic_torch_save, atomic_write_bytes

log = logging.getLogger(__name__)
PRETRAIN_ARGS = ["-c", "configs/pretrain/pretrain.yaml", *TEXT_MODEL]
PRETRAIN_FLAGS = {"--trainer.max_epochs": "3", "--trainer.val_check_interval": "300"}
#: --quick pretraining: these values replace the full ones (each flag once in the command)
QUICK_PRETRAIN_FLAGS = {"--trainer.max_epochs": "1", "--trainer.max_steps": "40", "--trainer.val_check_interval": "20",
                        "--data.max_users": "1500", "--data.batch_size": "512"}


def pretrain_command(run_dir: Path, seed: int, quick: bool, data_root: str | None, variant: str = "") -> list[str]:
    """The pretraining command: the full settings, or the quick ones in their place; a ``variant`` (one of
    ``arms.PRETRAININGS``) adds its flags."""
    cmd = with_flags(["unisrec-x", "fit", *PRETRAIN_ARGS, *PRETRAININGS[variant]], PRETRAIN_FLAGS)
    cmd = with_flags(cmd, QUICK_PRETRAIN_FLAGS) if quick else cmd
    cmd += ["--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(run_dir.parent),
            "--trainer.logger.init_args.name", ".", "--trainer.logger.init_args.version", run_dir.name,
            "--trainer.enable_progress_bar", "false"]
    return with_flags(cmd, {"--data.data_root": data_root} if data_root else {})


def pretrain(results: Path, runs: Path, seed: int, quick: bool, data_root: str | None, threads: int,
             report_only: bool = False, variant: str = "") -> dict | None:
    """Pretrain once (or reuse the recorded run) and keep its weights beside the results.

    The weights (``pretrained.pt``, the network only) are what the pretrained arms load, so a later
    session reproduces their numbers even when the run folder is gone. Each ``variant`` (``arms.PRETRAININGS``)
    has its own run folder and record (``pretraining-<variant>.json``); a cut pretraining resumes
    (``runner.run_process``).
    """
    name = f"pretrain-{variant}" if variant else "pretrain"
    run_dir = runs / name / f"seed{seed}"
    cmd = pretrain_command(run_dir, seed, quick, data_root, variant)
    # The weights' name carries a hash of the command that made them, and the pretrained arms' commands
    # name the weights: pretraining differently makes every pretrained arm's command (and key) new.
    record_path = results / (f"pretraining-{variant}.json" if variant else "pretraining.json")
    weights = results / f"pretrained-{hashlib.sha256(shlex.join(cmd).encode()).hexdigest()[:10]}.pt"
    record = finished(record_path, shlex.join(cmd))
    if record and weights.exists():
        if not report_only:
            keep_step_weights(run_dir, weights)
        return record
    if report_only:
        return None
    log.info("pretraining: %s", shlex.join(cmd))
    code, configs = runner.code_version(), config_digests(shlex.join(cmd))  # as the run starts
    wall = runner.run_process(cmd, run_dir, threads)
    # the best validation on the sources (never a target's test split) picks the checkpoint
    checkpoint = torch.load(best_checkpoint(run_dir), map_location="cpu", weights_only=True)
    save_net_weights(checkpoint, weights)
    keep_step_weights(run_dir, weights)
    record = {"command": shlex.join(cmd), "defaults": DEFAULTS_VERSION, "configs": configs,
              **stamped_code(run_dir, code), "wall_s": round(wall, 1),
              "sources": _config_value(run_dir, "dataset"), "steps": checkpoint["global_step"],
              "epochs": checkpoint["epoch"] + 1, "weights": str(weights), "curve": _curve(run_dir),
              "date": time.strftime("%Y-%m-%d")}
    atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())
    return record


def save_net_weights(checkpoint: dict, weights: Path) -> None:
    """The network's weights of a Lightning checkpoint, written atomically (what pretrained arms load)."""
    atomic_torch_save({k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}, weights)


def step_weights(weights: Path, step: int | str) -> Path:
    """Where a pretraining's weights kept at ``step`` go: beside its weights, under the same command hash, so an
    arm that starts from them names the pretraining that made them (``{pretrained_step:N}``)."""
    return weights.with_name(f"{weights.stem}-step{step}.pt")


def keep_step_weights(run_dir: Path, weights: Path) -> None:
    """Copy the network weights of each ``step=N.ckpt`` the pretraining kept (``--keep_every_n_steps``) to
    ``step_weights`` (not committed: results/.gitignore), once."""
    for path in sorted((run_dir / "checkpoints").glob("step=*.ckpt")):
        target = step_weights(weights, path.stem.split("=", 1)[1])
        if not target.exists():
            save_net_weights(torch.load(path, map_location="cpu", weights_only=True), target)


def _config_value(run_dir: Path, key: str):
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config["data"][key]


def _curve(run_dir: Path) -> list[dict]:
    """Training loss (mean since the previous point) and source validation N@10 at each validation (of every
    part of a resumed run)."""
    rows, losses = [], []
    for row in metrics_rows(run_dir):
        if row.get("train/loss"):
            losses.append(float(row["train/loss"]))
        if row.get("val/ndcg@10"):
            rows.append({"step": int(row["step"]) + 1, "train_loss": round(statistics.fmean(losses), 4) if losses else None,
                         "val_ndcg@10": round(float(row["val/ndcg@10"]), 5)})
            losses = []
    return rows


def best_checkpoint(run_dir: Path) -> Path:
    """A fit's checkpoint that its validation chose (``best-*.ckpt``), its last where none was kept."""
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    return best[-1] if best else run_dir / "checkpoints" / "last.ckpt"
