"""The transfer benchmark: pretrain once on source domains, then per target and data regime, every arm.

    unisrec-x experiment transfer [--targets scientific/Scientific office] [--regimes zero-shot 5% 20% 100%]

Regimes: ``zero-shot`` (no target training), few-shot with a fixed share of the target's users
training (``5%``, ``20%``: one recorded sample, ``users-5pct.txt``, the same for every arm and seed;
validation and test on all users), ``100%``. Slices: all test rows, and ``long-tail``: rows whose
target item is a training target at most 5 times in the data that regime used (zero-shot: the full
training split). Every finished arm writes one small JSON under ``results/transfer/`` keyed by its
exact command, committed, so a later session continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shlex
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unisrec_x.experiments.runner import DEFAULTS_VERSION, run_process
from unisrec_x.runtime.paths import atomic_write_bytes
from unisrec_x.experiments.transfer_report import report, slug

log = logging.getLogger(__name__)
REGIMES = {"zero-shot": 0.0, "5%": 0.05, "20%": 0.20, "100%": 1.0}
DEFAULT_TARGETS = ["scientific/Scientific", "office"]
LONG_TAIL_MAX_COUNT = 5
#: Every text arm, pretrained or not, uses the same architecture: the pretrained arms differ only by their start.
TEXT_MODEL = ["--model.init_args.net.init_args.last_item_residual", "true"]
PRETRAIN_ARGS = ["-c", "configs/pretrain/pretrain.yaml", *TEXT_MODEL, "--trainer.max_epochs", "3",
                 "--trainer.val_check_interval", "300"]
QUICK_PRETRAIN_ARGS = ["--trainer.max_epochs", "1", "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
                       "--data.max_users", "1500", "--data.batch_size", "512"]
QUICK_USERS = 2000
#: the CLI's default max_epochs (cli.trainer_defaults), stretched by the validation interval in few-shot regimes
MAX_EPOCHS = 300
QUICK_EPOCHS = 3  # validations of a --quick fit (its epochs are this times the regime's validation interval)
#: --quick (the README's main job): one target and three regimes, so it finishes in minutes on 2 cores
QUICK_TARGETS, QUICK_REGIMES = ["scientific/Scientific"], ["zero-shot", "20%", "100%"]


@dataclass
class Arm:
    """One line of the plot: a training-free baseline (``kind``) or a ``unisrec-x`` command."""

    name: str
    label: str
    args: list[str] = field(default_factory=list)
    kind: str = "fit"  # fit | test | popularity | text_knn
    pretrained: bool = False
    regimes: tuple[str, ...] = ("5%", "20%", "100%")
    in_quick: bool = True  # part of ``--quick`` (the main job, which must finish in minutes)


_PRE = ["--model.init_args.pretrained", "{pretrained}"]
ARMS = [
    Arm("popularity", "Popularity (training counts)", kind="popularity"),
    Arm("text_knn", "Text-kNN (no training)", kind="text_knn", regimes=tuple(REGIMES)),
    Arm("zero_shot", "Pretrained, zero-shot", ["-c", "configs/transfer/zero_shot.yaml", *TEXT_MODEL, *_PRE],
        kind="test", pretrained=True, regimes=("zero-shot",)),
    Arm("sasrec", "SASRec-ID", ["-c", "configs/scientific/sasrec.yaml"]),
    Arm("scratch_inductive", "Scratch, inductive (text)", ["-c", "configs/scientific/unisrec_inductive.yaml", *TEXT_MODEL]),
    Arm("scratch_transductive", "Scratch, transductive (text + ID)",
        ["-c", "configs/scientific/unisrec_transductive.yaml", *TEXT_MODEL]),
    Arm("pretrained_inductive_adapter", "Pretrained, inductive, adapter only",
        ["-c", "configs/transfer/finetune_inductive.yaml", *TEXT_MODEL, *_PRE], pretrained=True),
    Arm("pretrained_inductive_full", "Pretrained, inductive, all parameters",
        ["-c", "configs/transfer/finetune_inductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false", *_PRE],
        pretrained=True),
    Arm("pretrained_transductive", "Pretrained, transductive (text + ID), all parameters",
        ["-c", "configs/transfer/finetune_transductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false", *_PRE],
        pretrained=True),
    # semantic IDs (issue 14): codes are per domain, so the pretrained arm transfers the text path and
    # learns the target's code embeddings from scratch (OPQ codes fitted on the target's item texts)
    Arm("scratch_text_codes", "Scratch, text + codes",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL], in_quick=False),
    Arm("pretrained_text_codes", "Pretrained, text + codes, all parameters",
        ["-c", "configs/transfer/finetune_transductive.yaml", *TEXT_MODEL, "--model.init_args.freeze_encoder", "false",
         "--model.init_args.net.init_args.use_item_id", "false", "--model.init_args.net.init_args.use_codes", "true", *_PRE],
        pretrained=True, in_quick=False),
    # issue 14 at 5%: both memories (ID rows, code digits) with the memory dropout that validation chose
    # for each on Scientific 5%, seed 1, from the same grid (docs/results.md, semantic item IDs)
    Arm("scratch_transductive_md", "Scratch, text + ID, memory dropout 0.75",
        ["-c", "configs/scientific/unisrec_transductive.yaml", *TEXT_MODEL,
         "--model.init_args.net.init_args.memory_dropout", "0.75"], regimes=("5%",), in_quick=False),
    Arm("scratch_text_codes_md", "Scratch, text + codes, memory dropout 0.75",
        ["-c", "configs/scientific/unisrec_text_codes.yaml", *TEXT_MODEL,
         "--model.init_args.net.init_args.memory_dropout", "0.75"], regimes=("5%",), in_quick=False),
]


def user_sample(target: str, share: float, results: Path, data_root: str | None, max_users: int | None = None) -> Path:
    """The recorded few-shot sample: ``share`` of the target's users, drawn once (seed 0) and kept.

    An existing file is reused as it is, so every arm, seed and later session trains on the same users.
    """
    path = results / slug(target) / f"users-{slug(f'{share:.0%}')}.txt"
    if path.exists():
        return path
    from unisrec_x.data.datamodule import SeqRecDataModule

    users = [u for d in SeqRecDataModule(target, data_root=data_root, max_users=max_users).data.domains for u in d.users]
    chosen = sorted(random.Random(0).sample(range(len(users)), max(1, round(share * len(users)))))
    atomic_write_bytes(path, "".join(f"{users[i]}\n" for i in chosen).encode())
    log.info("%s: sampled %d of %d users for the %.0f%% regime -> %s", target, len(chosen), len(users), share * 100, path)
    return path


def validation_interval(regime: str) -> int:
    """Epochs between validations: about one full training split's worth of sequences in every regime.

    With 5% of the users an epoch is a single optimizer step, so validating (and counting early-stopping
    patience) per epoch would stop a run after ten steps: the from-scratch text arms, whose validation
    score peaks at the text geometry they start from and dips before it climbs, stopped there.
    """
    share = REGIMES[regime]
    return round(1 / share) if share > 0 else 1


def arm_command(arm: Arm, target: str, regime: str, seed: int, run_dir: Path, users: Path | None,
                pretrained: str | None, quick: bool, data_root: str | None) -> list[str]:
    """The exact ``unisrec-x`` command of a trained arm (its key in the results folder)."""
    cmd = ["unisrec-x", arm.kind, *[a.format(pretrained=pretrained) for a in arm.args], "--data.dataset", target,
           "--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(run_dir.parent),
           "--trainer.logger.init_args.name", ".", "--trainer.logger.init_args.version", run_dir.name,
           "--trainer.enable_progress_bar", "false"]
    if users is not None:
        cmd += ["--data.train_users", str(users)]
    if arm.kind == "fit":
        interval = validation_interval(regime)
        if interval > 1:
            cmd += ["--trainer.check_val_every_n_epoch", str(interval)]
        if quick or interval > 1:  # as many validations (so as much patience) as a full-data run may make
            cmd += ["--trainer.max_epochs", str((QUICK_EPOCHS if quick else MAX_EPOCHS) * interval)]
    if quick:
        cmd += ["--data.max_users", str(QUICK_USERS)]
    if data_root:
        cmd += ["--data.data_root", data_root]
    return cmd


def config_digests(command: str) -> dict[str, str]:
    """sha256 of each config file a command reads (``-c FILE``): editing a config changes what the
    same command line means, so it must not reuse results made under the old file."""
    words = shlex.split(command)
    files = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-c", "--config")]
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] for f in files if Path(f).is_file()}


def finished(path: Path, command: str) -> dict | None:
    """A result file made by exactly this command, under today's defaults and config files, else ``None``."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = (record.get("command") == command and record.get("defaults") == DEFAULTS_VERSION
            and record.get("configs") == config_digests(command))
    return record if same else None


