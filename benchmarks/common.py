"""Shared by the benchmarks: machine facts, peak memory, timing, and the results file.

Each benchmark runs by hand (never in CI), prints its ratios last, and writes its figures with
the machine's core count and the date to ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from the repo root imports the package in place
    sys.path.insert(0, str(ROOT))


#: glibc malloc as this process runs it: "fixed" mmap threshold (what `unisrec-x` sets) or glibc's "default"
MALLOC = {"value": "default"}


def machine() -> dict:
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "date": dt.date.today().isoformat(), "malloc": MALLOC["value"]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(run: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``run`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def write_results(name: str, figures: dict, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command, "machine": machine(), **figures}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"figures written to {path.relative_to(ROOT)}")
    return path


def data_root(override: str | None = None) -> Path:
    """The data root as the library resolves it (flag, then $UNISREC_X_DATA_ROOT, then ../shared/data)."""
    from unisrec_x.runtime.paths import data_root as resolve

    return Path(resolve(override)).resolve()


def parser(doc: str, repeats: int | None = None):
    """The flags every Scientific benchmark shares; ``doc`` is the script's docstring."""
    import argparse

    out = argparse.ArgumentParser(description=doc.splitlines()[0])
    out.add_argument("--data_root", default=None, help="data root (default: $UNISREC_X_DATA_ROOT or ../shared/data)")
    out.add_argument("--threads", type=int, default=2, help="torch threads, the same for every side")
    if repeats is not None:
        out.add_argument("--repeats", type=int, default=repeats, help="timed repeats; the median is reported")
    return out


def quiet() -> None:
    """Benchmarks print figures, not library warnings."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)


def start(parser):
    """Parse the flags, set the thread count for every side, silence library warnings, and run malloc
    as ``unisrec-x`` does (a fixed mmap threshold, unless ``UNISREC_X_MALLOC=default``), for every side."""
    from unisrec_x.runtime.allocator import fix_mmap_threshold
    from unisrec_x.cli import MMAP_THRESHOLD

    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    MALLOC["value"] = "fixed" if fix_mmap_threshold(MMAP_THRESHOLD) else "default"
    quiet()
    return args
