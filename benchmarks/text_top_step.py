"""The trainable text top's training step (issue 29) beside the frozen-encoder step, on Scientific.

    python benchmarks/text_top_step.py [--threads 2] [--repeats 3] [--steps 4]

Arms: UniSRec inductive with the frozen encoder (the peer), and with the encoder's last ``k`` layers
trained (``text_top_layers``) for ``k`` = 1 and 2, the step's fresh items being its targets (the default), 256
of them (``text_fresh_max``, what the transfer benchmark's tuned arms use) or every item of the batch
(``text_fresh=batch``). Each repeat times ``steps`` optimizer steps (batches of 2,048
training targets, position-wise, the CLI's defaults) after one warm-up step; median. Figures: training
sequences/s, items run through the top per second, one refresh of the whole item table (seconds), and the
process's peak resident memory so far (arms run in order, so a later arm's peak includes the earlier ones').
Ratio = an arm's sequences/s over the frozen step's.
"""

from __future__ import annotations

import sys
import time

import common
import torch

from ours import build, scientific, train_steps

ARMS = {
    "frozen": {},
    "top1_targets": {"layers": 1, "fresh": "targets"},
    "top1_targets_256": {"layers": 1, "fresh": "targets", "fresh_max": 256},
    "top1_batch": {"layers": 1, "fresh": "batch"},
    "top2_targets": {"layers": 2, "fresh": "targets"},
}


def main() -> None:
    parser = common.parser(__doc__, repeats=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per repeat")
    args = common.start(parser)
    data = scientific(args.data_root)
    loader = data.train_dataloader()
    figures: dict = {"threads": args.threads, "repeats": args.repeats, "steps": args.steps, "batch_size": 2048, "arms": {}}
    for arm, spec in ARMS.items():
        layers = spec.get("layers", 0)
        module = build(data, "unisrec_inductive", text_fresh=spec.get("fresh", "targets"),
                       text_fresh_max=spec.get("fresh_max"),
                       net_args={"text_top_layers": layers} if layers else {})
        net = module.net
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        refresh_s = None
        if layers:
            (flat, offsets), weights = data.text_top_inputs(layers)
            net.text_top.set_states(flat, offsets)
            net.text_top.load_layers(weights)
            start = time.perf_counter()
            net.refresh_text_table()
            refresh_s = time.perf_counter() - start
            module.text_top_parameter_group(optimizer)
        through_top = []
        original = net.text_top.encode if layers else None
        if layers:  # count the items each step runs through the top
            net.text_top.encode = lambda ids: (through_top.append(len(ids)), original(ids))[1]
        train_steps(module, loader, optimizer, steps=1)  # warm-up
        rates, items_rates = [], []
        for _ in range(args.repeats):
            through_top.clear()
            start = time.perf_counter()
            seen = train_steps(module, loader, optimizer, steps=args.steps)
            seconds = time.perf_counter() - start
            rates.append(seen / seconds)
            items_rates.append(sum(through_top) / seconds)
        median = sorted(rates)[len(rates) // 2]
        figures["arms"][arm] = {"sequences_per_s": round(median, 1), "repeats": [round(r, 1) for r in rates],
                                "top_items_per_s": round(sorted(items_rates)[len(items_rates) // 2], 1) if layers else None,
                                "table_refresh_s": None if refresh_s is None else round(refresh_s, 2),
                                "peak_rss_mb_so_far": round(common.peak_rss_mb())}
        print(f"{arm}: {median:.0f} sequences/s (repeats {[round(r) for r in rates]})"
              + (f", {figures['arms'][arm]['top_items_per_s']:.0f} items/s through the top, table refresh "
                 f"{refresh_s:.1f} s" if layers else ""), flush=True)
    frozen = figures["arms"]["frozen"]["sequences_per_s"]
    ratios = {arm: round(f["sequences_per_s"] / frozen, 3) for arm, f in figures["arms"].items() if arm != "frozen"}
    figures["ratio_vs_frozen"] = ratios
    common.write_results("text_top_step", figures, "python benchmarks/text_top_step.py " + " ".join(sys.argv[1:]))
    print("RATIOS training sequences/s, text top / frozen encoder: "
          + ", ".join(f"{arm} {r:.3f}x" for arm, r in ratios.items()))


if __name__ == "__main__":
    main()
