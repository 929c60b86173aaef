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
import functools
import json
import logging
import os
import random
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from unisrec_x.errors import DataError
from unisrec_x.evaluation.baselines import FLOOR_BETAS, FLOOR_DECAYS
from unisrec_x.experiments import runner
from unisrec_x.experiments.arms import ARMS, BASELINES, REGIMES, Arm
from unisrec_x.experiments.pretraining import (PRETRAIN_ARGS, QUICK_PRETRAIN_FLAGS, best_checkpoint, pretrain,
                                               step_weights)
from unisrec_x.experiments.records import config_digests, finished, validation_users
from unisrec_x.experiments.runner import (DEFAULTS_VERSION, REPO_ROOT, config_paths, one_code, positive_int,
                                          resolve_config, run_process, seed_number, stamped_code, with_flags)
from unisrec_x.experiments.transfer_report import load_records, regime_slug, report, slug
from unisrec_x.runtime.paths import atomic_write_bytes, resolve_data_path

log = logging.getLogger(__name__)
DEFAULT_TARGETS = ["scientific/Scientific", "office"]
LONG_TAIL_MAX_COUNT = 5
#: the CLI's default max_epochs (cli.trainer_defaults), stretched by the validation interval in few-shot regimes
MAX_EPOCHS = 300
#: --quick (the README's main job, ~15 minutes on 2 cores with the set-up): the first QUICK_USERS users of one
#: target, zero-shot and all of those users training, one seed, and the arms that carry the full benchmark's
#: findings: the two baselines, zero-shot, and text + codes from scratch and pretrained (the best arm on either side),
#: run side by side. Its fits stop as the full benchmark's do, by early stopping on validation N@10 (a cap of 3
#: validations left every trained arm below text-kNN), with the patience cut to what the slice needs: an epoch is ~6
#: steps, and the scratch text model's validation score dips for 4 validations before it climbs (patience 4 kept its
#: first epoch), while 10 spends ~30 more epochs on a plateau that creeps up by noise-sized steps.
QUICK_USERS = 2000
QUICK_PATIENCE = 6
QUICK_TARGETS, QUICK_REGIMES = ["scientific/Scientific"], ["zero-shot", "100%"]


def sample_path(target: str, share: float, results: Path) -> Path:
    """Where the few-shot sample of ``share`` of ``target``'s users is recorded."""
    return results / slug(target) / f"users-{share:.0%}.txt".replace("%", "pct")


def user_sample(target: str, share: float, results: Path, data_root: str | None, max_users: int | None = None) -> Path:
    """The recorded few-shot sample: ``share`` of the target's users, drawn once (seed 0) and kept.

    An existing file is reused as it is, so every arm, seed and later session trains on the same users.
    """
    path = sample_path(target, share, results)
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


def from_pretraining(args: list[str], pretraining: dict | None) -> list[str]:
    """An arm's words with what the pretraining record says filled in: ``{pretrained}`` (its weights),
    ``{pretrained_step:N}`` (the weights it kept at step N: ``--keep_every_n_steps``, ``step_weights``) and ``{sources}`` (the
    datasets it trained on, as a YAML list), so no arm names them itself."""
    if not any("{pretrained" in a or "{sources}" in a for a in args):
        return list(args)
    if pretraining is None:
        raise ValueError("this arm starts from the pretraining, and there is none yet")
    sources = "[" + ",".join(pretraining["sources"]) + "]"
    out = []
    for word in args:
        kept = re.fullmatch(r"\{pretrained_step:(\d+)\}", word)
        if kept:  # a pretraining that stopped before that step fails the fit: "checkpoint not found", naming it
            word = str(step_weights(Path(pretraining["weights"]), kept.group(1)))
        out.append(word.replace("{pretrained}", str(pretraining["weights"])).replace("{sources}", sources))
    return out


