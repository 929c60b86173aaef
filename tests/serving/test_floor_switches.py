"""The floor's switches (issue 28 #4) in a served model: the popularity counts, their weight and a learned
history decay travel through checkpoints, model directories and exports; items added later count 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.conftest import assert_close_f32
from tests.serving.conftest import fixed_text_encoder
from unisrec_x.cli import main
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.recommender import Recommender, TextSettings

N, PLM = 6, 8
TOKENS = [f"i{k}" for k in range(1, N + 1)]
COUNTS = torch.tensor([0, 9, 0, 2, 30, 1, 4])
HISTORIES = [["i1", "i2", "i3"], ["i6"], ["i4", "i5"]]
SWITCHES = dict(last_item_residual=True, history_decay=0.3, learn_history_decay=True, popularity_prior=True,
                popularity_weight=0.9)


def _recommender(monkeypatch) -> Recommender:
    """A tiny text model with both switches, its counts installed, and a stand-in text encoder for add_items."""
    torch.manual_seed(0)
    net = UniSRec(num_items=N, plm_dim=PLM, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2, **SWITCHES)
    net.set_popularity_counts(COUNTS)
    features = torch.randn(N + 1, PLM)
    features[0] = 0
    rec = Recommender(net, TOKENS, [f"Item {k}" for k in range(1, N + 1)], features, TextSettings("enc"))
    fixed_text_encoder(monkeypatch, rec, torch.randn(4, PLM, generator=torch.Generator().manual_seed(5)).numpy())
    return rec


def _full_scores(rec: Recommender, histories) -> torch.Tensor:
    """(B, N) logits of the network's plain path, prior included."""
    item_seq, seq_len = rec.encode_histories(histories)
    with torch.inference_mode():
        table = rec.net.item_table()
        return rec.net.score(rec.net.encode_sequences(item_seq, seq_len, table), table)


def _assert_recommends_the_full_scores(rec: Recommender) -> None:
    expected = _full_scores(rec, HISTORIES).topk(rec.num_items, dim=1)
    for row, recs in enumerate(rec.recommend(HISTORIES, k=rec.num_items)):
        assert [rec.token_to_id[r.item] - 1 for r in recs] == expected.indices[row].tolist()
        assert_close_f32([r.score for r in recs], expected.values[row])


def test_added_items_count_0_and_every_score_carries_the_prior(monkeypatch):
    rec = _recommender(monkeypatch)
    _assert_recommends_the_full_scores(rec)
    with torch.inference_mode():  # the prior does move the scores: the same network without it ranks otherwise
        item_seq, seq_len = rec.encode_histories(HISTORIES)
        seq_repr = rec.net.encode_sequences(item_seq, seq_len, rec.table)
        plain = torch.nn.functional.normalize(seq_repr, dim=-1) @ torch.nn.functional.normalize(rec.table[1:], dim=-1).T
    assert_close_f32(_full_scores(rec, HISTORIES), plain / rec.net.temperature + 0.9 * torch.log1p(COUNTS[1:].float()))
    rec.add_items({"new": "a new thing"})
    assert rec.net.num_items == N + 1 and rec.net.popularity_counts.tolist() == COUNTS.tolist() + [0]
    assert rec.candidates.shape == (N + 1, 5) and rec.candidates[-1, -1] == 0  # log(1 + 0)
    _assert_recommends_the_full_scores(rec)


def test_counts_weight_and_decay_survive_a_model_directory(monkeypatch, tmp_path):
    rec = _recommender(monkeypatch)
    rec.add_items({"new": "a new thing"})
    with torch.no_grad():
        rec.net.encoder.learned_history_decay.fill_(0.45)
    again = Recommender.from_checkpoint(rec.save(tmp_path / "model"))
    assert json.loads((tmp_path / "model" / "model.json").read_text())["net"]["num_items"] == N + 1
    assert again.net.popularity_counts.tolist() == COUNTS.tolist() + [0]
    assert again.net.popularity_weight.item() == rec.net.popularity_weight.item()
    assert again.net.encoder.learned_history_decay.item() == rec.net.encoder.learned_history_decay.item() != 0.3
    assert again.recommend([*HISTORIES, ["new", "i2"]], k=N + 1) == rec.recommend([*HISTORIES, ["new", "i2"]], k=N + 1)


def test_exported_arrays_score_as_the_recommender(monkeypatch, tmp_path):
    rec = _recommender(monkeypatch)
    rec.add_items({"new": "a new thing"})
    out = rec.export(tmp_path / "export")
    vectors = np.load(out / "item_vectors.npy")
    assert vectors.shape == (N + 1, 5) and json.loads((out / "manifest.json").read_text())["dim"] == 5
    np.testing.assert_allclose(vectors[:, -1], np.log1p(COUNTS[1:].tolist() + [0]), rtol=1e-6)
    item_seq, seq_len = rec.encode_histories([*HISTORIES, ["new", "i2"]])
    query = torch.jit.load(str(out / "query_encoder.pt"))(item_seq, seq_len).detach().numpy()
    scores = query @ vectors.T
    assert_close_f32(scores, _full_scores(rec, [*HISTORIES, ["new", "i2"]]))
    top_scores, top_ids = rec.top_k(item_seq, seq_len, N + 1)
    assert_close_f32(np.take_along_axis(scores, top_ids.numpy() - 1, axis=1), top_scores)


def test_a_fit_counts_its_training_targets_and_the_checkpoint_serves_them(real_root, tiny_encoder, tmp_path):
    """A two-step fit on 60 real users: the checkpoint holds the fit's counts, and the Recommender read from
    it scores with them and with the learned weight and decay."""
    from unisrec_x.data.datamodule import SeqRecDataModule

    net = "--model.init_args.net.init_args."
    main(["fit", "-c", str(Path(__file__).resolve().parents[2] / "configs" / "scientific" / "unisrec_inductive.yaml"),
          "--data.data_root", str(real_root), "--data.max_users", "60", "--data.text_encoder", tiny_encoder,
          f"{net}hidden_dim", "8", f"{net}n_layers", "1", f"{net}inner_dim", "16",
          *(arg for key, value in SWITCHES.items() for arg in (f"{net}{key}", str(value).lower())),
          "--trainer.max_steps", "2", "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)
    data_args = {k: v for k, v in saved["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    data = SeqRecDataModule(**{**data_args, "data_root": str(real_root)})
    data.setup("fit")
    counts = torch.bincount(data.examples("train").targets, minlength=data.num_items + 1)
    assert saved["state_dict"]["net.popularity_counts"].tolist() == counts.tolist() and counts.sum() > 0
    rec = Recommender.from_checkpoint(checkpoint, str(real_root))
    assert rec.net.popularity_counts.tolist() == counts.tolist()
    for key in ("popularity_weight", "encoder.learned_history_decay"):
        assert rec.net.state_dict()[key].item() == saved["state_dict"][f"net.{key}"].item()
    assert rec.net.popularity_weight.item() != 0.9  # trained: the weight is learned
    histories = [rec.item_tokens[:3], rec.item_tokens[5:6]]
    item_seq, seq_len = rec.encode_histories(histories)
    with torch.inference_mode():
        expected = rec.net.score(rec.net.encode_sequences(item_seq, seq_len, rec.table), rec.table).topk(10, dim=1)
    scores, ids = rec.top_k(item_seq, seq_len, 10)
    assert torch.equal(ids - 1, expected.indices)
    assert_close_f32(scores, expected.values)
