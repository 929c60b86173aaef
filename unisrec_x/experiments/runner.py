"""Run one ``unisrec-x`` command in its own process and folder, one runner per folder, and summarise seeds.

Shared by every experiment (foundation, schemes, transfer): each arm is a separate process, so arms
cannot leak state (seeds, threads, memory) into one another, and every result has the exact command
that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import unisrec_x
from unisrec_x.experiments import resume
from unisrec_x.runtime.locks import try_lock

log = logging.getLogger(__name__)
REPORTED = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
#: Bumped when a default that arm commands do not spell out changes (2: position-wise training), so a
#: finished run made under other defaults is never reused for the same command line.
DEFAULTS_VERSION = 2



#: Every run folder this runner makes starts with this file; a folder without it is not ours to empty.
RUN_LOG = "stdout.log"
#: how often a running fit's elapsed time is noted in its run folder's stamp (what a resumed run's wall time counts)
HEARTBEAT_S = 60.0
#: The checkout the package runs from: arm commands name their configs relative to it (``configs/...``), so the
#: command (a result's key) reads the same from any folder while the child gets a path that exists.
REPO_ROOT = Path(unisrec_x.__file__).resolve().parents[1]
MAX_SEED = 2**32 - 1  # numpy's (so Lightning's seed_everything's) upper bound


class RunFolderBusy(RuntimeError):
    """Another runner holds the run folder (refused before anything runs: a usage error, not a crash)."""


class ForeignRunFolder(FileExistsError):
    """The run folder holds files the runner did not make; they are left untouched."""


class ArmFailed(RuntimeError):
    """An arm's ``unisrec-x`` process exited non-zero; the message ends with the tail of its log."""


#: Refusals the ``experiment`` command reports in one line with exit status 2 (``cli._experiment``).
REFUSALS = (RunFolderBusy, ForeignRunFolder)


def code_version() -> dict:
    """The commit of the package's checkout and whether its code or configs differ from it (``dirty``: a change
    or a new file), for every result record: a mean over seeds run on different code must be visible as such.
    Result files themselves are not code and do not count; outside a git checkout both are ``None``. Asked
    afresh each time (a few ms): a queue of runs outlives a checkout's state."""
    def git(*words: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *words], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=normal", "--", "unisrec_x", "configs", "pyproject.toml"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def stamped_code(run_dir: Path, fallback: dict) -> dict:
    """The code a run folder's fit started on, from its stamp (``resume.same_run`` let every resumed part run on
    that same commit), so a checkout moved while it trained does not rename the result; ``fallback`` (the code
    asked for before the run) where the folder has no stamp."""
    stamp = resume.read_stamp(run_dir) or {}
    return {"commit": stamp["commit"], "dirty": stamp.get("dirty")} if "commit" in stamp else fallback


def one_code(codes: list[dict]) -> dict:
    """The code of a result made by several runs (an arm's stages): theirs where they agree; else the last one's
    commit, marked ``dirty``, since no single commit made it."""
    commits = {code["commit"] for code in codes}
    dirty = None if any(code["dirty"] is None for code in codes) else any(code["dirty"] for code in codes)
    return {"commit": codes[-1]["commit"], "dirty": True if len(commits) > 1 else dirty}


def resolve_config(path: str) -> Path:
    """A ``-c`` file: absolute as given; relative, under the package's checkout when it is there
    (the benchmark's own ``configs/``), else relative to the current folder."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    shipped = REPO_ROOT / given
    return shipped if shipped.is_file() else given


def config_paths(cmd: list[str]) -> list[str]:
    """The ``-c``/``--config`` values of a command, as written."""
    return [cmd[i + 1] for i, word in enumerate(cmd[:-1]) if word in ("-c", "--config")]


def with_flags(words: list[str], flags: dict[str, str]) -> list[str]:
    """``words`` with each of ``flags`` set once: a flag already there takes the new value in place, others are
    appended. A command states each setting once, so what it means never hangs on "the last one wins"."""
    out = list(words)
    for flag, value in flags.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def runnable(cmd: list[str]) -> list[str]:
    """``cmd`` with its config files resolved (``resolve_config``): what the child process is given."""
    out = list(cmd)
    for i, word in enumerate(cmd[:-1]):
        if word in ("-c", "--config"):
            out[i + 1] = str(resolve_config(cmd[i + 1]))
    return out


def seed_number(text: str) -> int:
    """argparse type of a seed: checked when the command is read, not by a child process minutes later."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to {MAX_SEED}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count (jobs, threads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold ``run_dir`` for one runner: a second experiment started on the same folders (another
    terminal, a second session) would empty a run still writing there. BSD ``flock`` on a lock file
    beside the folder; yields the lock's file descriptor (``None`` where nothing could be locked), which
    ``run_process`` hands to its child, so a killed runner's still-running child keeps the folder held."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "a+") as handle:
        held = try_lock(handle)
        if held is False:
            raise RunFolderBusy(f"{run_dir} is in use by another unisrec-x experiment; wait for it or give --runs "
                                "another folder")
        if held is None:
            log.warning("cannot lock %s (no file locks here); running without the guard against a second runner",
                        run_dir)
            yield None
            return
        yield handle.fileno()