def pretrain(results: Path, runs: Path, seed: int, quick: bool, data_root: str | None, threads: int,
             report_only: bool = False) -> dict | None:
    """Pretrain once (or reuse the recorded run) and keep its weights beside the results.

    The weights (``pretrained.pt``, the network only) are what the pretrained arms load, so a later
    session reproduces their numbers even when the run folder is gone.
    """
    run_dir = runs / "pretrain" / f"seed{seed}"
    cmd = ["unisrec-x", "fit", *PRETRAIN_ARGS, *(QUICK_PRETRAIN_ARGS if quick else []), "--seed_everything", str(seed),
           "--trainer.logger.init_args.save_dir", str(run_dir.parent), "--trainer.logger.init_args.name", ".",
           "--trainer.logger.init_args.version", run_dir.name, "--trainer.enable_progress_bar", "false"]
    if data_root:
        cmd += ["--data.data_root", data_root]
    # The weights' name carries a hash of the command that made them, and the pretrained arms' commands
    # name the weights: pretraining differently makes every pretrained arm's command (and key) new.
    record_path = results / "pretraining.json"
    weights = results / f"pretrained-{hashlib.sha256(shlex.join(cmd).encode()).hexdigest()[:10]}.pt"
    record = finished(record_path, shlex.join(cmd))
    if record and weights.exists():
        return record
    if report_only:
        return None
    log.info("pretraining: %s", shlex.join(cmd))
    wall = run_process(cmd, run_dir, threads)
    # the best validation on the sources (never a target's test split) picks the checkpoint
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    checkpoint = torch.load(best[-1] if best else run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    tmp = weights.with_name(f".{weights.name}.tmp-{os.getpid()}")
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, weights)
    record = {"command": shlex.join(cmd), "defaults": DEFAULTS_VERSION, "configs": config_digests(shlex.join(cmd)),
              "wall_s": round(wall, 1),
              "sources": _config_value(run_dir, "dataset"), "steps": checkpoint["global_step"],
              "epochs": checkpoint["epoch"] + 1, "weights": str(weights), "curve": _curve(run_dir / "metrics.csv"),
              "date": time.strftime("%Y-%m-%d")}
    atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())
    return record


