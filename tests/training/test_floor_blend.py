"""A model that carries the floor (issue 28 #4): ``score + weight * floor`` in evaluation, the weight chosen on
validation after the fit, the choice in the checkpoint that is tested and in the record; never transferred."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_f32
from unisrec_x.cli import main
from unisrec_x.data.sequences import SeqBatch
from unisrec_x.evaluation.baselines import FloorKnobs, floor
from unisrec_x.evaluation.metrics import RankingMetrics
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.recommender import Recommender
from unisrec_x.training.checkpoint import load_pretrained
from unisrec_x.training.floor_blend import blended_checkpoint, choose_floor_blend
from unisrec_x.training.module import SeqRecModule

N, PLM = 30, 8
DIMS = dict(num_items=N, plm_dim=PLM, hidden_dim=8, n_layers=1, n_heads=2, inner_dim=16, max_seq_len=6, dropout=0.0,
            attn_dropout=0.0, adapter_dropout=0.0, gate_noise=False)
ITEM_SEQ = torch.tensor([[3, 5, 9, 2, 0], [7, 4, 0, 0, 0], [11, 1, 6, 8, 13]])
SEQ_LEN = torch.tensor([4, 2, 5])
COUNTS = torch.tensor([0] + [int(c) for c in torch.randint(0, 40, (N,), generator=torch.Generator().manual_seed(3))])


def _module(**net_args) -> SeqRecModule:
    torch.manual_seed(0)
    net = UniSRec(**DIMS, floor_blend=True, **net_args)
    net.set_item_features(torch.randn(N + 1, PLM))
    net.set_popularity_counts(COUNTS)
    return SeqRecModule(net, eval_chunk_size=7)


def _hand_floor(net: UniSRec, decay: float, beta: float) -> torch.Tensor:
    """(B, N): cos(unit decayed history, item) + beta * log(1 + count), written out row by row."""
    unit = F.normalize(net.item_features, dim=-1)
    rows = []
    for seq, length in zip(ITEM_SEQ.tolist(), SEQ_LEN.tolist()):
        history = sum(decay ** age * unit[item] for age, item in enumerate(reversed(seq[:length])))
        rows.append(F.normalize(history, dim=0) @ unit[1:].T + beta * torch.log1p(COUNTS[1:].float()))
    return torch.stack(rows)


def test_ranking_adds_the_weighted_floor_to_the_models_own_scores():
    module = _module()
    net = module.net.eval()
    with torch.no_grad():
        table = net.item_table()
        seq_repr = net.encode_sequences(ITEM_SEQ, SEQ_LEN, table)
        alone = net.score(seq_repr, table)
        # weight 0 (not chosen yet): ranking is the model's own, with no extra coordinates
        assert torch.equal(net.rank_queries(seq_repr, ITEM_SEQ, SEQ_LEN), net.query_vectors(seq_repr))
        net.set_floor(3.0, 0.5, 0.04)
        blended = net.rank_queries(seq_repr, ITEM_SEQ, SEQ_LEN) @ net.rank_candidates(table[1:]).T
        # the training loss never sees the floor: score() is the model alone
        assert torch.equal(net.score(seq_repr, table), alone)
    assert_close_f32(blended, alone + 3.0 * _hand_floor(net, 0.5, 0.04))
    target = torch.tensor([14, 17, 19])
    expected = RankingMetrics((10, 50))
    expected.update(blended, target - 1)
    assert module.evaluate([SeqBatch(ITEM_SEQ, SEQ_LEN, target, torch.zeros(3, dtype=torch.long))]) == \
        pytest.approx(expected.compute(), abs=1e-9)


def test_the_choice_is_made_on_the_batches_it_is_given_and_weight_0_stays_a_candidate():
    module = _module()
    features = module.net.item_features
    # targets the floor finds (the item whose text is nearest the last history item) but a random model does not
    unit = F.normalize(features, dim=-1)
    last = ITEM_SEQ.gather(1, (SEQ_LEN - 1).unsqueeze(1)).squeeze(1)
    similarity = unit[last] @ unit[1:].T
    similarity[torch.arange(3), last - 1] = -2
    target = similarity.argmax(dim=1) + 1
    batches = [SeqBatch(ITEM_SEQ, SEQ_LEN, target, torch.zeros(3, dtype=torch.long))]
    choice = choose_floor_blend(module, batches)
    scores = choice["validation_ndcg@10"]
    assert choice["weight"] > 0 and module.net.floor_active
    assert scores["blend"] == max(scores["weights"].values()) > scores["model"]
    assert list(module.net.floor_knobs) == pytest.approx([choice["weight"], choice["decay"], choice["beta"]])
    assert module.evaluate(batches)["ndcg@10"] == pytest.approx(scores["blend"], abs=1e-6)  # what is tested
    # the floor's own knobs are the floor grid's on the same rows, with the model's own counts (the ones it adds)
    floor_alone = floor(features, COUNTS, batches, FloorKnobs(choice["decay"], choice["beta"]))
    assert scores["floor"] == pytest.approx(floor_alone["ndcg@10"], abs=1e-6)
    # a model that ranks the targets first already: the floor can only tie, so weight 0 (ties: the smaller)
    with torch.no_grad():
        module.net.set_floor(0.0, 0.0, 0.0)
        table = module.net.item_table()
        query = module.net.query_vectors(module.net.encode_sequences(ITEM_SEQ, SEQ_LEN, table))
    perfect = [SeqBatch(ITEM_SEQ, SEQ_LEN, (query @ module.net.candidate_vectors(table[1:]).T).argmax(1) + 1,
                        torch.zeros(3, dtype=torch.long))]
    assert choose_floor_blend(module, perfect)["weight"] == 0.0
    assert not module.net.floor_active


def test_knobs_are_checked_and_need_the_switch():
    with pytest.raises(ValueError, match="floor_blend=False"):
        UniSRec(**DIMS).set_floor(1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="decay in"):
        _module().net.set_floor(1.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="needs use_text"):
        UniSRec(**DIMS, use_text=False, use_item_id=True, similarity="dot", floor_blend=True)


def test_the_floor_is_never_transferred_from_a_pretrained_checkpoint(tmp_path):
    source = _module().net
    source.set_floor(8.0, 0.25, 0.02)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, path)
    for same_domain in (False, True):  # not even from the same data: a fit starts alone and chooses after
        fine = UniSRec(**DIMS, floor_blend=True)
        assert "floor_knobs" in load_pretrained(fine, path, same_domain=same_domain)
        assert fine.floor_knobs.tolist() == [0.0, 0.0, 0.0] and not fine.floor_active
        assert fine.popularity_counts.tolist() == (COUNTS.tolist() if same_domain else [0] * (N + 1))


def test_a_fit_tests_the_blended_checkpoint_and_records_the_choice(real_root, tiny_encoder, tmp_path):
    """A short fit on 80 real users: the weights tested are the best epoch's plus the chosen floor, saved as
    blended.ckpt; test_metrics.json says what was chosen on validation."""
    net = "--model.init_args.net.init_args."
    main(["fit", "-c", str(Path(__file__).resolve().parents[2] / "configs" / "scientific" / "unisrec_inductive.yaml"),
          "--data.data_root", str(real_root), "--data.max_users", "80", "--data.text_encoder", tiny_encoder,
          f"{net}hidden_dim", "8", f"{net}n_layers", "1", f"{net}inner_dim", "16", f"{net}floor_blend", "true",
          "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    blended = next((tmp_path / "runs").rglob("blended.ckpt"))
    record = json.loads((blended.parents[1] / "test_metrics.json").read_text())
    assert record["checkpoint"] == str(blended)
    choice = record["floor_blend"]
    knobs = torch.load(blended, weights_only=True)["state_dict"]["net.floor_knobs"]
    assert knobs.tolist() == pytest.approx([choice["weight"], choice["decay"], choice["beta"]])
    scores = choice["validation_ndcg@10"]
    assert scores["blend"] == max(scores["weights"].values()) >= scores["model"]
    assert set(scores["weights"]) >= {"0.0", "1.0", "128.0"}
    # the weights blended are the best epoch's: alone they score what the fit was selected on
    assert scores["model"] == pytest.approx(record["best_validation"]["val/ndcg@10"], abs=1e-5)
    served = Recommender.from_checkpoint(blended, str(real_root))  # serves what was tested
    assert served.net.floor_knobs.tolist() == pytest.approx(knobs.tolist())



def test_without_checkpoints_the_blend_stays_in_memory():
    """A trainer without a checkpoint callback: the choice is set on the module, which is tested as it is."""
    module = _module()
    batches = [SeqBatch(ITEM_SEQ, SEQ_LEN, torch.tensor([14, 17, 19]), torch.zeros(3, dtype=torch.long))]
    trainer = SimpleNamespace(checkpoint_callback=None, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    data = SimpleNamespace(blend_dataloader=lambda: batches)
    assert blended_checkpoint(trainer, module, data, tested=None) is None
    assert module.floor_blend_choice["weight"] == pytest.approx(float(module.net.floor_knobs[0]))
