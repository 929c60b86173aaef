"""How precisely a regime's validation rows measure N@10: the floor's per-row N@10 on them, its standard
deviation and the standard error of their mean (docs/results.md, "Carrying the floor").

    python scripts/validation_noise.py --dataset scientific/Scientific \
        --train_users results/transfer/scientific-Scientific/users-5pct.txt --decay 0.25 --beta 0.02
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.evaluation.baselines import training_counts
from unisrec_x.evaluation.ranking import chunked_target_ranks
from unisrec_x.model.floor import floor_candidates, floor_query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scientific/Scientific")
    parser.add_argument("--train_users", help="the regime's sampled users (validation rows are theirs)")
    parser.add_argument("--data_root")
    parser.add_argument("--decay", type=float, default=0.25)
    parser.add_argument("--beta", type=float, default=0.02)
    args = parser.parse_args()
    data = SeqRecDataModule(args.dataset, data_root=args.data_root, train_users=args.train_users)
    unit = F.normalize(data.item_features.float(), dim=-1)
    counts = training_counts(data.examples("train").targets, data.num_items)
    candidates = floor_candidates(unit[1:], counts[1:])
    per_row = []
    for batch in data.val_dataloader():
        ranks = chunked_target_ranks(floor_query(unit, batch.item_seq, batch.seq_len, args.decay, args.beta),
                                     candidates, batch.target - 1)
        per_row += [1 / math.log2(rank + 2) if rank < 10 else 0.0 for rank in ranks.tolist()]
    values = torch.tensor(per_row)
    print(f"{len(values)} validation rows: floor N@10 mean {values.mean():.4f}, per-row std {values.std():.4f}, "
          f"standard error of the mean {values.std() / len(values) ** 0.5:.4f}")


if __name__ == "__main__":
    main()
