"""Knowledge adapter (KAR's hybrid experts over item fields) and UniSRec's knowledge part."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close_f32
from unisrec_x.model.knowledge import KnowledgeAdapter
from unisrec_x.model.unisrec import UniSRec

N, PLM, FIELDS = 12, 16, ["title", "categories", "brand"]


def _features(rows: int = N + 1) -> torch.Tensor:
    features = torch.randn(rows, len(FIELDS), PLM)
    features[0] = 0  # padding
    features[3, 2] = 0  # item 3 has no brand
    return features


def _adapter(**kw) -> KnowledgeAdapter:
    torch.manual_seed(0)
    adapter = KnowledgeAdapter(PLM, 8, len(FIELDS), **kw).eval()
    with torch.no_grad():  # gates away from their uniform start, so the tests see them work
        adapter.expert_gate.normal_(std=0.5)
        adapter.field_gate.weight.normal_(std=0.5)
    return adapter


def test_shapes_any_leading_dimensions():
    adapter = _adapter()
    assert adapter(_features()).shape == (N + 1, 8)
    assert adapter(_features().view(1, N + 1, len(FIELDS), PLM)).shape == (1, N + 1, 8)


def test_gates_sum_to_one_over_experts_and_over_the_fields_present():
    adapter = _adapter(shared_experts=2, field_experts=3)
    experts, fields = adapter.gates(_features())
    assert experts.shape == (N + 1, 3, 5) and fields.shape == (N + 1, 3)
    assert_close_f32(experts.sum(-1), torch.ones(N + 1, 3))
    assert_close_f32(fields[1:].sum(-1), torch.ones(N))
    assert fields[3, 2] == 0 and (fields[3, :2] > 0).all()  # an empty field is left out, the others share its weight
    assert (fields[0] == 0).all()  # no field at all: nothing


def test_padding_row_is_zero_and_an_empty_field_changes_nothing():
    adapter, features = _adapter(), _features()
    out = adapter(features)
    assert (out[0] == 0).all()
    with torch.no_grad():
        adapter.own[2].linear.weight.add_(1.0)  # brand's own expert
    again = adapter(features)
    assert_close_f32(again[3], out[3])  # item 3 has no brand: brand's expert does not reach it
    assert not torch.allclose(again[4], out[4])


def test_a_fields_own_experts_see_only_that_field():
    adapter, features = _adapter(shared_experts=1, field_experts=1), _features()
    only_title = torch.zeros_like(features)
    only_title[:, 0] = features[:, 0]
    before = adapter(only_title)
    with torch.no_grad():
        adapter.own[1].linear.weight.add_(1.0)  # categories' own
        adapter.own[2].bias.add_(1.0)  # brand's own
    assert_close_f32(adapter(only_title), before)
    with torch.no_grad():
        adapter.own[0].linear.weight.add_(1.0)  # title's own
    assert not torch.allclose(adapter(only_title)[1:], before[1:])


def test_every_part_learns():
    adapter = _adapter()
    adapter.train()
    adapter(_features()).square().sum().backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw, message", [(dict(fields=0), "at least one field"),
                                         (dict(fields=2, shared_experts=0, field_experts=0), "at least one expert")])
def test_bad_sizes_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeAdapter(PLM, 8, **kw)


def _sasrec(**kw) -> UniSRec:
    torch.manual_seed(0)
    return UniSRec(num_items=N, plm_dim=PLM, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=6, use_text=False,
                   use_item_id=True, similarity="dot", **kw)


def test_sasrec_id_with_knowledge_adds_the_augmented_vector_to_each_id_embedding():
    net, features = _sasrec(knowledge_fields=FIELDS).eval(), _features()
    net.set_knowledge_features(features)
    table = net.item_table()
    assert_close_f32(table, net.item_embedding.weight + net.knowledge(features))
    ids = torch.tensor([[1, 3], [5, 0]])
    assert_close_f32(net.item_vectors(ids), table[ids])
    plain = _sasrec()  # without knowledge: the same SASRec as before, key for key
    assert set(net.state_dict()) - set(plain.state_dict()) == {k for k in net.state_dict() if k.startswith("knowledge.")}
    assert "knowledge_features" not in net.state_dict()  # data, installed by the training module, not saved


def test_knowledge_alone_is_the_text_path_over_separate_fields():
    torch.manual_seed(0)
    net = UniSRec(num_items=N, plm_dim=PLM, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=6, use_text=False,
                  knowledge_fields=FIELDS).eval()
    features = _features()
    net.set_knowledge_features(features)
    assert_close_f32(net.item_table(), net.knowledge(features))
    with_text = UniSRec(num_items=N, plm_dim=PLM, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=6,
                        knowledge_fields=FIELDS).eval()
    text = torch.randn(N + 1, PLM)
    with_text.set_item_features(text)
    with_text.set_knowledge_features(features)
    assert_close_f32(with_text.item_table(), with_text.adapter(text) + with_text.knowledge(features))


def test_new_items_get_knowledge_only_and_grow_keeps_them():
    net, features = _sasrec(knowledge_fields=FIELDS).eval(), _features()
    net.set_knowledge_features(features)
    new = torch.randn(2, len(FIELDS), PLM)
    with torch.no_grad():
        vectors = net.new_item_vectors(None, None, new)
        assert_close_f32(vectors, net.knowledge(new))  # no trained ID
        net.grow(None, None, 2, new)
    assert net.num_items == N + 2 and net.knowledge_features.shape == (N + 3, 3, PLM)
    assert_close_f32(net.item_table()[-2:], vectors)
    with pytest.raises(ValueError, match=r"new items need knowledge vectors of shape \(1, 3, 16\)"):
        net.grow(None, None, 1, None)


@pytest.mark.parametrize("features, message", [
    (torch.zeros(N + 1, 2, PLM), r"expected \(items \+ 1, 3, 16\) for the fields \['title', 'categories', 'brand'\]"),
    (torch.zeros(N, 3, PLM), "knowledge features cover 11 items but the ID embedding has 12"),
])
def test_knowledge_features_of_another_shape_are_refused(features, message):
    with pytest.raises(ValueError, match=message):
        _sasrec(knowledge_fields=FIELDS).set_knowledge_features(features)


@pytest.mark.parametrize("fields", [[], ["title", "title"], [""]])
def test_knowledge_fields_must_name_distinct_fields(fields):
    with pytest.raises(ValueError, match="knowledge_fields must name distinct fields"):
        _sasrec(knowledge_fields=fields)


def test_a_model_without_knowledge_vectors_says_so():
    with pytest.raises(RuntimeError, match="call set_knowledge_features first"):
        _sasrec(knowledge_fields=FIELDS).item_table()


def test_pretrained_weights_without_knowledge_load_and_leave_the_adapter_fresh(tmp_path):
    from unisrec_x.training.checkpoint import load_pretrained

    pretrained = _sasrec()
    torch.save({"state_dict": {f"net.{k}": v for k, v in pretrained.state_dict().items()}}, tmp_path / "p.ckpt")
    net = _sasrec(knowledge_fields=FIELDS)
    fresh = load_pretrained(net, tmp_path / "p.ckpt")
    assert {k for k in fresh if k.startswith("knowledge.")} == {k for k in net.state_dict() if k.startswith("knowledge.")}
    assert_close_f32(net.encoder.position.weight, pretrained.encoder.position.weight)


def test_mixed_precision_keeps_absent_fields_out():
    """Under autocast the field gate's logits are half precision: the floor for absent fields must fit them."""
    adapter, features = _adapter(), _features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(features)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    assert_close_f32(out.float(), adapter(features), rtol=5e-2)