def _config_value(run_dir: Path, key: str):
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config["data"][key]


def _curve(metrics_csv: Path) -> list[dict]:
    """Training loss (mean since the previous point) and source validation N@10 at each validation."""
    import csv

    rows, losses = [], []
    for row in csv.DictReader(open(metrics_csv)):
        if row.get("train/loss"):
            losses.append(float(row["train/loss"]))
        if row.get("val/ndcg@10"):
            rows.append({"step": int(row["step"]) + 1, "train_loss": round(statistics.fmean(losses), 4) if losses else None,
                         "val_ndcg@10": round(float(row["val/ndcg@10"]), 5)})
            losses = []
    return rows


def baseline(arm: Arm, target: str, users: Path | None, quick: bool, data_root: str | None) -> dict:
    """Popularity or text-kNN on the target's test split, with the long-tail slice, in this process."""
    from unisrec_x.evaluation.baselines import popularity, text_knn
    from unisrec_x.data.datamodule import SeqRecDataModule

    data = SeqRecDataModule(target, data_root=data_root, train_users=None if users is None else str(users),
                            max_users=QUICK_USERS if quick else None)
    targets = data.examples("train").targets
    long_tail = (torch.bincount(targets, minlength=data.num_items + 1), LONG_TAIL_MAX_COUNT)
    test = data.test_dataloader()
    if arm.kind == "popularity":
        return popularity(targets, data.num_items, test, long_tail=long_tail)
    return text_knn(data.item_features, test, long_tail=long_tail)


def run_one(arm: Arm, target: str, regime: str, seed: int, results: Path, runs: Path, users: Path | None,
            pretrained: str | None, quick: bool, data_root: str | None, threads: int, report_only: bool = False) -> dict | None:
    """One (target, regime, arm, seed): reuse its result file if the command matches, else run it
    (``report_only``: else ``None``)."""
    where = Path(slug(target)) / slug(regime) / arm.name / f"seed{seed}"
    result_path = results / where.with_suffix(".json")
    if arm.kind in ("popularity", "text_knn"):
        command = f"baseline {arm.kind} --data.dataset {target} --data.train_users {users}" + (" --quick" if quick else "")
    else:
        command = shlex.join(arm_command(arm, target, regime, seed, runs / where, users, pretrained, quick, data_root))
    record = finished(result_path, command)
    if record or report_only:
        return record
    start = time.perf_counter()
    if arm.kind in ("popularity", "text_knn"):
        metrics, epochs, peak = baseline(arm, target, users, quick, data_root), 0, None
    else:
        log.info("%s / %s / %s (seed %d): %s", target, regime, arm.name, seed, command)
        run_process(shlex.split(command), runs / where, threads)
        out = json.loads((runs / where / "test_metrics.json").read_text())
        metrics, epochs, peak = out["metrics"], out["epochs_trained"] if arm.kind == "fit" else 0, out.get("peak_rss_mb")
    record = {"command": command, "defaults": DEFAULTS_VERSION, "configs": config_digests(command),
              "target": target, "regime": regime, "arm": arm.name,
              "seed": seed, "wall_s": round(time.perf_counter() - start, 1), "epochs": epochs, "peak_rss_mb": peak,
              "metrics": {k: round(v, 6) for k, v in metrics.items()}}
    atomic_write_bytes(result_path, json.dumps(record, indent=1).encode())
    log.info("%s / %s / %s (seed %d): N@10 %.4f", target, regime, arm.name, seed, metrics["ndcg@10"])
    return record


