"""Training throughput on Scientific: RecBole's SASRec vs unisrec-x's SASRec-ID and UniSRec (transductive).

    python benchmarks/train_throughput.py [--threads 2] [--repeats 3] [--recbole_steps 5]

Identical dimensions and objective on both sides (recbole_peer.SASREC), same thread count.
After one warm-up step, each repeat times RecBole for ``recbole_steps`` steps (every RecBole
batch is padded to 50, so all its steps cost the same) and unisrec-x for one whole epoch
(its batches are padded to their own longest history, so a whole epoch is the honest unit).
Sequences per second, median of the repeats; ratio = ours / RecBole.
"""

from __future__ import annotations

import sys
import time

import common
import torch

from ours import VARIANTS, build, scientific, train_steps
from recbole_peer import RecBoleSASRec


def time_throughput(run, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        seen = run()
        rates.append(seen / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2], rates


def main() -> None:
    parser = common.parser(__doc__, repeats=3)
    parser.add_argument("--recbole_steps", type=int, default=5)
    args = common.start(parser)
    figures: dict = {"threads": args.threads, "repeats": args.repeats, "batch_size": 2048, "arms": {}}

    data = scientific(args.data_root)
    loader = data.train_dataloader()
    for variant in VARIANTS:
        module = build(data, variant)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        train_steps(module, loader, optimizer, steps=1)  # warm-up
        rate, rates = time_throughput(lambda: train_steps(module, loader, optimizer), args.repeats)
        figures["arms"][variant] = {"sequences_per_s": round(rate, 1), "repeats": [round(r, 1) for r in rates],
                                    "steps_per_repeat": len(loader), "peak_rss_mb_so_far": round(common.peak_rss_mb())}
        print(f"unisrec-x {variant}: {rate:.0f} sequences/s (repeats {[round(r) for r in rates]})", flush=True)

    peer = RecBoleSASRec(common.data_root(args.data_root))
    peer.train_steps(1)  # warm-up
    rate, rates = time_throughput(lambda: peer.train_steps(args.recbole_steps), args.repeats)
    figures["arms"]["recbole_sasrec"] = {"sequences_per_s": round(rate, 1), "repeats": [round(r, 1) for r in rates],
                                         "steps_per_repeat": args.recbole_steps,
                                         "peak_rss_mb_so_far": round(common.peak_rss_mb())}
    print(f"RecBole SASRec: {rate:.0f} sequences/s (repeats {[round(r) for r in rates]})", flush=True)

    ratios = {v: round(figures["arms"][v]["sequences_per_s"] / rate, 2) for v in VARIANTS}
    figures["ratio_vs_recbole_sasrec"] = ratios
    common.write_results("train_throughput", figures, "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]))
    print("RATIOS training sequences/s, ours / RecBole SASRec: " + ", ".join(f"{v} {r:.2f}x" for v, r in ratios.items())
          + " (targets: sasrec >= 20x, unisrec_transductive >= 15x)")


if __name__ == "__main__":
    main()
