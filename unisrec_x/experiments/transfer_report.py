"""The transfer benchmark's report: finished result records -> ``transfer.json`` rows, tables, one plot per target.

Kept apart from the runner (``unisrec_x.experiments.transfer``): it only reads records, so ``--report_only``
and a finished run make the same report from the same files.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from pathlib import Path
from typing import Mapping, Sequence

from unisrec_x.experiments.arms import REGIMES
from unisrec_x.experiments.records import validation_users
from unisrec_x.experiments.runner import REPORTED, summarise
from unisrec_x.experiments.transfer_goals import goals, goals_markdown
from unisrec_x.runtime.paths import atomic_write_bytes

SLICES = (("all", ""), ("long-tail", "long_tail/"))


#: A target written as ``/``-separated names of letters, digits, ``_`` and inner dots: its ``/`` becomes ``-``
#: and nothing else changes, so ``-`` in the folder name can only stand for ``/`` (injective).
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*(/[A-Za-z0-9_][A-Za-z0-9_.]*)*")


def slug(text: str) -> str:
    """A target's folder name, one per target: ``scientific/Scientific`` -> ``scientific-Scientific``, ``office`` ->
    ``office`` (the names committed results live under); any other spelling (``d-crlf``, ``/abs/path``) is
    sanitised and suffixed ``--`` + a hash of the exact text, which a plain name's slug never contains."""
    if _PLAIN.fullmatch(text):
        return text.replace("/", "-")
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("%", "pct")).strip("-.") or "target"
    return f"{readable}--{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def regime_slug(regime: str) -> str:
    """A regime's folder name (regimes are a fixed set): ``5%`` -> ``5pct``, ``zero-shot`` -> ``zero-shot``."""
    return regime.replace("%", "pct")


#: How validation users were chosen, by the value records carry (records before issue 28 carry none: ``all``).
PROTOCOLS = {"sampled": "few-shot fits and knobs are selected on the sampled users' validation rows only (a few-shot "
                        "user has only their labels); every user is tested",
             "all": "selected on every user's validation rows; every user is tested"}


def load_records(results: Path) -> list[dict]:
    """Every result record under ``results`` (``<target>/<regime>/<arm>/seed<N>.json``): a report is rebuilt from
    all of them, so a run of part of the plan (one target, arm or seed) never drops the other rows."""
    records = []
    for path in sorted(results.glob("*/*/*/seed*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and {"target", "regime", "arm", "seed", "metrics"} <= set(record):
            records.append(record)
    return records


def validation_score(record: dict) -> float | None:
    """The validation N@10 a record was chosen on: a fit's best epoch (``best_validation``) or, where the model
    carries the floor, its blend's; the floor's chosen knobs on its grid; ``None`` for records that keep none
    (baselines without knobs, records made before)."""
    blend = (record.get("floor_blend") or {}).get("validation_ndcg@10") or {}
    if "blend" in blend:
        return blend["blend"]
    best = record.get("best_validation") or {}
    if "val/ndcg@10" in best:
        return best["val/ndcg@10"]
    knobs, grid = record.get("knobs"), record.get("validation_ndcg@10")
    if isinstance(knobs, dict) and isinstance(grid, dict):
        return grid.get(f"decay={knobs.get('decay')} beta={knobs.get('beta')}")
    return None


def on_rows_apart(record: dict) -> bool:
    """Whether a record's validation score is on part of the regime's validation rows (a blend chosen on rows
    kept apart from early stopping), so it cannot be compared with scores on all of them."""
    return str((record.get("floor_blend") or {}).get("chosen_on", "")).startswith("validation rows kept apart")


def rows_of(records: list[dict], arms: Sequence) -> list[dict]:
    """One row per (target, regime, arm, validation protocol, slice): mean and std over seeds of each reported
    metric, with the commits that made the seeds (``mixed_commits`` when they differ or are unknown, or when any seed
    was made on a checkout with uncommitted changes or by stages on different commits: ``dirty``)."""
    label = {a.name: a.label for a in arms}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["target"], r["regime"], r["arm"], r.get("validation_users", "all")), []).append(r)
    rows = []
    for (target, regime, arm, validation), runs in groups.items():
        stats = summarise(runs)
        commits = sorted({r.get("commit") or "unknown" for r in runs} | ({"dirty"} if any(r.get("dirty") for r in runs) else set()))
        for slice_name, prefix in SLICES:
            row = {"target": target, "regime": regime, "arm": arm, "label": label.get(arm, arm), "slice": slice_name,
                   "validation_users": validation, "seeds": sorted(r["seed"] for r in runs), "commits": commits,
                   "mixed_commits": "dirty" in commits or (len(runs) > 1 and (len(commits) > 1 or commits == ["unknown"]))}
            if prefix:
                counts = {r["metrics"].get("long_tail/rows") for r in runs}
                row["rows"] = int(counts.pop()) if len(counts) == 1 and None not in counts else None
                if not row["rows"]:
                    continue
            for metric in REPORTED:
                row[f"{metric}_mean"] = stats[prefix + metric]["mean"]
                row[f"{metric}_std"] = stats[prefix + metric]["std"]
            validations = [validation_score(r) for r in runs]
            if slice_name == "all" and None not in validations:  # what selection saw, beside what test says
                row["validation_ndcg@10_mean"] = round(statistics.fmean(validations), 6)
                if any(on_rows_apart(r) for r in runs):  # not comparable with the other arms' scores
                    row["validation_rows"] = "apart"
            rows.append(row)
    return rows


