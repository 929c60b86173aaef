"""Shared fixtures: the real data root, small real slices, and a per-test cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unisrec_x.runtime.paths import data_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The data root the README documents; the tests need the real Scientific release."""
    root = data_root(os.environ.get("UNISREC_X_DATA_ROOT") or ROOT.parent / "shared" / "data")
    assert (root / "scientific" / "Scientific.train.inter").is_file(), f"Scientific data missing under {root}"
    return root


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own feature cache unless it shares the session one explicitly."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("UNISREC_X_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the tests that encode the same real slice, so it is encoded once per session."""
    return tmp_path_factory.mktemp("shared-cache")


def write(path: Path, text: str | bytes) -> Path:
    """Write a test file (bytes as is, text as UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide random BERT with the packaged tokenizer, saved as a local folder.

    Pretraining tests encode thousands of texts twice (clean and word-dropped); this keeps that
    to a second while exercising the "any local path" encoder route for real.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    from unisrec_x.items.encoder import PACKAGED_ENCODER, resolve_encoder

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(PACKAGED_ENCODER))
    import torch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def assert_close_f32(actual, expected, rtol: float = 1e-5) -> None:
    """Float32 results of two code paths (or two BLAS libraries: torch's and numpy's OpenBLAS)
    agree to a relative error of the values' *scale*, not to a fixed absolute one.

    A dot product of D float32 terms carries an error of ~sqrt(D) * 6e-8 of |q| |v|; scores of
    ~1/temperature (~14) therefore differ by ~1e-5 across libraries (seen: 1.24e-5 on values of 12).
    ``atol = rtol * max|expected|`` covers entries near zero in a row of large ones.
    """
    import numpy as np

    actual = np.asarray(actual.detach() if hasattr(actual, "detach") else actual, dtype=np.float64)
    expected = np.asarray(expected.detach() if hasattr(expected, "detach") else expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