def arm_command(arm: Arm, target: str, regime: str, seed: int, run_dir: Path, users: Path | None,
                pretraining: dict | None, quick: bool, data_root: str | None) -> list[str]:
    """The exact ``unisrec-x`` command of a trained arm (its key in the results folder)."""
    cmd = ["unisrec-x", arm.kind, *from_pretraining(arm.args, pretraining), "--data.dataset", target,
           "--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(run_dir.parent),
           "--trainer.logger.init_args.name", ".", "--trainer.logger.init_args.version", run_dir.name,
           "--trainer.enable_progress_bar", "false"]
    flags = {}
    if users is not None:
        flags["--data.train_users"] = str(users)
    if arm.kind == "fit":
        interval = validation_interval(regime)
        if interval > 1:  # as many validations (so as much patience) as a full-data run may make
            flags["--trainer.check_val_every_n_epoch"] = str(interval)
            flags["--trainer.max_epochs"] = str(MAX_EPOCHS * interval)
        if quick:
            flags["--patience"] = str(QUICK_PATIENCE)
    if quick:
        flags["--data.max_users"] = str(QUICK_USERS)
    if data_root:
        flags["--data.data_root"] = data_root
    return with_flags(cmd, flags)


def baseline(arm: Arm, target: str, regime: str, users: Path | None, quick: bool, data_root: str | None,
             pretraining: dict | None = None) -> tuple[dict, dict]:
    """Popularity, text-kNN or the floor on the target's test split, with the long-tail slice, in this
    process; and what was chosen on validation (the floor's knobs), for the record."""
    from unisrec_x.data.datamodule import SeqRecDataModule
    from unisrec_x.evaluation.baselines import floor, popularity, text_knn, training_counts

    data = SeqRecDataModule(target, data_root=data_root, train_users=None if users is None else str(users),
                            max_users=QUICK_USERS if quick else None, **data_settings(arm))
    targets = data.examples("train").targets
    counts = training_counts(targets, data.num_items)
    long_tail = (counts, LONG_TAIL_MAX_COUNT)
    test = data.test_dataloader()
    if arm.kind == "popularity":
        return popularity(targets, data.num_items, test, long_tail=long_tail), {}
    if arm.kind == "text_knn":
        return text_knn(data.item_features, test, long_tail=long_tail), {}
    knobs, chosen = floor_knobs(data, counts, regime, quick, data_root, pretraining, data_settings(arm))
    return floor(data.item_features, None if regime == "zero-shot" else counts, test, knobs, long_tail=long_tail), chosen


def data_settings(arm: Arm) -> dict[str, str]:
    """A baseline arm's DataModule settings, from its ``--data.NAME VALUE`` pairs."""
    if len(arm.args) % 2 or not all(flag.startswith("--data.") for flag in arm.args[::2]):
        raise ValueError(f"baseline arm {arm.name}: args must be --data.NAME VALUE pairs, got {arm.args}")
    return {flag.removeprefix("--data."): value for flag, value in zip(arm.args[::2], arm.args[1::2])}


def floor_knobs(data, counts: torch.Tensor, regime: str, quick: bool, data_root: str | None,
                pretraining: dict | None, settings: dict[str, str] | None = None) -> tuple:
    """The floor's knobs, chosen on validation rows a user of the regime has: the regime's own (few-shot: the
    sampled users'); zero-shot has no target labels, so the decay is chosen on the pretraining sources'
    validation rows and there is no popularity prior (no target counts)."""
    from unisrec_x.evaluation.baselines import floor_grid

    if regime != "zero-shot":
        knobs, scores = floor_grid(data.item_features, counts, list(data.val_dataloader()))
        where = f"validation rows of the {validation_users(regime)} users of the target"
    else:
        sources = tuple((pretraining or {}).get("sources") or configured_sources())
        knobs, scores = _sources_floor_grid(sources, quick, data_root, tuple(sorted((settings or {}).items())))
        where = f"validation rows of the pretraining sources {list(sources)}"
    return knobs, {"knobs": knobs._asdict(), "chosen_on": where,
                   "validation_ndcg@10": {f"decay={d} beta={b}": round(v, 6) for (d, b), v in scores.items()}}


