"""Time to quality on Scientific: wall seconds until validation NDCG@10 reaches a threshold, ours vs RecBole.

    python benchmarks/time_to_quality.py [--threshold 0.059] [--also 0.055 0.057] [--max_epochs 40] [--patience 10] [--threads 2]

Each side runs in its own child process (so each has its own peak RSS) with the same thread count:
unisrec-x's SASRec-ID (``training_step`` over ``train_dataloader``, then a full-ranking validation pass,
per epoch) and RecBole 1.2.1's SASRec driven by its own ``Trainer`` (``_train_epoch`` then
``_valid_epoch``, the body of ``Trainer.fit``). Both validate after every epoch; the clock includes
validation, not data loading. Results go into ``train_throughput.json`` under ``time_to_quality``
and into ``memory.json`` (RecBole's peak RSS for the same training). A side stops at the threshold,
after ``--patience`` epochs without a better validation score, or at ``--max_epochs``; the times to
the lower ``--also`` thresholds come from the same curves (unisrec-x's SASRec-ID peaks near 0.058-0.060
on validation across seeds, so 0.059 alone may not be reached).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import common
import torch


def ours(args) -> dict:
    from ours import build, scientific, train_steps

    data = scientific(args.data_root)
    module = build(data, "sasrec")
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    loader, valid = data.train_dataloader(), data.val_dataloader()
    return _loop(lambda: train_steps(module, loader, optimizer), lambda: module.evaluate(valid)["ndcg@10"], args)


def recbole(args) -> dict:
    from recbole_peer import RecBoleSASRec

    peer = RecBoleSASRec(common.data_root(args.data_root))
    trainer = peer.trainer
    epochs = iter(range(10_000))

    def train():
        trainer._train_epoch(peer.train_data, next(epochs), show_progress=False)

    def valid():
        score, _ = trainer._valid_epoch(peer.valid_data, show_progress=False)
        return float(score)

    return _loop(train, valid, args)


def _loop(train, valid, args) -> dict:
    curve, start, best, best_epoch = [], time.perf_counter(), -1.0, 0
    for epoch in range(1, args.max_epochs + 1):
        train()
        score = valid()
        curve.append({"epoch": epoch, "wall_s": round(time.perf_counter() - start, 1), "val_ndcg@10": round(score, 5)})
        print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
        if score > best:
            best, best_epoch = curve[-1]["val_ndcg@10"], epoch
        if score >= args.threshold or 0 < args.patience <= epoch - best_epoch:
            break
    return {**time_to(curve, args.threshold), "epochs": curve[-1]["epoch"],
            "best_val_ndcg@10": max(c["val_ndcg@10"] for c in curve),
            "also": {str(t): time_to(curve, t) for t in args.also}, "curve": curve,
            "peak_rss_mb": round(common.peak_rss_mb())}


def time_to(curve: list[dict], threshold: float) -> dict:
    """Wall seconds and epochs until validation N@10 first reached ``threshold`` (``None`` if never)."""
    hit = next((c for c in curve if c["val_ndcg@10"] >= threshold), None)
    return {"reached": hit is not None, "seconds": hit and hit["wall_s"], "epochs_to_reach": hit and hit["epoch"]}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.059)
    parser.add_argument("--also", type=float, nargs="*", default=[0.055, 0.057], help="lower thresholds read off the same curves")
    parser.add_argument("--max_epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=10, help="stop a side after this many epochs without improvement (0: off)")
    parser.add_argument("--side", choices=["ours", "recbole"], help=argparse_hidden())
    args = common.start(parser)
    if args.side:  # a child: run one side, print its figures as the last line
        print(json.dumps(ours(args) if args.side == "ours" else recbole(args)))
        return
    sides = {}
    for side in ("ours", "recbole"):
        cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--threshold", str(args.threshold),
               "--max_epochs", str(args.max_epochs),
               "--patience", str(args.patience), "--also", *map(str, args.also)] + (["--data_root", args.data_root] if args.data_root else [])
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])
        print(f"{side}: {sides[side]['seconds']} s, {sides[side]['epochs']} epochs, peak {sides[side]['peak_rss_mb']} MB",
              flush=True)
    command = "python benchmarks/time_to_quality.py " + " ".join(sys.argv[1:])
    figures = {"threshold_val_ndcg@10": args.threshold, "threads": args.threads, "command": command, **sides}
    if sides["ours"]["seconds"] is not None and sides["recbole"]["seconds"] is not None:
        figures["speedup"] = round(sides["recbole"]["seconds"] / sides["ours"]["seconds"], 2)
        print(f"time to val N@10 >= {args.threshold}: {figures['speedup']}x faster than RecBole's Trainer")
    for t in args.also:
        ours_t, peer_t = sides["ours"]["also"][str(t)]["seconds"], sides["recbole"]["also"][str(t)]["seconds"]
        if ours_t is not None and peer_t is not None:
            figures.setdefault("speedup_also", {})[str(t)] = round(peer_t / ours_t, 2)
            print(f"time to val N@10 >= {t}: {peer_t / ours_t:.2f}x faster than RecBole's Trainer")
    path = common.RESULTS / "train_throughput.json"
    payload = json.loads(path.read_text())
    payload["time_to_quality"] = figures
    path.write_text(json.dumps(payload, indent=2) + "\n")
    memory = common.RESULTS / "memory.json"
    record = json.loads(memory.read_text()) if memory.exists() else {"benchmark": "memory", "arms": {}}
    record["arms"]["recbole_sasrec"] = {"peak_rss_mb": sides["recbole"]["peak_rss_mb"], "command": command,
                                        "what": f"RecBole Trainer, SASRec on Scientific, {sides['recbole']['epochs']} epochs "
                                                "with validation after each",
                                        "date": common.machine()["date"]}
    memory.write_text(json.dumps(record, indent=2) + "\n")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
