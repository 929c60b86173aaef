"""The popularity prior in every training and evaluation path, its counts from the fit's own targets,
and pretrained checkpoints without the floor's switches (issue 28 #4)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_f32
from unisrec_x.cli import main
from unisrec_x.data.positions import PositionBatch
from unisrec_x.data.sequences import SeqBatch
from unisrec_x.evaluation.metrics import RankingMetrics
from unisrec_x.objectives.sampled_softmax import sampled_softmax_loss
from unisrec_x.training.checkpoint import load_pretrained
from unisrec_x.training.module import SeqRecModule
from unisrec_x.training.pretrain import PretrainModule
from unisrec_x.model.unisrec import UniSRec

N, PLM, WEIGHT = 20, 8, 0.8
DIMS = dict(num_items=N, plm_dim=PLM, hidden_dim=8, n_layers=1, n_heads=2, inner_dim=16, max_seq_len=6, dropout=0.0,
            attn_dropout=0.0, adapter_dropout=0.0, gate_noise=False)
COUNTS = torch.tensor([0] + [int(c) for c in torch.randint(0, 40, (N,), generator=torch.Generator().manual_seed(3))])
PRIOR = WEIGHT * torch.log1p(COUNTS.float())  # (N + 1,) what the prior adds to each item's logit
ITEM_SEQ = torch.tensor([[3, 5, 9, 2, 0], [7, 4, 0, 0, 0], [11, 1, 6, 8, 13]])
SEQ_LEN = torch.tensor([4, 2, 5])


def _modules(**module_args) -> tuple[SeqRecModule, SeqRecModule]:
    """A module whose net has the prior (counts installed) and one without, same weights and text vectors."""
    torch.manual_seed(0)
    features = torch.randn(N + 1, PLM)
    prior = UniSRec(**DIMS, popularity_prior=True, popularity_weight=WEIGHT)
    plain = UniSRec(**DIMS)
    plain.load_state_dict({k: v for k, v in prior.state_dict().items() if "popularity" not in k})
    prior.set_popularity_counts(COUNTS)
    for net in (prior, plain):
        net.set_item_features(features)
    return SeqRecModule(prior, **module_args), SeqRecModule(plain, **module_args)


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_full_softmax_loss_takes_the_prior(positions, chunk_tokens):
    # chunked logits (checkpointed) and, with chunk_tokens, exact micro-batches too
    prior, plain = _modules(loss_chunk_rows=2, encoder_chunk_tokens=chunk_tokens)
    if positions:
        target = torch.tensor([[5, 9, 2, 14, 0], [4, 0, 0, 0, 0], [1, 6, 8, 13, 17]])
        batch = PositionBatch(ITEM_SEQ, SEQ_LEN, target, torch.zeros(3, dtype=torch.long))
        seq_repr = plain.net.encoder.hidden_states(plain.net.item_table()[ITEM_SEQ])[target > 0]
        target = target[target > 0]
    else:
        target = torch.tensor([14, 17, 19])
        batch = SeqBatch(ITEM_SEQ, SEQ_LEN, target, torch.zeros(3, dtype=torch.long))
        seq_repr = plain.net.encode_sequences(ITEM_SEQ, SEQ_LEN)
    expected = F.cross_entropy(plain.net.score(seq_repr, plain.net.item_table()) + PRIOR[1:], target - 1)
    got = prior._full_loss(batch, prior.net.item_table())
    assert prior.loss_path(batch) == ("whole" if chunk_tokens is None else "micro_batches")
    assert_close_f32(got, expected)
    assert not torch.isclose(got, plain._full_loss(batch, plain.net.item_table()))  # the prior matters here
    got.backward()
    assert prior.net.popularity_weight.grad is not None  # learned


def test_sampled_loss_takes_the_prior_of_each_candidate():
    prior, plain = _modules(loss="sampled", num_negatives=6)
    prior.set_training_targets(torch.randint(1, N + 1, (50,), generator=torch.Generator().manual_seed(1)))
    target = torch.tensor([14, 17, 19])
    batch = SeqBatch(ITEM_SEQ, SEQ_LEN, target, torch.zeros(3, dtype=torch.long))
    torch.manual_seed(7)
    got = prior._sampled_loss(batch)
    torch.manual_seed(7)
    candidates = torch.cat([target, prior.sampler.sample()])
    table = plain.net.item_table()
    logits = plain.net.query_vectors(plain.net.encode_sequences(ITEM_SEQ, SEQ_LEN, table)) \
        @ plain.net.candidate_vectors(table[candidates]).T + PRIOR[candidates]
    expected = sampled_softmax_loss(logits, candidates, target, prior.sampler.log_expected_count(candidates, 3))
    assert_close_f32(got, expected)


def test_evaluation_ranks_with_the_prior():
    prior, plain = _modules(eval_chunk_size=7)
    target = torch.tensor([14, 17, 19])
    batch = SeqBatch(ITEM_SEQ, SEQ_LEN, target, torch.zeros(3, dtype=torch.long))
    got = prior.evaluate([batch])
    expected, without = RankingMetrics((10, 50)), RankingMetrics((10, 50))
    with torch.no_grad():
        table = plain.net.item_table()
        logits = plain.net.score(plain.net.encode_sequences(ITEM_SEQ, SEQ_LEN, table), table)
    expected.update(logits + PRIOR[1:], target - 1)
    without.update(logits, target - 1)
    assert got == pytest.approx(expected.compute(), abs=1e-9)
    assert expected.ranks.tolist() != without.ranks.tolist()  # the prior moved the targets


def test_counts_come_from_the_fit_and_only_the_fit():
    torch.manual_seed(0)
    targets = torch.tensor([3, 3, 3, 7, 1, 20, 20])
    data = SimpleNamespace(item_features=torch.randn(N + 1, PLM), num_items=N,
                           examples=lambda split: SimpleNamespace(targets=targets))
    for stage, expected in (("fit", torch.bincount(targets, minlength=N + 1)), ("test", torch.zeros(N + 1))):
        module = SeqRecModule(UniSRec(**DIMS, popularity_prior=True))
        module._trainer = SimpleNamespace(datamodule=data)
        module.setup(stage)  # test / validate / zero-shot runs keep the saved counts (or none)
        assert module.net.popularity_counts.tolist() == expected.tolist()


def _save(tmp_path: Path, net: UniSRec, name: str) -> Path:
    path = tmp_path / name
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def test_a_pretrained_checkpoint_without_the_switches_loads_into_a_model_with_them(tmp_path):
    torch.manual_seed(0)
    pretrained = UniSRec(**{**DIMS, "num_items": 50}, last_item_residual=True)
    path = _save(tmp_path, pretrained, "pre.ckpt")
    fine = UniSRec(**DIMS, last_item_residual=True, history_decay=0.25, learn_history_decay=True,
                   popularity_prior=True, popularity_weight=0.3)
    fresh = load_pretrained(fine, path)
    assert sorted(fresh) == ["encoder.learned_history_decay", "popularity_counts", "popularity_weight"]
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(fine.state_dict()[key], value)
    assert fine.encoder.learned_history_decay.item() == 0.25 and fine.popularity_weight.item() == pytest.approx(0.3)
    assert fine.popularity_counts.tolist() == [0] * (N + 1)
    # counts and weight of another domain never transfer (another catalog size, too); a learned decay does
    source = UniSRec(**{**DIMS, "num_items": 50}, last_item_residual=True, learn_history_decay=True, popularity_prior=True)
    source.set_popularity_counts(torch.arange(51))
    with torch.no_grad():
        source.encoder.learned_history_decay.fill_(0.6)
    assert sorted(load_pretrained(fine, _save(tmp_path, source, "prior.ckpt"))) == ["popularity_counts", "popularity_weight"]
    assert fine.popularity_counts.tolist() == [0] * (N + 1) and fine.encoder.learned_history_decay.item() == pytest.approx(0.6)


def test_pretraining_refuses_the_prior():
    with pytest.raises(ValueError, match="popularity_prior=False"):
        PretrainModule(UniSRec(**DIMS, popularity_prior=True))


def test_the_switches_are_cli_options_without_a_config(capsys):
    net = "--model.init_args.net.init_args."
    with pytest.raises(SystemExit) as done:
        main(["fit", "--model", "unisrec_x.training.module.SeqRecModule", "--model.init_args.net",
              "unisrec_x.model.unisrec.UniSRec", f"{net}popularity_prior", "true", f"{net}popularity_weight", "0.5",
              f"{net}last_item_residual", "true", f"{net}history_decay", "0.5", f"{net}learn_history_decay", "true",
              "--data.dataset", "scientific/Scientific", "--print_config"])
    printed = capsys.readouterr().out
    assert done.value.code == 0
    for line in ("popularity_prior: true", "popularity_weight: 0.5", "history_decay: 0.5", "learn_history_decay: true"):
        assert line in printed