def configured_sources() -> list[str]:
    """The sources the pretraining config trains on: the zero-shot floor's when no pretraining ran in this plan."""
    import yaml

    return list(yaml.safe_load(resolve_config(PRETRAIN_ARGS[1]).read_text())["data"]["dataset"])


@functools.lru_cache(maxsize=4)
def _sources_floor_grid(sources: tuple[str, ...], quick: bool, data_root: str | None, settings: tuple) -> tuple:
    """The zero-shot floor's decay grid on the sources' validation rows: the same for every target, so computed
    once per process (loading and ranking ~65k source histories against ~29k items took minutes per target)."""
    from unisrec_x.data.datamodule import SeqRecDataModule
    from unisrec_x.evaluation.baselines import floor_grid

    source_data = SeqRecDataModule(list(sources), data_root=data_root, **dict(settings),
                                   max_users=int(QUICK_PRETRAIN_FLAGS["--data.max_users"]) if quick else None)
    return floor_grid(source_data.item_features, None, list(source_data.val_dataloader()))


def keyed_command(arm: Arm, target: str, regime: str, seed: int, runs: Path, users: Path | None,
                  pretraining: dict | None, quick: bool, data_root: str | None) -> tuple[Path, str, list[list[str]]]:
    """An arm's place (``<target>/<regime>/<arm>/seed<N>``, under the results and the runs folder), the command
    that is its result's key and, for a trained arm, the commands of its stages (``stage_commands``)."""
    where = Path(slug(target)) / regime_slug(regime) / arm.name / f"seed{seed}"
    if arm.kind in BASELINES:
        grid = (f" --decays {' '.join(map(str, FLOOR_DECAYS))} --betas {' '.join(map(str, FLOOR_BETAS))}"
                if arm.kind == "floor" else "")
        return where, (f"baseline {arm.kind}{grid} --data.dataset {target} --data.train_users {users}"
                       + (f" --data.max_users {QUICK_USERS}" if quick else "") + "".join(f" {w}" for w in arm.args)), []
    stages = stage_commands(arm, target, regime, seed, runs / where, users, pretraining, quick, data_root)
    return where, " && ".join(map(shlex.join, stages)), stages


def stage_commands(arm: Arm, target: str, regime: str, seed: int, run_dir: Path, users: Path | None,
                   pretraining: dict | None, quick: bool, data_root: str | None) -> list[list[str]]:
    """A trained arm's commands in order: its first stage (if any, in ``first_stage_dir(run_dir)``) and the fit
    that starts from that stage's checkpoint (``first_stage_checkpoint``)."""
    if not arm.first_stage:
        return [arm_command(arm, target, regime, seed, run_dir, users, pretraining, quick, data_root)]
    stage_dir = first_stage_dir(run_dir)
    first = arm_command(Arm(arm.name, arm.label, arm.first_stage), target, regime, seed, stage_dir, users, pretraining,
                        quick, data_root)
    if arm.first_stage_passes:  # a fixed length: validation cannot stop it
        first = with_flags(first, {"--trainer.max_epochs": str(arm.first_stage_passes * validation_interval(regime)),
                                   "--patience": str(arm.first_stage_passes)})
    last = Arm(arm.name, arm.label, [a.replace("{first_stage}", str(first_stage_checkpoint(arm, stage_dir)))
                                      for a in arm.args])
    return [first, arm_command(last, target, regime, seed, run_dir, users, pretraining, quick, data_root)]


def first_stage_checkpoint(arm: Arm, stage_dir: Path) -> Path:
    """What the arm's fit starts from: a fixed-length first stage's last checkpoint, else its best on
    validation, copied to this fixed name once the stage has run (``keep_first_stage_best``)."""
    return stage_dir / "checkpoints" / ("last.ckpt" if arm.first_stage_passes else "selected.ckpt")


