"""Full-ranking evaluation on Scientific: RecBole's full-sort validation vs unisrec-x's, and a metric check.

    python benchmarks/eval_throughput.py [--threads 2] [--repeats 3] [--train_steps 3]

Both score every item for each of the 8,442 validation users, 1,024 users per batch. Users per
second, median of the repeats; ratio = ours / RecBole. Then the same weights go to both sides:
RecBole's SASRec is trained for ``train_steps`` steps (so metrics are not near zero), its
weights are copied into unisrec-x's SASRec-ID (matched by item token), and both evaluators must
report the same Recall/NDCG/MRR/Hit@10/50 (to 1e-4; rounding differs in the last digits).
"""

from __future__ import annotations

import sys

import common

from ours import build, scientific
from recbole_peer import RecBoleSASRec, copy_sasrec_weights


def main() -> None:
    parser = common.parser(__doc__, repeats=3)
    parser.add_argument("--train_steps", type=int, default=3)
    args = common.start(parser)

    data = scientific(args.data_root)
    users = len(data.examples("valid"))
    ours = {v: build(data, v) for v in ("sasrec", "unisrec_transductive")}
    figures: dict = {"threads": args.threads, "users": users, "items": data.num_items, "arms": {}}
    for variant, module in ours.items():
        seconds, times = common.median_time(lambda: module.evaluate(data.val_dataloader()), args.repeats)
        figures["arms"][variant] = {"users_per_s": round(users / seconds, 1), "seconds": [round(t, 3) for t in times]}
        print(f"unisrec-x {variant}: {users / seconds:.0f} users/s ({seconds:.2f} s per pass)", flush=True)

    peer = RecBoleSASRec(common.data_root(args.data_root))
    seconds, times = common.median_time(peer.evaluate, args.repeats)
    figures["arms"]["recbole_sasrec"] = {"users_per_s": round(users / seconds, 1), "seconds": [round(t, 3) for t in times]}
    print(f"RecBole SASRec: {users / seconds:.0f} users/s ({seconds:.2f} s per pass)", flush=True)

    peer.train_steps(args.train_steps)
    theirs = peer.evaluate()
    sasrec = ours["sasrec"]
    copy_sasrec_weights(peer.model, sasrec.net, peer.token_ids(), data.data.domains[0].item_tokens)
    mine = sasrec.evaluate(data.val_dataloader())
    compared = {k: {"recbole": theirs[k], "unisrec_x": round(mine[k], 6)} for k in sorted(theirs) if k in mine}
    worst = max(abs(v["recbole"] - v["unisrec_x"]) for v in compared.values())
    figures["same_weights_metrics"] = {"train_steps": args.train_steps, "metrics": compared, "max_abs_diff": worst}
    for name, pair in compared.items():
        print(f"  {name:<10} RecBole {pair['recbole']:.6f}  unisrec-x {pair['unisrec_x']:.6f}")
    print(f"same weights, same metrics: max |difference| = {worst:.2g} ({'OK' if worst <= 1e-4 else 'MISMATCH'})")

    ratios = {v: round(figures["arms"][v]["users_per_s"] / figures["arms"]["recbole_sasrec"]["users_per_s"], 2)
              for v in ours}
    figures["ratio_vs_recbole_sasrec"] = ratios
    figures["peak_rss_mb"] = round(common.peak_rss_mb())
    common.write_results("eval_throughput", figures, "python benchmarks/eval_throughput.py " + " ".join(sys.argv[1:]))
    print("RATIOS evaluation users/s, ours / RecBole SASRec: " + ", ".join(f"{v} {r:.2f}x" for v, r in ratios.items())
          + " (target >= 3x)")


if __name__ == "__main__":
    main()
