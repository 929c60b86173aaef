"""The floor's two switches on the model (issue 28 #4): a decayed-history residual and a popularity prior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_f32
from unisrec_x.model.unisrec import UniSRec

N, PLM = 12, 8
DIMS = dict(num_items=N, plm_dim=PLM, hidden_dim=8, n_layers=1, n_heads=2, inner_dim=16, max_seq_len=6)
ITEM_SEQ, SEQ_LEN = torch.tensor([[3, 5, 9, 2], [7, 4, 0, 0], [11, 0, 0, 0]]), torch.tensor([4, 2, 1])


def _twins(**switches) -> tuple[UniSRec, UniSRec]:
    """A model with ``switches`` and one without them, with the same weights and text vectors."""
    torch.manual_seed(0)
    features = torch.randn(N + 1, PLM)
    switched = UniSRec(**DIMS, **switches).eval()
    plain_args = {k: v for k, v in switches.items() if k not in
                  ("history_decay", "learn_history_decay", "popularity_prior", "popularity_weight")}
    plain = UniSRec(**DIMS, **plain_args).eval()
    plain.load_state_dict({k: v for k, v in switched.state_dict().items() if k in plain.state_dict()})
    for net in (switched, plain):
        net.set_item_features(features)
    return switched, plain


def test_defaults_add_no_state_and_decay_0_is_the_plain_last_item_residual():
    for switches in (dict(), dict(last_item_residual=True)):
        switched, plain = _twins(**switches, history_decay=0.0)
        assert switched.state_dict().keys() == plain.state_dict().keys()  # old checkpoints load as they are
        assert not any("popularity" in k or "history_decay" in k for k in switched.state_dict())
    learned, plain = _twins(last_item_residual=True, learn_history_decay=True)  # decay 0 through the decay path
    with torch.no_grad():
        plain.encoder.residual_weight.fill_(0.7)
        learned.encoder.residual_weight.fill_(0.7)
        assert_close_f32(learned.encoder.hidden_states(learned.item_table()[ITEM_SEQ]),
                         plain.encoder.hidden_states(plain.item_table()[ITEM_SEQ]))


@pytest.mark.parametrize("learn", [False, True])
def test_history_decay_gives_the_hand_computed_weighted_sum_at_every_position(learn):
    decay, weight = 0.5, 0.7
    switched, plain = _twins(last_item_residual=True, history_decay=decay, learn_history_decay=learn)
    without = UniSRec(**DIMS).eval()  # the Transformer alone, same weights
    without.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "encoder.residual_weight"})
    with torch.no_grad():
        switched.encoder.residual_weight.fill_(weight)
        emb = switched.item_table()[ITEM_SEQ]  # (B, L, D)
        got = switched.encoder.hidden_states(emb)
        transformer = F.normalize(without.encoder.hidden_states(emb), dim=-1)
        unit = F.normalize(emb, dim=-1)
        for b in range(len(ITEM_SEQ)):
            for t in range(int(SEQ_LEN[b])):  # real positions only (padding outputs are never read)
                history = sum(decay ** (t - j) * unit[b, j] for j in range(t + 1))
                assert_close_f32(got[b, t], transformer[b, t] + weight * F.normalize(history, dim=-1))
        # the sequence vector is the last real position's
        assert_close_f32(switched.encode_sequences(ITEM_SEQ, SEQ_LEN), got[torch.arange(3), SEQ_LEN - 1])


def test_a_learned_decay_at_0_gets_a_finite_gradient():
    net, _ = _twins(last_item_residual=True, learn_history_decay=True)
    decay = net.encoder.learned_history_decay
    assert decay.item() == 0.0 and isinstance(decay, torch.nn.Parameter)
    net.score(net.encode_sequences(ITEM_SEQ, SEQ_LEN), net.item_table()).logsumexp(-1).sum().backward()
    assert torch.isfinite(decay.grad) and decay.grad != 0  # pow(0, 0)'s gradient would be NaN
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with torch.no_grad():  # pushed out of [0, 1], it is used clamped and still hears the loss
        decay.fill_(-0.3)
    decay.grad = None
    assert_close_f32(net.encode_sequences(ITEM_SEQ, SEQ_LEN), _twins(last_item_residual=True)[0].encode_sequences(ITEM_SEQ, SEQ_LEN))
    net.score(net.encode_sequences(ITEM_SEQ, SEQ_LEN), net.item_table()).logsumexp(-1).sum().backward()
    assert decay.grad != 0


def test_decay_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="set last_item_residual"):
        UniSRec(**DIMS, history_decay=0.5)
    with pytest.raises(ValueError, match=r"history_decay must lie in \[0, 1\]"):
        UniSRec(**DIMS, last_item_residual=True, history_decay=1.5)
    with pytest.raises(ValueError, match="set popularity_prior"):
        UniSRec(**DIMS, popularity_weight=0.3)


def test_prior_adds_weight_times_log1p_count_to_every_logit():
    switched, plain = _twins(popularity_prior=True, popularity_weight=0.4)
    counts = torch.tensor([0, 5, 0, 1, 30, 2, 0, 7, 1, 0, 3, 100, 9])
    switched.set_popularity_counts(counts)
    with torch.no_grad():
        table = switched.item_table()
        seq_repr = switched.encode_sequences(ITEM_SEQ, SEQ_LEN, table)
        expected = plain.score(seq_repr, table) + 0.4 * torch.log1p(counts[1:].float())
        assert_close_f32(switched.score(seq_repr, table), expected)
        ids = torch.tensor([11, 2, 4, 11])  # a subset names its items
        assert_close_f32(switched.query_vectors(seq_repr) @ switched.candidate_vectors(table[ids], ids).T,
                         plain.query_vectors(seq_repr) @ plain.candidate_vectors(table[ids]).T
                         + 0.4 * torch.log1p(counts[ids].float()))
    assert "popularity_counts" in switched.state_dict() and "popularity_weight" in switched.state_dict()
    with pytest.raises(ValueError, match=r"expected \(13,\)"):
        switched.set_popularity_counts(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="popularity counts has 12"):
        switched.set_item_features(torch.randn(N + 3, PLM))


def test_grown_items_count_0_and_grow_the_catalog():
    net, _ = _twins(popularity_prior=True, popularity_weight=1.0)
    net.set_popularity_counts(torch.arange(N + 1))
    with torch.no_grad():
        net.grow(torch.randn(2, PLM), None, 2)
    assert net.num_items == N + 2 and net.popularity_counts.tolist() == list(range(N + 1)) + [0, 0]
    assert net.candidate_vectors(net.item_table()[1:])[-2:, -1].tolist() == [0.0, 0.0]
    # rows past the counts (an item about to be added) count 0 too
    assert net.candidate_vectors(torch.randn(1, 8), torch.tensor([N + 5]))[0, -1] == 0