def keep_first_stage_best(stage_dir: Path) -> None:
    """Copy the first stage's ``best_checkpoint`` to ``selected.ckpt``."""
    atomic_write_bytes(stage_dir / "checkpoints" / "selected.ckpt", best_checkpoint(stage_dir).read_bytes())


def first_stage_dir(run_dir: Path) -> Path:
    """Where an arm's first stage runs: beside the arm's own run folder."""
    return run_dir.with_name(f"{run_dir.name}-first-stage")


def run_one(arm: Arm, target: str, regime: str, seed: int, results: Path, runs: Path, users: Path | None,
            pretraining: dict | None, quick: bool, data_root: str | None, threads: int,
            report_only: bool = False, loaded_code: dict | None = None) -> dict | None:
    """One (target, regime, arm, seed): reuse its result file if the command matches, else run it
    (``report_only``: else ``None``). ``loaded_code``: the code this process imported (``main`` notes it when it
    starts), which an in-process baseline runs on whatever the checkout says by then."""
    where, command, stages = keyed_command(arm, target, regime, seed, runs, users, pretraining, quick, data_root)
    result_path = results / where.with_suffix(".json")
    record = finished(result_path, command, regime)
    if record or report_only:
        return record
    start, code, chosen = time.perf_counter(), runner.code_version(), {}
    configs = config_digests(command)  # what the configs meant when the run started, beside the commit it started on
    if arm.kind in BASELINES:
        (metrics, chosen), epochs, peak = baseline(arm, target, regime, users, quick, data_root, pretraining), 0, None
        wall = time.perf_counter() - start
        codes = [code, loaded_code] if loaded_code else [code]  # imported on one commit, run on another: dirty
    else:
        log.info("%s / %s / %s (seed %d): %s", target, regime, arm.name, seed, command)
        wall = 0.0  # every part of every stage: a run resumed across sessions counts the time of each
        codes = []  # the code each stage's fit started on, not the checkout's when the last one ends
        for stage in stages[:-1]:
            wall += run_process(stage, first_stage_dir(runs / where), threads)
            codes.append(stamped_code(first_stage_dir(runs / where), code))
            if not arm.first_stage_passes:
                keep_first_stage_best(first_stage_dir(runs / where))
        wall += run_process(stages[-1], runs / where, threads)
        codes.append(stamped_code(runs / where, code))
        out = json.loads((runs / where / "test_metrics.json").read_text())
        metrics, epochs, peak = out["metrics"], out["epochs_trained"] if arm.kind == "fit" else 0, out.get("peak_rss_mb")
        # what the fit was selected on (the sampled users' rows in few-shot regimes), and a carried floor's choice
        chosen = {key: out[key] for key in ("best_validation", "floor_blend") if out.get(key)}
    record = {"command": command, "defaults": DEFAULTS_VERSION, "configs": configs,
              **one_code(codes), "validation_users": validation_users(regime), **chosen,
              "target": target, "regime": regime, "arm": arm.name,
              "seed": seed, "wall_s": round(wall, 1), "epochs": epochs, "peak_rss_mb": peak,
              "metrics": {k: round(v, 6) for k, v in metrics.items()}}
    atomic_write_bytes(result_path, json.dumps(record, indent=1).encode())
    log.info("%s / %s / %s (seed %d): N@10 %.4f", target, regime, arm.name, seed, metrics["ndcg@10"])
    return record


def check_target(target: str, data_root: str | None) -> None:
    """Refuse a target that names no dataset before anything runs (pretraining alone takes most of an hour).

    A ``..`` in it is refused outright: a target names a dataset under the data root, and its results folder
    must stay inside ``--results``.
    """
    from unisrec_x.data.prepare import SOURCES

    if not target.strip() or ".." in Path(target).parts:
        raise DataError(f"target {target!r} must name a dataset under the data root, without '..' "
                        "(a path prefix such as scientific/Scientific, or a source name such as office)")
    if target in SOURCES:
        return
    prefix = resolve_data_path(target, data_root)
    if not (Path(f"{prefix}.train.inter").is_file() or Path(f"{prefix}.inter").is_file()):
        raise DataError(f"target {target!r} has no interactions: neither {prefix.name}.train.inter nor "
                        f"{prefix.name}.inter exists", prefix.parent)


