"""Scaling: epoch time, evaluation time and peak memory as the catalog and the user count grow.

    python benchmarks/scaling.py                     # catalogs 4k/100k/1M, then users 10k/40k/100k
    python benchmarks/scaling.py --catalogs 4385 100000 --users 10000 --user_sweep
    python benchmarks/scaling.py --catalogs 1000000 --items_as text+id codes --user_counts   # semantic IDs at 1M

Synthetic data with real shape: item text vectors are random (384-d, like all-MiniLM-L6-v2),
history lengths are drawn from Scientific's own distribution, items from a Zipf-like popularity.
The model is UniSRec transductive (text + ID: the ID table is what grows fastest), or with
``--items_as`` item codes instead (semantic IDs: OPQ 32 x 256 codes of the text vectors, fitted
once per run and timed apart as ``codes_fit_s``; ``item_params`` counts the item-side weights).
Rows of an earlier run that this one does not redo are kept, each naming its command. Each run is a
child process so its peak RSS is its own. Evaluation scores every item for every user in
bounded chunks (users x 65,536 items at a time). The full softmax holds batch x catalog logits
and adapts the whole catalog with gradients each step, so at 1M items only the sampled softmax
runs (the estimate for the full one is printed instead). Writes results/scaling.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common
import numpy as np
import torch

from ours import train_steps

MEAN_HISTORY_SOURCE = "scientific/Scientific"


def scientific_lengths(data_root: str | None) -> np.ndarray:
    from unisrec_x.data.domain import load_domain

    domain = load_domain(common.data_root(data_root) / MEAN_HISTORY_SOURCE)
    return np.array([len(s) for s in domain.sequences])


def synthetic_sequences(n_items: int, n_users: int, lengths: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    drawn = rng.choice(lengths, size=n_users)
    ranks = np.arange(1, n_items + 1)
    popularity = 1.0 / (ranks + 10.0) ** 0.8
    popularity /= popularity.sum()
    flat = rng.choice(n_items, size=int(drawn.sum()), p=popularity) + 1
    return np.split(flat.astype(np.int64), np.cumsum(drawn)[:-1])


#: item representations: (use_text, use_item_id, use_codes)
ITEMS_AS = {"text+id": (True, True, False), "codes": (False, False, True), "text+codes": (True, False, True)}


def run_one(n_items: int, n_users: int, loss: str, items_as: str, data_root: str | None, threads: int) -> dict:
    """One configuration in this (child) process: one training epoch and one test pass."""
    from torch.utils.data import DataLoader

    from unisrec_x.data.sequences import LengthBucketBatchSampler, SequenceExamples
    from unisrec_x.training.module import SeqRecModule
    from unisrec_x.model.unisrec import UniSRec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sequences = synthetic_sequences(n_items, n_users, scientific_lengths(data_root))
    features = torch.randn(n_items + 1, 384)
    features[0] = 0
    train, test = SequenceExamples(sequences, "train", 50), SequenceExamples(sequences, "test", 50)
    use_text, use_item_id, use_codes = ITEMS_AS[items_as]
    net = UniSRec(num_items=n_items, plm_dim=384, use_text=use_text, use_item_id=use_item_id, use_codes=use_codes)
    codes_fit_s = None
    if use_codes:
        import tempfile

        from unisrec_x.items.codes import CodeSettings, item_codes

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            codes = item_codes(features[1:].numpy(), CodeSettings("opq", net.code_digits, net.codes_per_digit), cache)
        codes_fit_s = round(time.perf_counter() - start, 1)
        net.set_item_codes(codes.table())
        del codes
    if use_text:
        net.set_item_features(features)
    del features  # a codes-only model keeps only its codes
    item_params = sum(m.weight.numel() for m in (net.item_embedding, net.code_embedding) if m is not None)
    module = SeqRecModule(net, loss=loss, num_negatives=1024)
    module.set_training_targets(train.targets)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    train_loader = DataLoader(train, sampler=LengthBucketBatchSampler(train.hist_len, 2048, shuffle=True, seed=0),
                              batch_size=None)
    test_loader = DataLoader(test, sampler=LengthBucketBatchSampler(test.hist_len, 1024, shuffle=False), batch_size=None)
    start = time.perf_counter()
    seen = train_steps(module, train_loader, optimizer)
    epoch_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = module.evaluate(test_loader)
    eval_s = time.perf_counter() - start
    return {"items": n_items, "users": n_users, "loss": loss, "items_as": items_as, "item_params": item_params,
            "codes_fit_s": codes_fit_s, "train_examples": seen, "steps": len(train_loader),
            "epoch_s": round(epoch_s, 2), "eval_s": round(eval_s, 2), "eval_users": len(test),
            "train_sequences_per_s": round(seen / epoch_s, 1), "eval_users_per_s": round(len(test) / eval_s, 1),
            "peak_rss_mb": round(common.peak_rss_mb()), "test_ndcg@10": round(metrics["ndcg@10"], 5)}


def child(args: argparse.Namespace, items: int, users: int, loss: str, items_as: str = "text+id") -> dict:
    command = [sys.executable, __file__, "--one", str(items), str(users), loss, items_as, "--threads", str(args.threads)]
    if args.data_root:
        command += ["--data_root", args.data_root]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"items": items, "users": users, "loss": loss, "items_as": items_as,
                "failed": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _key(row: dict) -> tuple:
    return (row["sweep"], row["items"], row["users"], row["loss"], row.get("items_as", "text+id"))


def merged_with_earlier(rows: list[dict]) -> list[dict]:
    """This run's rows plus the results file's rows that it did not redo; an earlier row is replaced only
    by a finished one (a failed or skipped rerun keeps the earlier figures). Rows of older files get
    the file's command, thread count and date."""
    path = common.RESULTS / "scaling.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    kept = {_key(r): r for r in ({"items_as": "text+id", "command": earlier.get("command"), "threads": earlier.get("threads"),
                                  "date": earlier.get("machine", {}).get("date"), **r} for r in earlier.get("runs", []))}
    for row in rows:
        if "epoch_s" in row or _key(row) not in kept:
            kept[_key(row)] = row
    return list(kept.values())


