"""Resuming a run folder's fit where a kill cut it, instead of starting it again.

A benchmark arm at full data trains for most of an hour and a pretraining for longer; a session's end, a
reboot or an out-of-memory kill used to throw all of it away, because the runner emptied the folder and
started over. Each run folder now keeps a stamp (``run.json``: the command and the code that started it).
A runner that finds the same command, the same commit, a clean checkout and a readable ``last.ckpt``
hands that checkpoint to the fit (``--ckpt_path``, which resumes exactly: tests/test_reliability.py);
anything else starts afresh. A stamp saying the run finished means it is not run again at all.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import time
from pathlib import Path

from unisrec_x.runtime.paths import atomic_write_bytes, leftover_siblings

RUN_STAMP = "run.json"
LAST = Path("checkpoints") / "last.ckpt"
#: Lightning's CSV logger empties ``metrics.csv`` when it starts; a resumed run's earlier rows are kept here.
METRICS_PART = "metrics.part{}.csv"


def read_stamp(run_dir: Path) -> dict | None:
    try:
        stamp = json.loads((run_dir / RUN_STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def write_stamp(run_dir: Path, stamp: dict) -> None:
    atomic_write_bytes(run_dir / RUN_STAMP, json.dumps(stamp, indent=1).encode())


def new_stamp(cmd: list[str], code: dict) -> dict:
    return {"command": shlex.join(cmd), "commit": code.get("commit"), "dirty": code.get("dirty"), "parts": []}


def same_run(stamp: dict | None, cmd: list[str], code: dict) -> bool:
    """Whether ``stamp`` was made by this very command on this very code (a clean checkout of a known commit:
    a run that spans code changes would report numbers no commit made)."""
    return (stamp is not None and stamp.get("command") == shlex.join(cmd) and code.get("commit") is not None
            and code.get("dirty") is False and stamp.get("commit") == code["commit"] and stamp.get("dirty") is False)


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint resumes at, ``None`` where it does not load (a kill during its write leaves
    a truncated file: then the run starts afresh)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any failure to read means: not a checkpoint to resume from
        return None
    if not isinstance(state, dict) or "state_dict" not in state:
        return None
    return int(state.get("global_step", 0))


def heartbeat(run_dir: Path, stamp: dict, elapsed_s: float) -> None:
    """Note in the stamp how long the running part has run: a kill leaves no other trace of it (a fit writes
    its log at its start and end only)."""
    stamp["parts"][-1]["alive_s"] = round(elapsed_s, 1)
    write_stamp(run_dir, stamp)


def cut_part_seconds(run_dir: Path, part: dict) -> float:
    """How long a part that was cut ran: its last heartbeat, or the newest write in its folder (a checkpoint,
    a metrics row) if that is later."""
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and p.name != RUN_STAMP),
                 default=part["started"])
    return round(max(0.0, part.get("alive_s", 0.0), newest - part["started"]), 1)


def prepare_resume(run_dir: Path, stamp: dict) -> None:
    """Set the folder up to resume from its last checkpoint: the interrupted part's time goes into the stamp,
    its metrics rows into a part file, and a checkpoint write it left half done is removed."""
    parts = stamp.setdefault("parts", [])
    if parts and "wall_s" not in parts[-1]:
        parts[-1]["wall_s"] = cut_part_seconds(run_dir, parts[-1])
    if (run_dir / "metrics.csv").is_file():
        os.replace(run_dir / "metrics.csv", run_dir / METRICS_PART.format(len(parts)))
    for leftover in leftover_siblings(run_dir / LAST.parent):  # a checkpoint write the kill cut short
        leftover.unlink()


def start_part(run_dir: Path, stamp: dict, resumed_at_step: int | None = None) -> None:
    part = {"started": time.time()}
    if resumed_at_step is not None:
        part["resumed_at_step"] = resumed_at_step
    stamp.setdefault("parts", []).append(part)
    write_stamp(run_dir, stamp)


def finish(run_dir: Path, stamp: dict, wall_s: float) -> float:
    """Mark the run finished, with the files it left at the top of its folder (``outputs_present``); the wall
    seconds of all its parts."""
    stamp["parts"][-1]["wall_s"] = round(wall_s, 1)
    stamp["finished"] = True
    stamp["outputs"] = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.name != RUN_STAMP)
    stamp["wall_s"] = round(sum(p.get("wall_s", 0.0) for p in stamp["parts"]), 1)
    write_stamp(run_dir, stamp)
    return stamp["wall_s"]


def outputs_present(run_dir: Path, stamp: dict) -> bool:
    """Whether a finished run's files are all still there: one whose results a user removed (to run it again)
    runs again instead of failing on the missing file."""
    return all((run_dir / name).is_file() for name in stamp.get("outputs", []))


def metrics_rows(run_dir: Path) -> list[dict]:
    """Every logged row of a run, resumed or not: each interrupted part's rows up to the step the next part
    resumed at (what it logged after its last checkpoint was redone by the next part)."""
    parts = (read_stamp(run_dir) or {}).get("parts", [])
    files = [(run_dir / METRICS_PART.format(n), parts[n].get("resumed_at_step") if n < len(parts) else None)
             for n in range(1, len(parts))]
    rows = []
    for path, cut in [*files, (run_dir / "metrics.csv", None)]:
        if path.is_file():
            with open(path, newline="") as handle:
                rows += [r for r in csv.DictReader(handle)
                         if cut is None or not r.get("step") or int(r["step"]) < cut]
    return rows