def check_configs(arms: list[Arm], pretraining: bool) -> None:
    """Every config file the plan reads exists (they are found under the package's checkout, from any folder)."""
    words = [w for a in arms for w in a.args] + (PRETRAIN_ARGS if pretraining else [])
    for name in config_paths(words):
        if not resolve_config(name).is_file():
            raise DataError(f"config file not found under {REPO_ROOT} nor the current folder "
                            "(the transfer benchmark runs from a checkout of unisrec-x: pip install -e)", name)


def quick_note(records: list[dict], targets: list[str]) -> str:
    """What ``--quick``'s table is, said with it: a slice, one seed, a tiny pretraining; the full command."""
    epochs = ", ".join(f"{r['arm']} {r['epochs']}" for r in records if r.get("epochs"))
    return (f"Quick form of the transfer benchmark: the first {QUICK_USERS:,} users of {', '.join(targets)} (100% = all "
            f"of them training, about as many training users as the full benchmark's 20% regime), pretraining "
            f"{QUICK_PRETRAIN_FLAGS['--trainer.max_steps']} steps on the first "
            f"{int(QUICK_PRETRAIN_FLAGS['--data.max_users']):,} users of each source, {sum(a.in_quick for a in ARMS)} "
            f"arms, one seed; every fit early-stops on validation N@10 (patience {QUICK_PATIENCE}) and is tested at its "
            f"best validation. Numbers are for this slice, not the full benchmark's (docs/results.md): on {QUICK_USERS:,} "
            "test users a test N@10 near 0.05 has a standard error of about 0.004, so the gap between trained arms and "
            "text-kNN is resolved here, those among trained arms (pretrained or not) are not. The full benchmark "
            "(Scientific and Office, all users, every arm but the probes, 3 seeds of every fit) is "
            "`unisrec-x experiment transfer` (hours; it continues where it stopped)."
            + (f"\n\nEpochs trained (early stopping): {epochs}." if epochs else ""))


