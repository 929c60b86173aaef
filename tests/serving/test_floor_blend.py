"""A served model that carries the floor: the recommender, a model directory and an export all rank by
``score + weight * floor``; an item added later enters the floor with its text and count 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_f32
from tests.serving.conftest import fixed_text_encoder
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.recommender import Recommender, TextSettings

N, PLM = 6, 8
TOKENS = [f"i{k}" for k in range(1, N + 1)]
COUNTS = torch.tensor([0, 9, 0, 2, 30, 1, 4])
HISTORIES = [["i1", "i2", "i3"], ["i6"], ["i4", "i5"], ["new", "i2"]]
WEIGHT, DECAY, BETA = 5.0, 0.5, 0.03


def _recommender(monkeypatch) -> Recommender:
    torch.manual_seed(0)
    net = UniSRec(num_items=N, plm_dim=PLM, hidden_dim=4, n_heads=2, inner_dim=8, max_seq_len=4, n_experts=2,
                  floor_blend=True)
    net.set_popularity_counts(COUNTS)
    net.set_floor(WEIGHT, DECAY, BETA)
    features = torch.randn(N + 1, PLM)
    features[0] = 0
    rec = Recommender(net, TOKENS, [f"Item {k}" for k in range(1, N + 1)], features, TextSettings("enc"))
    fixed_text_encoder(monkeypatch, rec, torch.randn(4, PLM, generator=torch.Generator().manual_seed(5)).numpy())
    rec.add_items({"new": "a new thing"})
    return rec


def _hand_scores(rec: Recommender, histories) -> torch.Tensor:
    """(B, N + 1): the model's own logits plus WEIGHT x the floor, written out."""
    item_seq, seq_len = rec.encode_histories(histories)
    with torch.inference_mode():
        own = rec.net.score(rec.net.encode_sequences(item_seq, seq_len, rec.table), rec.table)
    unit = F.normalize(rec.net.item_features, dim=-1)
    counts = torch.cat([COUNTS[1:], torch.zeros(1, dtype=torch.long)]).float()  # the added item counts 0
    rows = []
    for seq, length in zip(item_seq.tolist(), seq_len.tolist()):
        history = sum(DECAY ** age * unit[item] for age, item in enumerate(reversed(seq[:length])))
        rows.append(F.normalize(history, dim=0) @ unit[1:].T + BETA * torch.log1p(counts))
    return own + WEIGHT * torch.stack(rows)


def test_recommendations_carry_the_floor_for_old_and_added_items(monkeypatch):
    rec = _recommender(monkeypatch)
    expected = _hand_scores(rec, HISTORIES).topk(N + 1, dim=1)
    for row, recs in enumerate(rec.recommend(HISTORIES, k=N + 1)):
        assert [rec.token_to_id[r.item] - 1 for r in recs] == expected.indices[row].tolist()
        assert_close_f32([r.score for r in recs], expected.values[row])


def test_the_floor_survives_a_model_directory(monkeypatch, tmp_path):
    rec = _recommender(monkeypatch)
    again = Recommender.from_checkpoint(rec.save(tmp_path / "model"))
    assert again.net.floor_knobs.tolist() == pytest.approx([WEIGHT, DECAY, BETA])
    assert again.net.popularity_counts.tolist() == COUNTS.tolist() + [0]
    assert again.recommend(HISTORIES, k=N + 1) == rec.recommend(HISTORIES, k=N + 1)


def test_exported_arrays_score_with_the_floor(monkeypatch, tmp_path):
    rec = _recommender(monkeypatch)
    out = rec.export(tmp_path / "export")
    vectors = np.load(out / "item_vectors.npy")
    assert vectors.shape == (N + 1, 4 + PLM + 1) and json.loads((out / "manifest.json").read_text())["dim"] == 4 + PLM + 1
    item_seq, seq_len = rec.encode_histories(HISTORIES)
    query = torch.jit.load(str(out / "query_encoder.pt"))(item_seq, seq_len).detach().numpy()
    assert_close_f32(query @ vectors.T, _hand_scores(rec, HISTORIES))