def run_process(cmd: list[str], run_dir: Path, threads: int | None = None) -> float:
    """Run ``cmd`` (a ``unisrec-x`` command) in a fresh process logging to ``run_dir/stdout.log``; wall seconds
    (of every part, where it was resumed).

    ``run_dir`` is this runner's own folder for that run. A run of this very command and code that was cut
    (a kill, a session's end) resumes from its last checkpoint, and one that finished is not run again
    (``experiments/resume.py``); whatever an interrupted or differently configured run left there otherwise
    is removed first (its log last, so a cleanup cut short still marks the folder as the runner's). A
    non-empty folder without the runner's log was made by someone else and is refused. ``threads`` sets
    ``OMP_NUM_THREADS`` for the child.
    """
    with exclusive(run_dir) as lock_fd:
        code = code_version()
        stamp = resume.read_stamp(run_dir) if (run_dir / RUN_LOG).is_file() else None
        if resume.same_run(stamp, cmd, code) and stamp.get("finished") and resume.outputs_present(run_dir, stamp):
            log.info("%s finished before: not run again", run_dir)
            return float(stamp.get("wall_s", 0.0))
        step = (resume.checkpoint_step(run_dir / resume.LAST)
                if resume.same_run(stamp, cmd, code) and (run_dir / resume.LAST).is_file() else None)
        words = runnable(cmd)
        if step is not None:
            log.info("%s: resuming the cut run from %s (step %d)", run_dir, resume.LAST, step)
            resume.prepare_resume(run_dir, stamp)
            words += ["--ckpt_path", str(run_dir / resume.LAST)]
        else:
            if run_dir.exists() and any(run_dir.iterdir()):
                if not (run_dir / RUN_LOG).is_file():
                    raise ForeignRunFolder(f"{run_dir} exists and was not made by unisrec-x experiment (no {RUN_LOG}); "
                                           "refusing to empty it: move it or give --runs another folder")
                for old in sorted(run_dir.rglob("*"), reverse=True):
                    if old != run_dir / RUN_LOG:
                        old.unlink() if old.is_file() or old.is_symlink() else old.rmdir()
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_LOG).write_text("")
            stamp = resume.new_stamp(cmd, code)
        resume.start_part(run_dir, stamp, step)
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        start = time.perf_counter()
        with open(run_dir / RUN_LOG, "a") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "unisrec_x.cli", *words[1:]], stdout=handle,
                                    stderr=subprocess.STDOUT, env=env, pass_fds=() if lock_fd is None else (lock_fd,))
            try:
                _wait_with_heartbeats(proc, run_dir, stamp, start)
            except BaseException:  # as subprocess.run does: an interrupted runner leaves no fit behind
                proc.kill()
                proc.wait()
                raise
        if proc.returncode != 0:
            tail = (run_dir / RUN_LOG).read_text().splitlines()[-15:]
            raise ArmFailed(f"failed (exit {proc.returncode}): {shlex.join(cmd)}\nlast lines of {run_dir / RUN_LOG}:\n"
                            + "\n".join(tail))
        return resume.finish(run_dir, stamp, time.perf_counter() - start)


def _wait_with_heartbeats(proc: subprocess.Popen, run_dir: Path, stamp: dict, start: float) -> None:
    """Wait for the fit, noting its elapsed time in the stamp every ``HEARTBEAT_S`` (``resume.heartbeat``)."""
    while True:
        try:
            proc.wait(timeout=HEARTBEAT_S)
            return
        except subprocess.TimeoutExpired:
            pass
        try:
            resume.heartbeat(run_dir, stamp, time.perf_counter() - start)
        except OSError as err:  # a full disk must not kill an hour of training: only its timing
            log.warning("%s: cannot note the run's time in %s (%s)", run_dir, resume.RUN_STAMP, err)


def summarise(runs: list[dict]) -> dict:
    """Mean and (for several seeds) standard deviation of each metric over seeds."""
    out = {}
    for name in runs[0]["metrics"]:
        values = [r["metrics"][name] for r in runs]
        out[name] = {"mean": round(statistics.fmean(values), 6),
                     "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0}
    return out
