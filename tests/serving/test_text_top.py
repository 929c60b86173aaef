"""A model with a trained text top (issue 29), from a real fit to every format: the checkpoint, a model directory,
an export, and ``add_items`` encoding new texts through the frozen layers and the trained top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_close_f32
from unisrec_x.cli import main
from unisrec_x.items.encoder import TextEncoder
from unisrec_x.items.token_states import top_layer_weights
from unisrec_x.serving.recommender import Recommender

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NET = "--model.init_args.net.init_args."


@pytest.fixture(scope="module")
def tuned_fit(real_root, tiny_encoder, tmp_path_factory) -> Path:
    """Three steps on 60 real Scientific users with the tiny encoder's last layer trained (at lr 0.01, so that
    three steps move it measurably)."""
    runs = tmp_path_factory.mktemp("tuned-runs")
    main(["fit", "-c", str(CONFIGS / "scientific" / "unisrec_inductive.yaml"), "--data.data_root", str(real_root),
          "--data.max_users", "60", "--data.text_encoder", tiny_encoder, f"{NET}hidden_dim", "8", f"{NET}n_layers", "1",
          f"{NET}inner_dim", "16", f"{NET}text_top_layers", "1", f"{NET}text_top_heads", "2",
          f"{NET}text_top_inner_dim", "64", "--model.init_args.text_top_lr", "0.01", "--model.init_args.text_refresh_steps",
          "2", "--trainer.max_steps", "3", "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(runs)])
    return next(runs.rglob("last.ckpt"))


def test_the_fit_trains_the_top_at_its_own_learning_rate(tuned_fit, tiny_encoder):
    saved = torch.load(tuned_fit, weights_only=True)
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [0.001, 0.01]  # the config's lr for the rest, text_top_lr for the top
    assert len(groups[1]["params"]) == 16  # one BERT layer's weights and biases
    start = top_layer_weights(TextEncoder(tiny_encoder), 1)[0]
    moved = [k for k, v in start.items() if not torch.allclose(saved["state_dict"][f"net.text_top.layers.0.{k}"], v)]
    assert len(moved) >= 12, moved
    assert bool(saved["state_dict"]["net.text_top.initialised"])


def test_every_format_serves_the_trained_top(tuned_fit, real_root, tmp_path):
    rec = Recommender.from_checkpoint(tuned_fit, str(real_root))
    # the served vectors are the trained top's: re-encoding stored texts through it gives them again
    texts = rec.item_texts[:4]
    assert_close_f32(rec.text_encoder().encode(texts), rec.net.item_features[1:5], rtol=2e-3)
    frozen = TextEncoder(rec.text.encoder).encode(texts)
    assert not np.allclose(frozen, rec.net.item_features[1:5].numpy(), atol=1e-3)  # and not the frozen encoder's
    histories = [rec.item_tokens[:3], rec.item_tokens[7:9]]
    expected = [[(r.item, r.score) for r in row] for row in rec.recommend(histories, k=10)]

    rec.save(tmp_path / "model")
    again = Recommender.from_checkpoint(tmp_path / "model")
    assert again.net.text_top is not None
    for key, value in rec.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[key], value), key
    got = [[(r.item, r.score) for r in row] for row in again.recommend(histories, k=10)]
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in expected]
    assert_close_f32([[s for _, s in row] for row in got], [[s for _, s in row] for row in expected])

    # a new item goes through the frozen layers and the trained top: an existing item's text under a new id
    # gets that item's vector
    again.add_items({"copy-of-3": rec.item_texts[2]})
    new_row, old_row = again.candidates[-1], again.candidates[2]
    assert torch.nn.functional.cosine_similarity(new_row, old_row, dim=0) > 0.999

    again.export(tmp_path / "export")
    exported = np.load(tmp_path / "export" / "item_vectors.npy")
    assert_close_f32(exported, again.item_vectors())
    assert exported.shape[0] == rec.num_items + 1


def test_a_top_pooling_unlike_the_data_is_refused_before_training(real_root, tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match="text_top_pooling mean"):
        main(["fit", "-c", str(CONFIGS / "scientific" / "unisrec_inductive.yaml"), "--data.data_root", str(real_root),
              "--data.max_users", "30", "--data.text_encoder", tiny_encoder, "--data.pooling", "mean",
              f"{NET}hidden_dim", "8", f"{NET}n_layers", "1", f"{NET}inner_dim", "16", f"{NET}text_top_layers", "1",
              f"{NET}text_top_heads", "2", f"{NET}text_top_inner_dim", "64", "--trainer.max_steps", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
