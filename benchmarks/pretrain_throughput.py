"""Pretraining throughput on games + toys: today's path vs the previous one, in one process.

    python benchmarks/pretrain_throughput.py [--threads 2] [--steps 6] [--batch_size 1024]

Same network (UniSRec, text only), same loss (sequence-item + 1e-3 sequence-sequence InfoNCE),
same sources (Amazon Games 2018 + Toys 2014, ~510k interactions), same batch size in training
sequences, same threads. The previous path ("prefixes"): one example per prefix, batches drawn
at random (no length bucketing, so nearly every batch pads to 50), and every item of the merged
catalog through the adapter at every step. Today's ("positions"): one causal pass per sequence
window with a target at every position, length-bucketed pools of 4 batches, and only the items a
batch touches through the adapter. One warm-up step, then ``steps`` timed steps per path.
Training sequences per second = (history, next item) pairs trained per second, the unit both
paths share; ratio = today / previous.
"""

from __future__ import annotations

import sys
import time

import common
import torch

from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.training.pretrain import PretrainModule
from unisrec_x.model.unisrec import UniSRec

SOURCES = ["games", "toys"]


def timed_steps(module: PretrainModule, loader, steps: int) -> tuple[float, int]:
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    batches = iter(loader)
    seen, elapsed = 0, 0.0
    for step in range(steps + 1):
        batch = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
        if step > 0:  # the first step is a warm-up
            elapsed += time.perf_counter() - start
            seen += int((batch.target > 0).sum())
    return seen / elapsed, seen


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=1024)
    args = common.start(parser)
    figures: dict = {"threads": args.threads, "steps": args.steps, "batch_size": args.batch_size, "sources": SOURCES,
                     "arms": {}}
    paths = {"prefixes_whole_catalog": dict(training_examples="prefixes", length_bucketing=False),
             "positions_touched_items": dict(training_examples="positions", length_bucketing=True)}
    for name, settings in paths.items():
        data = SeqRecDataModule(SOURCES, data_root=args.data_root, batch_size=args.batch_size, **settings)
        torch.manual_seed(2022)
        net = UniSRec(num_items=data.num_items, plm_dim=data.feature_dim, use_text=True, use_item_id=False)
        net.set_item_features(data.item_features)
        module = PretrainModule(net)
        module.word_drop_features = data.word_drop_features
        if name.startswith("prefixes"):
            net.partial_item_table = lambda ids, net=net: net.item_table()  # every item through the adapter
        rate, seen = timed_steps(module, data.train_dataloader(), args.steps)
        examples = data.examples("train")
        figures["arms"][name] = {"sequences_per_s": round(rate, 1), "sequences_timed": seen,
                                 "items_in_catalog": data.num_items, "examples_per_epoch": len(examples),
                                 "peak_rss_mb_so_far": round(common.peak_rss_mb())}
        print(f"{name}: {rate:.0f} training sequences/s ({seen} timed)", flush=True)
    arms = figures["arms"]
    ratio = arms["positions_touched_items"]["sequences_per_s"] / arms["prefixes_whole_catalog"]["sequences_per_s"]
    figures["ratio_positions_vs_prefixes"] = round(ratio, 2)
    common.write_results("pretrain_throughput", figures,
                         "python benchmarks/pretrain_throughput.py " + " ".join(sys.argv[1:]))
    print(f"RATIOS pretraining sequences/s, today / previous path: {ratio:.2f}x; today "
          f"{arms['positions_touched_items']['sequences_per_s']:.0f}/s (target >= 1000/s)")


if __name__ == "__main__":
    main()
