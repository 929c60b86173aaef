"""The frozen encoder layers' token states per item, cached on disk, for a trainable text top (issue 29).

A text top trains the encoder's last ``k`` layers; the layers below never change, so their output for each
item's tokens is computed once and kept: float16, one run of tokens per item (``flat`` rows
``offsets[i]:offsets[i + 1]``), memory-mapped on load, keyed by encoder, layer, token limit and a hash of the
texts, checksummed, written whole and atomically (a folder renamed into place) under a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from unisrec_x.items.encoder import PACKAGED_ENCODER, TextEncoder, encoder_identity, from_pretrained
from unisrec_x.items.feature_cache import texts_digest
from unisrec_x.runtime.locks import building
from unisrec_x.runtime.paths import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class EncoderShape(NamedTuple):
    """What a text top needs to know of its encoder to be built before any weights are read."""

    dim: int
    layers: int
    heads: int
    inner_dim: int
    eps: float


def encoder_shape(name: str = PACKAGED_ENCODER) -> EncoderShape:
    """The encoder's sizes, from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, name)
    if getattr(config, "model_type", None) not in ("bert", "roberta", "xlm-roberta", "electra", "mpnet"):
        log.warning("text top: %s is a %s model; its layers are assumed to be BERT's", name, config.model_type)
    return EncoderShape(int(config.hidden_size), int(config.num_hidden_layers), int(config.num_attention_heads),
                        int(config.intermediate_size), float(getattr(config, "layer_norm_eps", 1e-12)))


def top_layer_weights(encoder: TextEncoder, k: int) -> list[dict[str, torch.Tensor]]:
    """The state of the encoder's last ``k`` layers, lowest first (``TextTop.load_layers``)."""
    layers = encoder.model.encoder.layer
    if not 1 <= k <= len(layers):
        raise ValueError(f"a text top of {k} layers does not fit an encoder of {len(layers)}")
    return [{name: value.detach().float().clone() for name, value in layer.state_dict().items()}
            for layer in layers[len(layers) - k:]]


@torch.inference_mode()
def token_states(encoder: TextEncoder, texts: Sequence[str], frozen_layers: int) -> list[np.ndarray]:
    """Each text's token states after the first ``frozen_layers`` layers: (tokens, dim) float32, one per text."""
    enc = encoder.tokenizer(list(texts), padding=True, truncation=True, max_length=encoder.max_length,
                            return_tensors="pt")
    hidden = encoder.model(**enc, output_hidden_states=True).hidden_states[frozen_layers]  # [0] = embeddings
    lengths = enc["attention_mask"].sum(1).tolist()
    return [hidden[i, :n].float().numpy() for i, n in enumerate(lengths)]


class TokenStateCache:
    """Looks up or builds one list of texts' token states after the first ``frozen_layers`` encoder layers."""

    def __init__(self, encoder: str = PACKAGED_ENCODER, frozen_layers: int = 5, max_length: int = 512,
                 batch_size: int = 64, root: str | Path | None = None) -> None:
        self.encoder, self.frozen_layers, self.max_length, self.batch_size = encoder, frozen_layers, max_length, batch_size
        self.root = Path(root) if root is not None else cache_dir() / "token-states"

    def key(self, texts: Sequence[str]) -> dict:
        return {"format": FORMAT_VERSION, "encoder": encoder_identity(self.encoder), "frozen_layers": self.frozen_layers,
                "max_length": self.max_length, "texts_sha256": texts_digest(texts), "num_texts": len(texts)}

    def folder(self, key: dict, name: str) -> Path:
        return self.root / f"{name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"

    def get(self, texts: Sequence[str], name: str = "items") -> tuple[np.ndarray, np.ndarray]:
        """(flat (tokens, dim) float16, offsets (len(texts) + 1,) int64), memory-mapped; built on a miss."""
        key = self.key(texts)
        folder = self.folder(key, name)
        found = self._load(key, folder)
        if found is None:
            with building(folder.with_name(folder.name + ".lock")):
                found = self._load(key, folder)
                if found is None:
                    self._build(texts, key, folder)
                    found = self._load(key, folder)
                    if found is None:
                        raise RuntimeError(f"{folder}: token states were written but do not read back")
        return found

    def _load(self, key: dict, folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                log.warning("%s: token-state key differs from the request; rebuilding", folder)
                return None
            for file in ("flat.npy", "offsets.npy"):
                if _file_sha256(folder / file) != meta["sha256"][file]:
                    log.warning("%s: checksum mismatch (altered or truncated); rebuilding", folder / file)
                    return None
            flat = np.load(folder / "flat.npy", mmap_mode="c", allow_pickle=False)  # copy-on-write: torch may wrap it
            offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            log.warning("%s: unreadable token states (%s); rebuilding", folder, err)
            return None
        if offsets.shape != (key["num_texts"] + 1,) or int(offsets[-1]) != len(flat) or flat.dtype != np.float16:
            log.warning("%s: token states do not match %d texts; rebuilding", folder, key["num_texts"])
            return None
        return flat, offsets


    def _build(self, texts: Sequence[str], key: dict, folder: Path) -> None:
        from tqdm.auto import tqdm

        encoder = TextEncoder(self.encoder, "cls", self.max_length, self.batch_size)
        lengths = np.array([len(ids) for ids in encoder.tokenizer(list(texts), truncation=True,
                                                                  max_length=self.max_length)["input_ids"]], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        work = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        flat = np.lib.format.open_memmap(work / "flat.npy", mode="w+", dtype=np.float16,
                                         shape=(int(offsets[-1]), encoder.dim))
        order = np.argsort(lengths, kind="stable")  # each batch pads to its own longest text
        with tqdm(total=len(texts), desc=f"token states {folder.name}", unit="text", disable=len(texts) < 256) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                for row, states in zip(rows, token_states(encoder, [texts[i] for i in rows], self.frozen_layers)):
                    if len(states) != lengths[row]:
                        raise RuntimeError(f"text {row}: {len(states)} token states for {lengths[row]} tokens")
                    flat[offsets[row]:offsets[row + 1]] = states
                bar.update(len(rows))
        flat.flush()
        del flat
        np.save(work / "offsets.npy", offsets, allow_pickle=False)
        for file in ("flat.npy", "offsets.npy"):
            _fsync(work / file)
        meta = {"key": key, "sha256": {f: _file_sha256(work / f) for f in ("flat.npy", "offsets.npy")}}
        atomic_write_bytes(work / "meta.json", json.dumps(meta, indent=1).encode())
        _fsync(work)
        if folder.exists():  # a stale or damaged build of the same key: ours replaces it
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(work, folder)
        _fsync(folder.parent)
        log.info("token states: %d texts, %d tokens -> %s", len(texts), int(offsets[-1]), folder)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk: what the rename publishes must be there after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