def main(argv: list[str] | None = None) -> None:
    """``unisrec-x experiment transfer``: pretrain, run every (target, regime, arm, seed), report."""
    parser = argparse.ArgumentParser(prog="unisrec-x experiment transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", help="target datasets: a path prefix under the data root or a "
                        f"source name (default: {' '.join(DEFAULT_TARGETS)}; --quick: {' '.join(QUICK_TARGETS)})")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES),
                        help=f"default: all; --quick: {' '.join(QUICK_REGIMES)}".replace("%", "%%"))
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS],
                        help="run only these arms (default: every arm but the probes, which run only when named: "
                        f"{', '.join(a.name for a in ARMS if a.probe)})")
    parser.add_argument("--seeds", type=seed_number, nargs="+", default=[1, 2, 3],
                        help="seeds of the few-shot fits; the first also seeds the pretraining (and so the zero-shot "
                        "arms); a training-free arm runs once")
    parser.add_argument("--full_seeds", type=seed_number, nargs="+", default=[1, 2, 3], help="seeds of the 100%% regime")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small real run: the first {QUICK_USERS:,} users of the target, zero-shot and all of "
                        f"them training, {sum(a.in_quick for a in ARMS)} arms, each fit early-stopped (patience "
                        f"{QUICK_PATIENCE}), one seed, a 40-step pretraining on 1,500 users per source")
    parser.add_argument("--jobs", type=positive_int, default=1, help="arms run at once")
    parser.add_argument("--threads", type=positive_int, help="torch threads per arm (default: cores / jobs)")
    parser.add_argument("--data_root", help="folder holding the datasets (default $UNISREC_X_DATA_ROOT or ../shared/data)")
    parser.add_argument("--results", help="result files (default results/transfer, or results/transfer-quick)")
    parser.add_argument("--runs", default="runs/experiments/transfer", help="run folders: logs and checkpoints")
    parser.add_argument("--report", default="results", help="where transfer.json/.md and the plots go")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing and write nothing but the report: the finished arms of this plan, "
                        "and a count of the pending ones")
    args = parser.parse_args(argv)
    loaded_code = runner.code_version()  # the modules this process runs in-process baselines with
    quick = args.quick
    targets = args.targets or (QUICK_TARGETS if quick else DEFAULT_TARGETS)
    regimes = args.regimes or (QUICK_REGIMES if quick else list(REGIMES))
    suffix = "-quick" if quick else ""
    results = Path(args.results or f"results/transfer{suffix}")
    runs = Path(args.runs + suffix)
    seeds, full_seeds = ([args.seeds[0]], [args.seeds[0]]) if quick else (args.seeds, args.full_seeds)
    # no --arms: the benchmark's arms (probes run only when named)
    arms = [a for a in ARMS if (a.name in args.arms if args.arms else a.in_quick if quick else not a.probe)]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    for target in targets:
        check_target(target, args.data_root)
    check_configs(arms, any(a.pretrained for a in arms))

    # every pretraining the plan's arms start from (a pretraining takes all cores unless --threads says otherwise)
    pretrainings = {variant: pretrain(results, runs, seeds[0], quick, args.data_root, args.threads or os.cpu_count() or 1,
                                      args.report_only, variant)
                    for variant in dict.fromkeys(a.pretraining for a in arms if a.pretrained)}
    # report_only before a pretraining finished: its arms are all pending
    arms = [a for a in arms if not a.pretrained or pretrainings.get(a.pretraining)]
    pretraining = pretrainings.get("")
    jobs = []
    for regime in regimes:  # regime-major: both targets' zero-shot and few-shot rows come first
        for target in targets:
            share = REGIMES[regime]
            users = None
            if 0 < share < 1:  # --report_only names the sample without drawing it: it writes only the report
                users = (sample_path(target, share, results) if args.report_only else
                         user_sample(target, share, results, args.data_root, QUICK_USERS if quick else None))
            for arm in arms:
                if regime not in arm.regimes or (arm.targets is not None and target not in arm.targets):
                    continue
                # a training-free arm draws nothing at random: one record, seed 1, whatever seeds a run names (so a
                # top-up with --seeds 2 3 reuses it); a zero-shot test runs once, on the pretraining of seeds[0]
                for seed in ([1] if arm.kind in BASELINES else [seeds[0]] if arm.kind != "fit" or share == 0
                             else full_seeds if share == 1 else seeds):
                    jobs.append((arm, target, regime, seed, users))
    records = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, arm, target, regime, seed, results, runs, users,
                               pretrainings.get(arm.pretraining) if arm.pretrained else pretraining, quick,
                               args.data_root, threads, args.report_only, loaded_code)
                   for arm, target, regime, seed, users in jobs]
        try:
            for future in futures:
                records.append(future.result())
        except BaseException:  # a refused folder or a failed arm: start nothing more, let the running ones end
            for future in futures:
                future.cancel()
            raise
    pending = sum(r is None for r in records)
    if pending:
        log.warning("%d of %d runs of this plan are not finished yet; the report holds the others", pending, len(records))
    done = [r for r in records if r is not None]
    # the report holds every record under the results folder, not only this plan's
    everything = [r for r in load_records(results) if r["regime"] in REGIMES]
    report_targets = list(dict.fromkeys([*targets, *(r["target"] for r in everything)]))
    report_regimes = [r for r in REGIMES if r in regimes or any(x["regime"] == r for x in everything)]
    report(everything, ARMS, REGIMES, report_targets, report_regimes, pretraining, LONG_TAIL_MAX_COUNT,
           Path(args.report), suffix, note=quick_note(done, targets) if quick else "")
