"""The trainable text top (issue 29): cached frozen-layer states + the top give the encoder's own vectors, and
training moves only the top's layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unisrec_x.items.encoder import PACKAGED_ENCODER, TextEncoder
from unisrec_x.items.token_states import TokenStateCache, encoder_shape, top_layer_weights
from unisrec_x.model.text_top import TextTop
from unisrec_x.model.unisrec import UniSRec


@pytest.fixture(scope="module")
def scientific_texts(real_root) -> list[str]:
    """24 real item texts, the longest of the release among them (a top must pad and mask right)."""
    rows = [line.split("\t", 1)[1] for line in (real_root / "scientific" / "Scientific.text").read_text().splitlines()[1:]]
    return rows[:23] + [max(rows, key=len)]


def _top(shape, k: int, pooling: str, encoder: TextEncoder, flat: np.ndarray, offsets: np.ndarray) -> TextTop:
    top = TextTop(shape.dim, k, shape.heads, shape.inner_dim, pooling, shape.eps)
    top.load_layers(top_layer_weights(encoder, k))
    top.set_states(torch.from_numpy(flat), torch.from_numpy(np.concatenate([[0], offsets])))  # item 0: padding
    return top


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cached_states_and_the_top_give_the_full_encoders_vectors(scientific_texts, pooling, tmp_path):
    """The packaged MiniLM over 24 real texts: its last k layers run by the top over the float16 cache of the
    layers below equal the encoder's full forward pass, to float16's precision of the states."""
    encoder = TextEncoder(PACKAGED_ENCODER, pooling)
    full = encoder.encode(scientific_texts)
    shape = encoder_shape()
    for k in (1, 2):
        flat, offsets = TokenStateCache(PACKAGED_ENCODER, shape.layers - k, root=tmp_path).get(scientific_texts, "sci")
        assert flat.dtype == np.float16 and len(offsets) == len(scientific_texts) + 1
        table = _top(shape, k, pooling, encoder, flat, offsets).table().numpy()
        assert np.all(table[0] == 0)  # the padding item has no tokens
        scale = np.abs(full).max()
        np.testing.assert_allclose(table[1:], full, rtol=0, atol=2e-3 * scale)
        cosine = (table[1:] * full).sum(1) / np.linalg.norm(table[1:], axis=1) / np.linalg.norm(full, axis=1)
        assert cosine.min() > 0.9999


def test_chunks_by_padded_tokens_cover_every_item_once_and_give_the_same_vectors(scientific_texts, tmp_path):
    """Items run in chunks of at most ``chunk_tokens`` padded tokens (the longest text alone where it must):
    how the items are cut changes no vector."""
    encoder = TextEncoder(PACKAGED_ENCODER, "cls")
    shape = encoder_shape()
    flat, offsets = TokenStateCache(PACKAGED_ENCODER, shape.layers - 1, root=tmp_path).get(scientific_texts, "sci")
    top = _top(shape, 1, "cls", encoder, flat, offsets)
    lengths = torch.from_numpy(np.diff(np.concatenate([[0], offsets])))
    order = torch.argsort(lengths, stable=True)
    for budget in (1, 64, 300, 10**6):
        top.chunk_tokens = budget
        chunks = top._chunks(order, lengths[order])
        assert torch.equal(torch.cat(chunks), order)  # every item once, in order of length
        assert all(len(c) == 1 or len(c) * int(lengths[c].max()) <= budget for c in chunks)
        assert len(chunks) == {1: len(order), 10**6: 1}.get(budget, len(chunks)) and (budget > 300 or len(chunks) > 1)
    top.chunk_tokens = 10**6
    whole = top.table()
    top.chunk_tokens = 64
    np.testing.assert_allclose(top.table().numpy(), whole.numpy(), rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
    with pytest.raises(ValueError, match="chunk_tokens"):
        TextTop(shape.dim, 1, shape.heads, shape.inner_dim, chunk_tokens=0)


def test_the_cache_is_reused_and_a_damaged_file_is_rebuilt(scientific_texts, tmp_path, caplog):
    cache = TokenStateCache(PACKAGED_ENCODER, 5, root=tmp_path)
    flat, offsets = cache.get(scientific_texts[:6], "sci")
    flat = np.array(flat)  # a copy: the memory map would show the damage below
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    stamp = (folder / "flat.npy").stat().st_mtime_ns
    again, _ = cache.get(scientific_texts[:6], "sci")
    assert (folder / "flat.npy").stat().st_mtime_ns == stamp and np.array_equal(again, flat)
    with open(folder / "flat.npy", "r+b") as handle:  # one byte flipped in the states
        handle.seek(-1, 2)
        byte = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    rebuilt, rebuilt_offsets = cache.get(scientific_texts[:6], "sci")
    assert "checksum mismatch" in caplog.text
    assert np.array_equal(rebuilt, flat) and np.array_equal(rebuilt_offsets, offsets)


def _tiny_net(tiny_encoder: str, texts: list[str], tmp_path) -> UniSRec:
    shape = encoder_shape(tiny_encoder)
    net = UniSRec(num_items=len(texts), plm_dim=shape.dim, hidden_dim=8, n_heads=2, inner_dim=16, max_seq_len=5,
                  n_experts=2, text_top_layers=1, text_top_heads=shape.heads, text_top_inner_dim=shape.inner_dim)
    encoder = TextEncoder(tiny_encoder)
    net.text_top.load_layers(top_layer_weights(encoder, 1))
    flat, offsets = TokenStateCache(tiny_encoder, shape.layers - 1, root=tmp_path).get(texts, "t")
    net.text_top.set_states(torch.from_numpy(flat), torch.from_numpy(np.concatenate([[0], offsets])))
    net.refresh_text_table()
    return net


def test_gradients_reach_the_top_only_through_the_fresh_items(tiny_encoder, scientific_texts, tmp_path):
    """Inside ``fresh_text(ids)`` the loss reaches the top's layers (and only through the items ``ids``: the
    table the other items read carries no gradient); outside it the top gets none."""
    net = _tiny_net(tiny_encoder, scientific_texts[:10], tmp_path)
    net.train()
    item_seq, seq_len, target = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]]), torch.tensor([3, 2]), torch.tensor([4, 6])

    def loss() -> torch.Tensor:
        table = net.item_table()
        logits = net.score(net.encode_sequences(item_seq, seq_len, table), table)
        return torch.nn.functional.cross_entropy(logits, target - 1)

    loss().backward()
    assert all(p.grad is None for p in net.text_top.parameters())
    assert not net.item_features.requires_grad
    net.zero_grad()
    with net.fresh_text(torch.tensor([4, 6])):
        loss().backward()
    grads = [p.grad for p in net.text_top.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert net._fresh_features is None  # the block cleans up after itself
    table_before = net.item_features.clone()
    torch.optim.SGD(net.text_top.parameters(), lr=1.0).step()
    assert torch.equal(net.item_features, table_before)  # the table changes only when refreshed
    net.refresh_text_table()
    assert not torch.allclose(net.item_features[1:], table_before[1:])
    assert torch.equal(net.item_features[0], table_before[0])  # padding stays zero


def test_straight_through_reads_the_tables_values_and_passes_the_fresh_gradients(tiny_encoder, scientific_texts,
                                                                               tmp_path):
    """``straight_through``: a stale table (the top has moved since it was computed) gives the step's values, so the
    fresh items look like every other; the top's gradients are the fresh path's at those values, not zero."""
    net = _tiny_net(tiny_encoder, scientific_texts[:10], tmp_path)
    net.eval()  # no dropout: the two blocks below run the top on the same values
    with torch.no_grad():  # the top moves on after the refresh: its fresh vectors are not the table's any more
        for param in net.text_top.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids, stale = torch.tensor([4, 6]), net.item_features.clone()
    with net.fresh_text(ids, straight_through=True):
        features = net._fresh_features
        torch.testing.assert_close(features, stale)  # every item's value is the table's
        (features[ids] * torch.arange(1.0, 1 + features.shape[1])).sum().backward()
    through = [p.grad.clone() for p in net.text_top.parameters()]
    net.zero_grad()
    with net.fresh_text(ids):
        assert not torch.allclose(net._fresh_features[ids], stale[ids])  # the plain block's values are fresh
        (net._fresh_features[ids] * torch.arange(1.0, 1 + stale.shape[1])).sum().backward()
    for a, b in zip(through, (p.grad for p in net.text_top.parameters())):  # a linear loss: the same gradient
        torch.testing.assert_close(a, b)
    assert sum(float(g.abs().sum()) for g in through) > 0


def test_a_text_top_needs_text_and_a_positive_depth():
    with pytest.raises(ValueError, match="text_top_layers"):
        UniSRec(num_items=3, plm_dim=8, hidden_dim=4, n_heads=2, use_text=False, use_item_id=True, text_top_layers=1)
    with pytest.raises(ValueError, match="text_top_layers"):
        UniSRec(num_items=3, plm_dim=8, hidden_dim=4, n_heads=2, text_top_layers=-1)
    with pytest.raises(ValueError, match="not divisible"):
        UniSRec(num_items=3, plm_dim=8, hidden_dim=4, n_heads=2, text_top_layers=1, text_top_heads=3)