def full_softmax_estimate_gb(items: int, batch: int = 2048, hidden: int = 300, experts: int = 8) -> float:
    """Logits + their gradient, and the adapter's saved expert outputs, for one full-softmax step."""
    return round((2 * batch * items + items * experts * hidden * 2) * 4 / 2**30, 1)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for loss, items_as in sorted({(r["loss"], r.get("items_as", "text+id")) for r in rows}):
        marker = {"full": "o", "sampled": "s"}[loss] if items_as == "text+id" else "^"
        ran = [r for r in rows if (r["loss"], r.get("items_as", "text+id")) == (loss, items_as)
               and "epoch_s" in r]  # not the skipped or failed ones
        catalog = sorted((r for r in ran if r["sweep"] == "catalog"), key=lambda r: r["items"])
        users = sorted((r for r in ran if r["sweep"] == "users"), key=lambda r: r["users"])
        for ax, key, label in zip(axes, ("epoch_s", "eval_s", "peak_rss_mb"),
                                  ("epoch time (s)", "evaluation time (s)", "peak RSS (MB)")):
            if catalog:
                ax.plot([r["items"] for r in catalog], [r[key] for r in catalog], marker=marker, label=f"{items_as}, {loss}, vs items")
            if users:
                ax.plot([r["users"] for r in users], [r[key] for r in users], marker=marker, linestyle="--",
                        label=f"{items_as}, {loss}, vs users")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("items (solid) or users (dashed)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("unisrec-x scaling (UniSRec text + ID, or item codes, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--catalogs", type=int, nargs="+", default=[4385, 100_000, 1_000_000])
    parser.add_argument("--users", type=int, default=10_000, help="users in the catalog sweep")
    parser.add_argument("--user_counts", type=int, nargs="*", default=[10_000, 40_000, 100_000])
    parser.add_argument("--user_catalog", type=int, default=4385, help="catalog size in the user sweep")
    parser.add_argument("--full_softmax_max_items", type=int, default=100_000)
    parser.add_argument("--items_as", nargs="+", choices=list(ITEMS_AS), default=["text+id"],
                        help="item representations of the catalog sweep")
    parser.add_argument("--one", nargs=4, metavar=("ITEMS", "USERS", "LOSS", "ITEMS_AS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        items, users, loss, items_as = args.one
        print(json.dumps(run_one(int(items), int(users), loss, items_as, args.data_root, args.threads)))
        return

    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
    rows = []
    for items in args.catalogs:
        for items_as in args.items_as:
            for loss in ("full", "sampled"):
                if loss == "full" and items > args.full_softmax_max_items:
                    row = {"items": items, "users": args.users, "loss": loss, "items_as": items_as,
                           "skipped": f"full softmax needs about {full_softmax_estimate_gb(items)} GB per step at "
                           "batch 2048; use loss=sampled"}
                else:
                    row = child(args, items, args.users, loss, items_as)
                rows.append({**row, "sweep": "catalog", "command": command, "threads": args.threads,
                             "date": common.machine()["date"]})
                print(json.dumps(rows[-1]), flush=True)
    for users in args.user_counts:
        rows.append({**child(args, args.user_catalog, users, "full"), "sweep": "users", "command": command,
                     "threads": args.threads, "date": common.machine()["date"]})
        print(json.dumps(rows[-1]), flush=True)
    rows = merged_with_earlier(rows)
    common.write_results("scaling", {"threads": args.threads, "model": "UniSRec, hidden 300, batch 2048; items_as per row",
                                     "runs": rows}, command)
    plot(rows, common.RESULTS / "scaling.png")
    # ratios compare rows of this run only: kept rows of other days ran under other load
    ours = [r for r in rows if r.get("command") == command and "epoch_s" in r and r["sweep"] == "catalog"]
    done = sorted((r for r in ours if r["loss"] == "sampled" and r["items_as"] == "text+id"), key=lambda r: r["items"])
    if len(done) >= 2:
        lo, hi = done[0], done[-1]
        print(f"RATIOS sampled softmax, {hi['items']:,} vs {lo['items']:,} items ({hi['items'] / lo['items']:.0f}x catalog): "
              f"epoch {hi['epoch_s'] / lo['epoch_s']:.1f}x, evaluation {hi['eval_s'] / lo['eval_s']:.1f}x, "
              f"peak RSS {hi['peak_rss_mb'] / lo['peak_rss_mb']:.1f}x")
    for codes in (r for r in ours if r["items_as"] == "codes"):
        peer = next((r for r in ours if _key(r)[:4] == _key(codes)[:4] and r["items_as"] == "text+id"), None)
        if peer:
            print(f"RATIOS codes vs text+id, {codes['items']:,} items, {codes['loss']}: item parameters "
                  f"{codes['item_params'] / peer['item_params']:.4f}x, peak RSS {codes['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x, "
                  f"epoch {codes['epoch_s'] / peer['epoch_s']:.2f}x")


if __name__ == "__main__":
    main()