def current_rows(rows: list[dict]) -> list[dict]:
    """The rows of today's validation protocol (few-shot: the sampled users'; otherwise every user's)."""
    return [r for r in rows if r["validation_users"] == validation_users(r["regime"])]


def markdown(rows: list[dict], arms: Sequence, targets: list[str], regimes: list[str], max_count: int,
             entries: list[dict]) -> str:
    """Per target and slice: arms down (in ``arms``' order), regimes across, N@10 (mean ± std over seeds); rows
    of the current validation protocol, the goals against the floor (``entries``, of ``transfer_goals.goals``),
    then any few-shot rows of the earlier protocol in their own tables."""
    current = current_rows(rows)
    earlier = [r for r in rows if r not in current]
    out = _tables(current, arms, targets, regimes, max_count, "")
    if any(r["mixed_commits"] for r in current):
        out.append("† seeds made by different commits of the package (or by an unknown one, before records named it), "
                   "or a result of no single clean commit (uncommitted changes, or stages on different commits).\n")
    if entries:
        out.append(goals_markdown(entries, arms))
    if earlier:
        out.append("## Few-shot rows under the earlier protocol (selected on every user's validation rows)\n")
        out += _tables(earlier, arms, targets, [r for r in regimes if r in ("5%", "20%")], max_count, " (earlier protocol)")
    return "\n".join(out)


def _tables(rows: list[dict], arms: Sequence, targets: list[str], regimes: list[str], max_count: int, heading: str) -> list[str]:
    out = []
    for target in targets:
        if not any(r["target"] == target for r in rows):
            continue
        for slice_name, _ in SLICES:
            title = "all test users" if slice_name == "all" else f"long-tail (target a training target <= {max_count} times)"
            out += [f"### {target}, {title}{heading}", "", "| arm | " + " | ".join(f"N@10 {r}" for r in regimes) + " |",
                    "|---|" + "---|" * len(regimes)]
            cells: dict[str, dict[str, str]] = {}
            for row in rows:
                if row["target"] == target and row["slice"] == slice_name:
                    std = f" ± {row['ndcg@10_std']:.4f}" if len(row["seeds"]) > 1 else ""
                    mark = " †" if row["mixed_commits"] else ""
                    cells.setdefault(row["arm"], {})[row["regime"]] = f"{row['ndcg@10_mean']:.4f}{std}{mark}"
            for arm in arms:
                if arm.name in cells:
                    out.append(f"| {arm.label} | " + " | ".join(cells[arm.name].get(r, "") for r in regimes) + " |")
            out.append("")
    return out


def plot(rows: list[dict], arms: Sequence, shares: Mapping[str, float], target: str, path: Path) -> None:
    """N@10 against the share of target training data, one line per arm, seeds' std as error bars."""
    from unisrec_x.experiments import plots

    # a colour per arm by its place in ``arms``, so an arm looks the same in every target's plot even
    # where some arms have no rows; square markers set the pretrained arms apart from their scratch twins
    colours = plots.palette()
    fig, ax = plots.new_axes()
    for i, arm in enumerate(arms):
        mine = sorted((shares[r["regime"]], r) for r in rows
                      if r["target"] == target and r["arm"] == arm.name and r["slice"] == "all")
        if not mine:
            continue
        ax.errorbar([x * 100 for x, _ in mine], [r["ndcg@10_mean"] for _, r in mine],
                    yerr=[r["ndcg@10_std"] for _, r in mine], capsize=3, label=arm.label,
                    color=colours[i % len(colours)], marker="s" if arm.pretrained else "o",
                    linestyle="-" if arm.kind in ("fit", "test") else "--")
    ax.set_xscale("symlog", linthresh=5)
    ax.set_xticks([0, 5, 20, 100], ["0 (zero-shot)", "5%", "20%", "100%"])
    plots.save(fig, ax, path, "share of the target's training users", "test NDCG@10 (full ranking)", f"Transfer to {target}")


def report(records: list[dict], arms: Sequence, shares: Mapping[str, float], targets: list[str], regimes: list[str],
           pretraining: dict | None, max_count: int, out: Path, suffix: str, note: str = "") -> None:
    """``transfer.json`` (rows + the pretraining record), ``transfer.md`` and one plot per target; ``note`` (what
    a reduced run is) heads the printed and written tables, so they are not read as the full benchmark's."""
    rows = rows_of(records, arms)
    entries = goals(current_rows(rows), arms, targets, regimes)
    atomic_write_bytes(out / f"transfer{suffix}.json", json.dumps(
        {"experiment": "transfer", "date": time.strftime("%Y-%m-%d"), "targets": targets, "regimes": regimes,
         "protocol": {"validation_users": PROTOCOLS, "current": {regime: validation_users(regime) for regime in REGIMES}},
         "long_tail_max_count": max_count, "rows": rows, "goals": entries,
         "pretraining": pretraining,
         **({"note": note} if note else {})}, indent=1).encode())
    table = markdown(rows, arms, targets, regimes, max_count, entries)
    if note:
        table = f"{note}\n\n{table}"
    atomic_write_bytes(out / f"transfer{suffix}.md", (table + "\n").encode())
    for target in targets:
        plot(current_rows(rows), arms, shares, target, out / f"transfer{suffix}-{slug(target)}.png")
    print(table)