def main(argv: list[str] | None = None) -> None:
    """``unisrec-x experiment transfer``: pretrain, run every (target, regime, arm, seed), report."""
    parser = argparse.ArgumentParser(prog="unisrec-x experiment transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", help="target datasets: a path prefix under the data root or a "
                        f"source name (default: {' '.join(DEFAULT_TARGETS)}; --quick: {' '.join(QUICK_TARGETS)})")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES),
                        help=f"default: all; --quick: {' '.join(QUICK_REGIMES)}".replace("%", "%%"))
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS], help="run only these arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the few-shot regimes")
    parser.add_argument("--full_seeds", type=int, nargs="+", default=[1], help="seeds of the 100%% regime")
    parser.add_argument("--quick", action="store_true", help="a small real run: 1,500 users per source, 2,000 of the target, 3 validations per fit, 1 seed")
    parser.add_argument("--jobs", type=int, default=1, help="arms run at once")
    parser.add_argument("--threads", type=int, help="torch threads per arm (default: cores / jobs)")
    parser.add_argument("--data_root", help="folder holding the datasets (default $UNISREC_X_DATA_ROOT or ../shared/data)")
    parser.add_argument("--results", help="result files (default results/transfer, or results/transfer-quick)")
    parser.add_argument("--runs", default="runs/experiments/transfer", help="run folders: logs and checkpoints")
    parser.add_argument("--report", default="results", help="where transfer.json/.md and the plots go")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: report the finished arms of this plan and count the pending ones")
    args = parser.parse_args(argv)
    quick = args.quick
    targets = args.targets or (QUICK_TARGETS if quick else DEFAULT_TARGETS)
    regimes = args.regimes or (QUICK_REGIMES if quick else list(REGIMES))
    suffix = "-quick" if quick else ""
    results = Path(args.results or f"results/transfer{suffix}")
    runs = Path(args.runs + suffix)
    seeds, full_seeds = ([args.seeds[0]], [args.seeds[0]]) if quick else (args.seeds, args.full_seeds)
    arms = [a for a in ARMS if (a.name in args.arms if args.arms else a.in_quick or not quick)]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    pretraining = None
    if any(a.pretrained for a in arms):
        pretraining = pretrain(results, runs, seeds[0], quick, args.data_root, (os.cpu_count() or 1), args.report_only)
    weights = pretraining["weights"] if pretraining else None
    if weights is None:  # report_only before pretraining finished: its arms are all pending
        arms = [a for a in arms if not a.pretrained]
    jobs = []
    for regime in regimes:  # regime-major: both targets' zero-shot and few-shot rows come first
        for target in targets:
            share = REGIMES[regime]
            users = (user_sample(target, share, results, args.data_root, QUICK_USERS if quick else None)
                     if 0 < share < 1 else None)
            for arm in arms:
                if regime not in arm.regimes:
                    continue
                for seed in (full_seeds if share == 1 else seeds if share > 0 and arm.kind == "fit" else [seeds[0]]):
                    jobs.append((arm, target, regime, seed, users))
    records = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, arm, target, regime, seed, results, runs, users, weights, quick, args.data_root,
                               threads, args.report_only) for arm, target, regime, seed, users in jobs]
        for future in futures:
            records.append(future.result())
    pending = sum(r is None for r in records)
    if pending:
        log.warning("%d of %d runs of this plan are not finished yet; the report holds the others", pending, len(records))
    report([r for r in records if r is not None], ARMS, REGIMES, targets, regimes, pretraining, LONG_TAIL_MAX_COUNT,
           Path(args.report), suffix)
