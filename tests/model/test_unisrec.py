"""Model properties: shapes, causality, padding invariance, variants."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close_f32
from unisrec_x.model.moe_adapter import MoEAdapter
from unisrec_x.model.seq_encoder import SequenceEncoder
from unisrec_x.model.unisrec import UniSRec

N, PLM = 40, 16


def _net(**kw) -> UniSRec:
    torch.manual_seed(0)
    net = UniSRec(num_items=N, plm_dim=PLM, hidden_dim=32, inner_dim=24, max_seq_len=10, **kw)
    feats = torch.randn(N + 1, PLM)
    feats[0] = 0
    if net.use_text:
        net.set_item_features(feats)
    return net.eval()


@pytest.mark.parametrize("kw", [dict(use_text=True), dict(use_text=True, use_item_id=True),
                                dict(use_text=False, use_item_id=True, similarity="dot")])
def test_shapes(kw):
    net = _net(**kw)
    table = net.item_table()
    assert table.shape == (N + 1, 32)
    seq = torch.tensor([[1, 2, 3], [4, 5, 0]])
    repr_ = net.encode_sequences(seq, torch.tensor([3, 2]), table)
    assert repr_.shape == (2, 32)
    assert net.score(repr_, table).shape == (2, N)


def test_future_items_never_change_earlier_positions():
    enc = SequenceEncoder(hidden_dim=32, inner_dim=24, max_seq_len=10).eval()
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 32)
    for t in range(1, 5):  # outputs at positions 0..3 depend only on positions <= t-1
        length = torch.tensor([t])
        torch.testing.assert_close(enc(x, length), enc(y, length))


def test_padding_width_does_not_change_output():
    net = _net(use_text=True, use_item_id=True)
    seq = torch.tensor([[3, 7, 9]])
    padded = torch.tensor([[3, 7, 9, 0, 0, 0, 0]])
    torch.testing.assert_close(net.encode_sequences(seq, torch.tensor([3])),
                               net.encode_sequences(padded, torch.tensor([3])))


def test_cosine_scores_are_bounded_by_temperature():
    net = _net(use_text=True, temperature=0.1)
    table = net.item_table()
    logits = net.score(net.encode_sequences(torch.tensor([[1, 2]]), torch.tensor([2]), table), table)
    assert logits.abs().max() <= 10.0 + 1e-4


def test_gates_sum_to_one_and_noise_only_in_training():
    adapter = MoEAdapter(PLM, 8, n_experts=4)
    torch.nn.init.normal_(adapter.gate_noise)
    x = torch.randn(5, PLM)
    adapter.eval()
    torch.testing.assert_close(adapter.gates(x).sum(-1), torch.ones(5))
    torch.testing.assert_close(adapter.gates(x), adapter.gates(x))
    adapter.train()
    assert not torch.allclose(adapter.gates(x), adapter.gates(x))


def test_invalid_configurations():
    with pytest.raises(ValueError, match="text, an ID embedding or codes"):
        UniSRec(num_items=5, use_text=False, use_item_id=False)
    with pytest.raises(RuntimeError, match="set_item_features"):
        UniSRec(num_items=5, plm_dim=PLM).item_table()
    with pytest.raises(ValueError, match=r"expected \(items \+ 1, 16\)"):
        UniSRec(num_items=5, plm_dim=PLM).set_item_features(torch.zeros(6, 8))
    with pytest.raises(ValueError, match="text features cover 3 items but the ID embedding has 5"):
        UniSRec(num_items=5, plm_dim=PLM, use_item_id=True).set_item_features(torch.zeros(4, PLM))


def test_history_longer_than_positions_is_refused():
    net = _net(use_text=True)
    with pytest.raises(ValueError, match="longer than max_seq_len 10"):
        net.encode_sequences(torch.ones(1, 11, dtype=torch.long), torch.tensor([11]))


def test_last_item_residual_adds_the_unit_last_item_vector_with_a_learned_weight():
    torch.manual_seed(0)
    net = UniSRec(num_items=30, plm_dim=12, hidden_dim=8, n_layers=1, last_item_residual=True).eval()
    net.set_item_features(torch.randn(31, 12))
    plain = UniSRec(num_items=30, plm_dim=12, hidden_dim=8, n_layers=1).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k != "encoder.residual_weight"})
    plain.set_item_features(net.item_features)
    with torch.no_grad():
        net.encoder.residual_weight.fill_(0.7)
        item_seq, seq_len = torch.tensor([[3, 5, 9, 0], [7, 0, 0, 0]]), torch.tensor([3, 1])
        table = net.item_table()
        last = table[item_seq[torch.arange(2), seq_len - 1]]
        expected = torch.nn.functional.normalize(plain.encode_sequences(item_seq, seq_len), dim=-1) \
            + 0.7 * torch.nn.functional.normalize(last, dim=-1)
        torch.testing.assert_close(net.encode_sequences(item_seq, seq_len), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(net.encoder.residual_weight, torch.nn.Parameter)  # learned, and saved with the model
    with pytest.raises(ValueError, match="cosine"):
        UniSRec(num_items=30, use_text=False, use_item_id=True, similarity="dot", last_item_residual=True)


def test_batched_adapter_equals_the_per_expert_sum_with_its_gradients():
    """The MoE adapter runs its experts as one product with the shift applied after it; this is
    UniSRec's per-expert form, sum_e gate_e * W_e (x - b_e), written out."""
    torch.manual_seed(0)
    adapter = MoEAdapter(16, 12, n_experts=3, dropout=0.0, gate_noise=False)
    for expert in adapter.experts:
        torch.nn.init.normal_(expert.bias)
    torch.nn.init.normal_(adapter.gate)
    x = torch.randn(4, 5, 16)

    def per_expert(x):
        outputs = torch.stack([expert.linear(x - expert.bias) for expert in adapter.experts], dim=-2)
        return (adapter.gates(x).unsqueeze(-1) * outputs).sum(-2)

    params = list(adapter.parameters())
    got, expected = adapter(x), per_expert(x)
    assert_close_f32(got, expected)
    for g, e in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(expected.square().sum(), params)):
        assert_close_f32(g, e, rtol=1e-4)
    # training: each expert drops with its own rate; expert 0 drops everything, the others nothing
    adapter.experts[0].dropout.p = 1.0
    dropped = torch.stack([expert.linear((x if i else torch.zeros_like(x)) - expert.bias)
                           for i, expert in enumerate(adapter.experts)], dim=-2)
    assert_close_f32(adapter.train()(x), (adapter.gates(x).unsqueeze(-1) * dropped).sum(-2))
    adapter.experts[0].dropout.p = 0.5  # every expert draws its own mask: identical rows come out different
    out = adapter(x[:1, :1].expand(1, 64, 16))
    assert out.shape == (1, 64, 12) and not torch.allclose(out[0, 0], out[0, 1])
