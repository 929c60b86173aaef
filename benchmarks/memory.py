"""Peak memory of a full Scientific fit: SASRec-ID and UniSRec transductive, as `unisrec-x fit` runs them.

    python benchmarks/memory.py [--arms sasrec unisrec_transductive] [--malloc fixed default] [--threads 1] [--max_epochs N]

Each (arm, malloc setting) is its own ``unisrec-x fit`` process (to early stopping, then the test
pass), so each peak is one process's ``ru_maxrss`` as ``test_metrics.json`` records it. ``fixed`` is
the default (a fixed glibc mmap threshold, ``unisrec_x/allocator.py``); ``default`` is glibc's own
dynamic threshold (``UNISREC_X_MALLOC=default``). Runs of one invocation go concurrently, so their
fit times share the same contention and compare; RecBole's peak comes from ``time_to_quality.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

CONFIGS = {"sasrec": "configs/scientific/sasrec.yaml", "unisrec_transductive": "configs/scientific/unisrec_transductive.yaml"}


def fit(arm: str, malloc: str, threads: int, data_root: str | None, folder: Path, max_epochs: int | None) -> dict:
    cmd = [sys.executable, "-m", "unisrec_x.cli", "fit", "-c", CONFIGS[arm], "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name", f"{arm}-{malloc}"]
    if max_epochs:
        cmd += ["--trainer.max_epochs", str(max_epochs)]
    if data_root:
        cmd += ["--data.data_root", data_root]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "UNISREC_X_MALLOC": "default" if malloc == "default" else "fixed"}
    subprocess.run(cmd, check=True, cwd=common.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = json.loads(next((folder / f"{arm}-{malloc}").rglob("test_metrics.json")).read_text())
    return {"peak_rss_mb": out["peak_rss_mb"], "fit_seconds": out["fit_seconds"], "epochs": out["epochs_trained"],
            "test_ndcg@10": out["metrics"]["ndcg@10"], "test_recall@10": out["metrics"]["recall@10"]}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--arms", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--malloc", nargs="+", default=["fixed"], choices=["fixed", "default"])
    parser.add_argument("--max_epochs", type=int, help="stop every fit after this many epochs (default: early stopping)")
    args = common.start(parser)
    runs = [(arm, malloc) for arm in args.arms for malloc in args.malloc]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(runs)) as pool:
        results = dict(zip(runs, pool.map(lambda r: fit(*r, args.threads, args.data_root, Path(tmp), args.max_epochs), runs)))
    path = common.RESULTS / "memory.json"
    record = json.loads(path.read_text()) if path.exists() else {"benchmark": "memory", "arms": {}}
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    for (arm, malloc), figures in results.items():
        name = (arm if malloc == "fixed" else f"{arm}_glibc_dynamic_threshold") + (f"_{args.max_epochs}_epochs" if args.max_epochs else "")
        record["arms"][name] = {**figures, "command": command, "concurrent_runs": len(runs), "threads": args.threads,
                                "date": common.machine()["date"]}
        print(f"{name}: peak {figures['peak_rss_mb']} MB, fit {figures['fit_seconds']} s, {figures['epochs']} epochs, "
              f"test N@10 {figures['test_ndcg@10']:.4f}", flush=True)
    record["machine"] = common.machine()
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
