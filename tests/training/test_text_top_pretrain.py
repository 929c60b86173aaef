"""A text top pretrained on the sources (issue 29 #3): pretraining reads only the sources, and a fine-tune
starts from the pretrained top instead of the encoder's own layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unisrec_x.cli import main
from unisrec_x.data import datamodule
from unisrec_x.items.encoder import TextEncoder
from unisrec_x.items.token_states import top_layer_weights
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.training.pretrain import PretrainModule

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
NET = "--model.init_args.net.init_args."
TOP = [f"{NET}text_top_layers", "1", f"{NET}text_top_heads", "2", f"{NET}text_top_inner_dim", "64"]


def test_pretraining_a_top_reads_only_the_sources_and_a_fine_tune_starts_from_it(real_root, tiny_encoder, tmp_path,
                                                                                  monkeypatch):
    read = []
    loader = datamodule.load_domain
    monkeypatch.setattr(datamodule, "load_domain", lambda prefix, *a, **k: read.append(str(prefix)) or loader(prefix, *a, **k))
    monkeypatch.setenv("UNISREC_X_CACHE", str(tmp_path / "cache"))
    main(["fit", "-c", str(REPO / "configs" / "pretrain" / "pretrain.yaml"), *QUIET, *TOP, "--data.max_users", "80",
          "--data.batch_size", "128", "--data.text_encoder", tiny_encoder, "--data.data_root", str(real_root),
          "--model.init_args.item_drop_view_prob", "1", "--model.init_args.text_top_lr", "0.01",
          "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert sorted(Path(p).name.lower() for p in read) == ["games", "toys"], read  # the sources, nothing else
    states = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "token-states").iterdir() if p.is_dir())
    assert states and all(name in ("games", "toys") for name in states), states

    pretrained = next((tmp_path / "runs").rglob("last.ckpt"))
    top = {k: v for k, v in torch.load(pretrained, weights_only=True)["state_dict"].items() if ".text_top." in k}
    start = top_layer_weights(TextEncoder(tiny_encoder), 1)[0]
    assert not torch.allclose(top["net.text_top.layers.0.output.dense.weight"], start["output.dense.weight"])

    read.clear()
    main(["fit", "-c", str(REPO / "configs" / "transfer" / "finetune_inductive.yaml"), *QUIET, *TOP,
          f"{NET}last_item_residual", "true", "--model.init_args.pretrained", str(pretrained),
          "--data.max_users", "60", "--data.text_encoder", tiny_encoder, "--data.data_root", str(real_root),
          "--model.init_args.text_top_lr", "0", "--trainer.max_steps", "1", "--test_after_fit", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "finetune")])
    tuned = torch.load(next((tmp_path / "finetune").rglob("last.ckpt")), weights_only=True)["state_dict"]
    for key, value in top.items():  # lr 0: the fine-tune's top is the pretrained one, not the encoder's layer
        assert torch.equal(tuned[key], value), key


def test_word_drop_views_are_refused_with_a_text_top():
    net = UniSRec(plm_dim=8, hidden_dim=4, n_heads=2, text_top_layers=1, text_top_heads=2, text_top_inner_dim=16)
    with pytest.raises(ValueError, match="item_drop_view_prob=1"):
        PretrainModule(net, item_drop_view_prob=0.9)
    PretrainModule(net, item_drop_view_prob=1.0)
    PretrainModule(net, lambda_seq_seq=0.0)
