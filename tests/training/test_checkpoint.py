"""Pretrain -> fine-tune hand-off: exact key accounting, frozen parts get no gradient, loud failures."""

from __future__ import annotations

import random

import pytest
import torch

from unisrec_x.errors import DataError
from unisrec_x.training.checkpoint import load_pretrained
from unisrec_x.training.module import SeqRecModule
from unisrec_x.model.unisrec import UniSRec

DIMS = dict(plm_dim=16, hidden_dim=32, inner_dim=24, max_seq_len=10)


def _save(tmp_path, net, name="pre.ckpt"):
    path = tmp_path / name
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    return path


def _features(n):
    f = torch.randn(n + 1, 16)
    f[0] = 0
    return f


def test_transductive_fine_tune_takes_everything_but_a_fresh_id_embedding(tmp_path):
    torch.manual_seed(0)
    pre = UniSRec(num_items=30, **DIMS)
    path = _save(tmp_path, pre)
    fine = UniSRec(num_items=50, use_item_id=True, **DIMS)
    fresh = load_pretrained(fine, path)
    assert fresh == ["item_embedding.weight"]
    for key, value in pre.state_dict().items():
        torch.testing.assert_close(fine.state_dict()[key], value)


def test_frozen_encoder_gets_no_gradient(tmp_path):
    torch.manual_seed(0)
    path = _save(tmp_path, UniSRec(num_items=30, **DIMS))
    module = SeqRecModule(UniSRec(num_items=20, use_item_id=True, **DIMS), pretrained=str(path), freeze_encoder=True)
    module.net.set_item_features(_features(20))
    table = module.net.item_table()
    logits = module.net.score(module.net.encode_sequences(torch.tensor([[1, 2, 3]]), torch.tensor([3]), table), table)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in module.net.encoder.parameters())
    assert module.net.adapter.experts[0].linear.weight.grad is not None
    assert module.net.item_embedding.weight.grad is not None


@pytest.mark.parametrize("change, message", [
    (dict(hidden_dim=48, inner_dim=24), "other dimensions"),
    (dict(n_layers=3), "unexpected keys|missing keys"),
    (dict(plm_dim=8), "other dimensions"),
])
def test_mismatched_models_fail_loudly(tmp_path, change, message):
    path = _save(tmp_path, UniSRec(num_items=30, **DIMS))
    with pytest.raises(DataError, match=message):
        load_pretrained(UniSRec(num_items=30, **{**DIMS, **change}), path)


def test_id_only_checkpoint_does_not_fit_a_text_model(tmp_path):
    path = _save(tmp_path, UniSRec(num_items=30, use_text=False, use_item_id=True, **DIMS))
    with pytest.raises(DataError, match="missing keys"):
        load_pretrained(UniSRec(num_items=30, **DIMS), path)


def test_missing_truncated_and_malicious_checkpoints_are_refused(tmp_path):
    net = UniSRec(num_items=30, **DIMS)
    with pytest.raises(DataError, match="checkpoint not found"):
        load_pretrained(net, tmp_path / "nope.ckpt")
    path = _save(tmp_path, net)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated or corrupted"):
        load_pretrained(net, path)

    class Payload:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": Payload()}, evil)
    with pytest.raises(DataError, match="refused"):
        load_pretrained(net, evil)
    assert not (tmp_path / "PWNED").exists() and not __import__("pathlib").Path("PWNED").exists()


def test_empty_cut_and_damaged_checkpoints_always_say_why(tmp_path):
    net = UniSRec(num_items=30, **DIMS)
    path = _save(tmp_path, net)
    good = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"pre.ckpt: checkpoint is truncated or corrupted \(file is empty \(0 bytes\)\)$"):
        load_pretrained(net, path)
    rng = random.Random(0)
    damaged = [good[:n] for n in range(1, len(good), max(1, len(good) // 150))]
    for _ in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        damaged.append(bytes(data))
    for data in damaged:  # torch fails with EOFError(''), IndexError, KeyError, UnicodeDecodeError, TypeError ...
        path.write_bytes(data)
        try:
            load_pretrained(UniSRec(num_items=30, **DIMS), path)
        except DataError as err:
            assert err.path == str(path) and "()" not in str(err), str(err)  # a reason is always given


def test_state_dict_with_values_other_than_tensors_is_refused(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"net.encoder.position.weight": 3, 7: torch.zeros(1)}}, path)
    with pytest.raises(DataError, match=r"odd.ckpt: state_dict holds entries that are not named tensors: 'net.encoder"):
        load_pretrained(UniSRec(num_items=30, **DIMS), path)


def test_a_refused_pickle_says_why_without_torchs_advice_to_load_it_unsafely(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": Payload()}, evil)
    with pytest.raises(DataError) as err:
        load_pretrained(UniSRec(num_items=30, **DIMS), evil)
    message = str(err.value)
    assert message == (f"{evil}: checkpoint holds objects other than tensors and plain values (exec), "
                       "which could run code when loaded; refused")
    assert "weights_only" not in message and "\x1b" not in message  # torch's advice (and its terminal colours)


ID_ONLY = dict(use_text=False, use_item_id=True, similarity="dot")


def test_same_domain_start_keeps_the_item_ids(tmp_path):
    """CTRL's fine-tune runs on the catalog it was aligned on: its ID rows are the aligned ones, not fresh."""
    torch.manual_seed(0)
    aligned = UniSRec(num_items=30, **ID_ONLY, **DIMS)
    path = _save(tmp_path, aligned)
    fine = UniSRec(num_items=30, **ID_ONLY, **DIMS)
    assert load_pretrained(fine, path, same_domain=True) == []
    for key, value in aligned.state_dict().items():
        torch.testing.assert_close(fine.state_dict()[key], value, rtol=0, atol=0)
    other = UniSRec(num_items=30, **ID_ONLY, **DIMS)
    assert load_pretrained(other, path) == ["item_embedding.weight"]  # across domains they start fresh
    assert not torch.equal(other.item_embedding.weight, aligned.item_embedding.weight)


def test_same_domain_start_refuses_another_catalog(tmp_path):
    path = _save(tmp_path, UniSRec(num_items=30, **ID_ONLY, **DIMS))
    with pytest.raises(DataError, match=r"pre.ckpt: checkpoint has 30 items, this data has 31: a same-domain start"):
        load_pretrained(UniSRec(num_items=31, **ID_ONLY, **DIMS), path, same_domain=True)
    text_only = _save(tmp_path, UniSRec(num_items=31, **DIMS), "text.ckpt")  # e.g. a cross-domain pretrained model
    with pytest.raises(DataError, match=r"missing keys \['item_embedding.weight'\].*same-domain start"):
        load_pretrained(UniSRec(num_items=31, use_item_id=True, **DIMS), text_only, same_domain=True)
    with pytest.raises(ValueError, match="name one with pretrained"):
        SeqRecModule(UniSRec(num_items=31, **ID_ONLY, **DIMS), pretrained_same_domain=True)
