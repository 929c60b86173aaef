"""Small models (inductive; text + codes) trained on real Scientific data with one real item held out.

The held-out item is eSUN's black PETG filament (id 590): six other colours of the same
filament stay in the catalog, so "a history of near-identical items" is real data, not made up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from unisrec_x.cli import main
from unisrec_x.data.text import read_text_file

HELD_OUT = "590"  # ASIN B00ZAUQZTA, eSUN 3D 1.75mm PETG Black Filament
SAME_FILAMENT = ["2", "4", "11", "140", "1241", "1351"]  # the other eSUN 1.75mm PETG colours
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "scientific" / "unisrec_inductive.yaml"


@pytest.fixture(scope="session")
def held_out_text(real_root: Path) -> str:
    """The held-out item's own text from the release, exactly as a new listing would bring it."""
    prefix = real_root / "scientific" / "Scientific"
    return read_text_file(f"{prefix}.text", f"{prefix}.item2index")[HELD_OUT]


def _fit_without_held_out(config: Path, real_root: Path, shared_cache: Path, out: Path, *extra: str) -> Path:
    """Best checkpoint of 2 epochs on the first 300 users, trained without the held-out item."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNISREC_X_CACHE", str(shared_cache))
        main(["fit", "-c", str(config), "--data.data_root", str(real_root), "--data.max_users", "300",
              "--data.exclude_items", f'["{HELD_OUT}"]', "--trainer.max_epochs", "2", "--test_after_fit", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger.init_args.save_dir", str(out), *extra])
    return next(out.rglob("best-*.ckpt"))


@pytest.fixture(scope="session")
def held_out_checkpoint(real_root: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inductive (text-only) model."""
    return _fit_without_held_out(CONFIG, real_root, shared_cache, tmp_path_factory.mktemp("held-out"))


@pytest.fixture(scope="session")
def held_out_codes_checkpoint(real_root: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text + codes model (semantic IDs: OPQ codes, 8 digits of 256 to keep the quantizer's fit short)."""
    return _fit_without_held_out(CONFIG.parent / "unisrec_text_codes.yaml", real_root, shared_cache,
                                 tmp_path_factory.mktemp("held-out-codes"), "--model.init_args.net.init_args.code_digits", "8")


def wait_until_healthy(proc, url: str, log: Path, deadline_s: float = 120.0) -> None:
    """Poll ``GET /health`` of a ``unisrec-x serve`` subprocess until it answers 200; fail with its log
    if it exits or does not come up in time."""
    import time

    import httpx

    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"server did not come up in {deadline_s} s:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


def fixed_text_encoder(monkeypatch: pytest.MonkeyPatch, recommender, vectors) -> None:
    """``recommender``'s text encoder replaced by one that returns the first rows of ``vectors`` (numpy, one per
    text), for tests of what a model does with new items' vectors (the real encoder: test_recommender.py)."""

    class FixedEncoder:
        def encode(self, texts):
            return vectors[:len(texts)]

    monkeypatch.setattr(recommender, "text_encoder", lambda: FixedEncoder())
