"""``unisrec-x experiment foundation|schemes``: Scientific arms from scratch, one after another, in a table.

Each arm runs through ``runner.run_process`` (a fresh process per arm); finished arms are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from unisrec_x.experiments.runner import DEFAULTS_VERSION, REPORTED, run_process, seed_number, summarise
from unisrec_x.runtime.paths import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class Arm:
    """One row of the table: a name, a label and the ``unisrec-x fit`` arguments that train it."""

    name: str
    label: str
    args: list[str]
    quick_args: list[str] = field(default_factory=list)
    subcommand: str = "fit"


FOUNDATION = [
    Arm("sasrec", "SASRec-ID", ["-c", "configs/scientific/sasrec.yaml"]),
    Arm("unisrec_inductive", "UniSRec inductive (text), from scratch", ["-c", "configs/scientific/unisrec_inductive.yaml"]),
    Arm("unisrec_transductive", "UniSRec transductive (text + ID), from scratch", ["-c", "configs/scientific/unisrec_transductive.yaml"]),
]
_POSITIONS, _PREFIXES = ["--data.training_examples", "positions"], ["--data.training_examples", "prefixes"]
#: Issue 13: one pass per sequence (every position a target) vs one example per prefix; bucketing on vs off.
SCHEMES = [
    Arm("sasrec_prefixes", "SASRec-ID, one example per prefix (previous default: 50-batch pools)",
        ["-c", "configs/scientific/sasrec.yaml", *_PREFIXES, "--data.bucket_pool_batches", "50"]),
    Arm("sasrec_positions", "SASRec-ID, every position of a sequence in one pass",
        ["-c", "configs/scientific/sasrec.yaml", *_POSITIONS]),
    Arm("sasrec_positions_unbucketed", "SASRec-ID, positions, no length bucketing",
        ["-c", "configs/scientific/sasrec.yaml", *_POSITIONS, "--data.length_bucketing", "false"]),
    Arm("transductive_prefixes", "UniSRec transductive, one example per prefix (previous default: 50-batch pools)",
        ["-c", "configs/scientific/unisrec_transductive.yaml", *_PREFIXES, "--data.bucket_pool_batches", "50"]),
    Arm("transductive_positions", "UniSRec transductive, every position in one pass",
        ["-c", "configs/scientific/unisrec_transductive.yaml", *_POSITIONS]),
]
EXPERIMENTS = {"foundation": FOUNDATION, "schemes": SCHEMES}  # and "transfer": unisrec_x.experiments.transfer
#: ``--quick``: real data, smaller: the first 3,000 Scientific users (their items only) and at most 6 epochs.
QUICK_ARGS = ["--trainer.max_epochs", "6", "--data.max_users", "3000"]
QUICK_TEST_ARGS = ["--data.max_users", "3000"]


def arm_command(arm: Arm, seed: int, out_dir: Path, quick: bool, data_root: str | None) -> list[str]:
    args = list(arm.args)
    cmd = ["unisrec-x", arm.subcommand, *args, "--seed_everything", str(seed),
           "--trainer.logger.init_args.save_dir", str(out_dir), "--trainer.logger.init_args.name", arm.name,
           "--trainer.logger.init_args.version", f"seed{seed}", "--trainer.enable_progress_bar", "false"]
    if quick:  # later flags override earlier ones
        cmd += (arm.quick_args or QUICK_ARGS) if arm.subcommand == "fit" else QUICK_TEST_ARGS
    if data_root:
        cmd += ["--data.data_root", data_root]
    return cmd


def run_arm(arm: Arm, seed: int, out_dir: Path, quick: bool, data_root: str | None) -> dict:
    """Train and test one arm in a fresh process; return its metrics, wall time and command."""
    cmd = arm_command(arm, seed, out_dir, quick, data_root)
    run_dir = out_dir / arm.name / f"seed{seed}"
    done_marker = run_dir / "finished.json"
    finished = json.loads(done_marker.read_text()) if done_marker.exists() else {}
    if finished.get("command") == shlex.join(cmd) and finished.get("defaults", 1) == DEFAULTS_VERSION:
        log.info("%s (seed %d): reusing the finished run in %s", arm.label, seed, run_dir)
        wall = finished["wall_s"]
    else:
        log.info("%s (seed %d): %s", arm.label, seed, shlex.join(cmd))
        wall = run_process(cmd, run_dir)
        atomic_write_bytes(done_marker, json.dumps({"command": shlex.join(cmd), "wall_s": round(wall, 1),
                                                    "defaults": DEFAULTS_VERSION}).encode())
    result = json.loads((run_dir / "test_metrics.json").read_text())
    return {"metrics": result["metrics"], "wall_s": round(wall, 1), "fit_s": result["fit_seconds"],
            "epochs": result["epochs_trained"] if arm.subcommand == "fit" else 0, "command": shlex.join(cmd),
            "peak_rss_mb": result.get("peak_rss_mb"),
            "log": str(run_dir / "metrics.csv")}


def markdown_table(results: dict) -> str:
    head = "| arm | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in REPORTED) + " | epochs | wall (s) |"
    lines = [head, "|" + "---|" * (len(REPORTED) + 3)]
    for arm in results["arms"].values():
        cells = []
        for m in REPORTED:
            stat = arm["summary"][m]
            cells.append(f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if len(arm["runs"]) > 1 else ""))
        epochs = "/".join(str(r["epochs"]) for r in arm["runs"])
        wall = "/".join(f"{r['wall_s']:.0f}" for r in arm["runs"])
        lines.append(f"| {arm['label']} | " + " | ".join(cells) + f" | {epochs} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``unisrec-x experiment NAME``: run every arm for each seed, write ``results/NAME.{json,md}``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="unisrec-x experiment", description=main.__doc__)
    parser.add_argument("name", choices=sorted([*EXPERIMENTS, "transfer"]), help="transfer: see `unisrec-x experiment transfer --help`")
    parser.add_argument("--quick", action="store_true", help=f"smaller real run ({' '.join(QUICK_ARGS)}) that finishes in minutes")
    parser.add_argument("--seeds", type=seed_number, nargs="+", default=[2022])
    parser.add_argument("--arms", nargs="+", help="run only these arms")
    parser.add_argument("--data_root", help="folder holding the datasets (default $UNISREC_X_DATA_ROOT or ../shared/data)")
    parser.add_argument("--runs", default="runs/experiments", help="where run logs and checkpoints go")
    parser.add_argument("--out", default="results", help="where NAME.json and NAME.md go")
    args = parser.parse_args(argv)
    arms = [a for a in EXPERIMENTS[args.name] if not args.arms or a.name in args.arms]
    # Runs are keyed by arm, not by experiment: foundation and transfer share their from-scratch arms,
    # and a finished arm with the same command is reused rather than trained again.
    run_root = Path(args.runs) / ("quick" if args.quick else "full")
    dataset = "Scientific test split" + (", first 3,000 users (quick)" if args.quick else "")
    results = {"experiment": args.name, "quick": args.quick, "seeds": args.seeds, "dataset": dataset,
               "date": time.strftime("%Y-%m-%d"), "arms": {}}
    for arm in arms:
        runs = [run_arm(arm, seed, run_root, args.quick, args.data_root) for seed in args.seeds]
        results["arms"][arm.name] = {"label": arm.label, "summary": summarise(runs), "runs": runs}
        log.info("%s: %s", arm.label, {m: results["arms"][arm.name]["summary"][m]["mean"] for m in REPORTED})
    out = Path(args.out)
    suffix = "-quick" if args.quick else ""
    atomic_write_bytes(out / f"{args.name}{suffix}.json", json.dumps(results, indent=2).encode())
    table = markdown_table(results)
    atomic_write_bytes(out / f"{args.name}{suffix}.md", (table + "\n").encode())
    plot_validation_curves(results, out / f"{args.name}{suffix}.png")
    print(table)


def plot_validation_curves(results: dict, path: Path) -> None:
    """Validation NDCG@10 per epoch for each trained arm (first seed), one line each."""
    import csv

    from unisrec_x.experiments import plots

    fig, ax = plots.new_axes()
    for arm in results["arms"].values():
        run = arm["runs"][0]
        if not run.get("epochs"):
            ax.axhline(run["metrics"]["ndcg@10"], linestyle=":", color="grey", label=arm["label"] + " (test)")
            continue
        rows = [r for r in csv.DictReader(open(run["log"])) if r.get("val/ndcg@10")]
        ax.plot([int(r["epoch"]) + 1 for r in rows], [float(r["val/ndcg@10"]) for r in rows], marker=".", label=arm["label"])
    plots.save(fig, ax, path, "epoch", "validation NDCG@10",
               f"Scientific, {results['experiment']}{' (quick)' if results['quick'] else ''}")
