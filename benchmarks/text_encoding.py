"""Text encoding of all Scientific item texts: unisrec-x's encoder vs plain Hugging Face loops.

    python benchmarks/text_encoding.py [--threads 2] [--max_length_sample 256]

Same model (all-MiniLM-L6-v2 from the installed package), same batch size (64), same token
limit (512), same pooling ([CLS]), same threads, inference mode on every side. unisrec-x sorts
texts by token count so each batch pads only to its own longest text. Peers:
  * plain loop: fixed batches in catalog order, padded to each batch's longest text;
  * plain loop, padding="max_length": every text padded to 512 tokens (its cost per text is
    constant, so it is timed on a random sample of ``max_length_sample`` texts).
Items per second; ratio = ours / peer. Vectors must agree with the plain loop (max |diff| printed).

unisrec-x's ``--data.text_precision bfloat16`` (bf16 weights and activations) is timed too. It
changes the vectors, so the benchmark also prints their cosine to the float32 ones and the
training-free text-kNN ranking on the Scientific test split with each (N@10 must stay within 1%).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

from unisrec_x.evaluation.baselines import text_knn
from unisrec_x.data.domain import load_domain
from unisrec_x.data.sequences import SequenceExamples
from unisrec_x.items.encoder import PACKAGED_ENCODER, TextEncoder


def encode_ours(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), encoder.dim), np.float32)
    for rows, vectors in encoder.batches(texts):
        out[rows] = vectors
    return out


@torch.inference_mode()
def encode_plain(encoder: TextEncoder, texts: list[str], padding: str) -> np.ndarray:
    """What a hand-written loop does: catalog order, fixed batches."""
    parts = []
    for start in range(0, len(texts), encoder.batch_size):
        enc = encoder.tokenizer(texts[start:start + encoder.batch_size], padding=padding, truncation=True,
                                max_length=encoder.max_length, return_tensors="pt")
        parts.append(encoder.model(**enc).last_hidden_state[:, 0].numpy())
    return np.concatenate(parts)


def timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def knn_ndcg(vectors: np.ndarray, test: SequenceExamples) -> dict[str, float]:
    features = torch.from_numpy(np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors]))
    rows = torch.arange(len(test))
    return text_knn(features, [test[idx] for idx in rows.split(1024)])


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--max_length_sample", type=int, default=256)
    args = common.start(parser)
    domain = load_domain(common.data_root(args.data_root) / "scientific" / "Scientific")
    texts = list(domain.item_texts)
    encoder = TextEncoder(PACKAGED_ENCODER, "cls", 512, 64)
    bf16 = TextEncoder(PACKAGED_ENCODER, "cls", 512, 64, precision="bfloat16")
    encode_ours(encoder, texts[:128])  # warm-up
    encode_ours(bf16, texts[:128])
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=512)["input_ids"]]

    ours_s, ours = timed(lambda: encode_ours(encoder, texts))
    bf16_s, ours_bf16 = timed(lambda: encode_ours(bf16, texts))
    plain_s, plain = timed(lambda: encode_plain(encoder, texts, padding="longest"))
    sample = random.Random(0).sample(texts, args.max_length_sample)
    padded_s, _ = timed(lambda: encode_plain(encoder, sample, padding="max_length"))
    rates = {"unisrec_x": len(texts) / ours_s, "unisrec_x_bfloat16": len(texts) / bf16_s,
             "plain_longest": len(texts) / plain_s, "plain_max_length": len(sample) / padded_s}
    diff = float(np.abs(ours - plain).max())
    cosine = (ours * ours_bf16).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ours_bf16, axis=1)
    test = SequenceExamples(domain.sequences, "test")
    knn = {"float32": knn_ndcg(ours, test), "bfloat16": knn_ndcg(ours_bf16, test)}
    knn_change = knn["bfloat16"]["ndcg@10"] / knn["float32"]["ndcg@10"] - 1
    figures = {
        "texts": len(texts), "tokens_mean": round(float(np.mean(lengths)), 1), "tokens_max": int(max(lengths)),
        "threads": args.threads, "batch_size": 64, "max_length": 512,
        "items_per_s": {k: round(v, 1) for k, v in rates.items()},
        "seconds": {"unisrec_x": round(ours_s, 2), "unisrec_x_bfloat16": round(bf16_s, 2),
                    "plain_longest": round(plain_s, 2),
                    f"plain_max_length ({len(sample)} texts)": round(padded_s, 2)},
        "max_abs_diff_vs_plain": diff,
        "bfloat16_vs_float32": {"cosine_min": round(float(cosine.min()), 5), "cosine_mean": round(float(cosine.mean()), 5),
                                "text_knn_test": {p: {k: round(v, 4) for k, v in m.items() if k in ("recall@10", "ndcg@10")}
                                                  for p, m in knn.items()},
                                "text_knn_ndcg@10_change": round(knn_change, 4)},
        "ratio": {"vs_plain_longest": round(rates["unisrec_x"] / rates["plain_longest"], 2),
                  "vs_plain_max_length": round(rates["unisrec_x"] / rates["plain_max_length"], 2),
                  "bfloat16_vs_plain_longest": round(rates["unisrec_x_bfloat16"] / rates["plain_longest"], 2)},
        "cpu_has_native_bf16": "avx512_bf16" in open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else None,
        "peak_rss_mb": round(common.peak_rss_mb()),
    }
    for name, rate in rates.items():
        print(f"{name}: {rate:.0f} items/s")
    print(f"vectors: max |ours - plain| = {diff:.2g}; bfloat16 vs float32 cosine min {cosine.min():.4f}, "
          f"text-kNN N@10 {knn['float32']['ndcg@10']:.4f} -> {knn['bfloat16']['ndcg@10']:.4f} ({knn_change:+.2%})")
    common.write_results("text_encoding", figures, "python benchmarks/text_encoding.py " + " ".join(sys.argv[1:]))
    print(f"RATIOS encoding items/s, ours / plain loop: {figures['ratio']['vs_plain_longest']:.2f}x (pad to batch "
          f"longest), {figures['ratio']['vs_plain_max_length']:.2f}x (pad to max_length); bfloat16 "
          f"{figures['ratio']['bfloat16_vs_plain_longest']:.2f}x (pad to batch longest) (target >= 2x)")


if __name__ == "__main__":
    main()
