"""Augmentation invariants: first item kept, order kept, no padding inside a view."""

from __future__ import annotations

import random

import torch

from unisrec_x.data.augment import drop_words, item_drop, word_drop_positions


def test_item_drop_keeps_first_and_order_and_packs_left():
    gen = torch.Generator().manual_seed(0)
    item_seq = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 0, 0, 0, 0, 0], [11, 12, 13, 14, 15, 16]])
    seq_len = torch.tensor([5, 1, 6])
    for _ in range(50):
        view, view_len = item_drop(item_seq, seq_len, keep_prob=0.5, generator=gen)
        for row in range(3):
            kept = view[row, :view_len[row]].tolist()
            original = item_seq[row, :seq_len[row]].tolist()
            assert kept[0] == original[0] and 0 not in kept
            assert kept == [x for x in original if x in kept]  # a subsequence, in order
            assert (view[row, view_len[row]:] == 0).all()


def test_item_drop_rate_is_about_keep_prob():
    item_seq = torch.arange(1, 1001).repeat(200, 1)
    _, view_len = item_drop(item_seq, torch.full((200,), 1000), keep_prob=0.8, generator=torch.Generator().manual_seed(1))
    assert abs(view_len.float().mean().item() / 1000 - 0.8) < 0.01


def test_word_drop_positions_stay_inside_history():
    mask = word_drop_positions(torch.tensor([2, 4]), 6, swap_prob=1.0)
    assert mask.tolist() == [[True, True, False, False, False, False], [True, True, True, True, False, False]]


def test_drop_words_never_empties_a_text():
    rng = random.Random(0)
    assert drop_words("one", 0.99, rng) == "one"
    text = " ".join(f"w{i}" for i in range(1000))
    assert 800 < len(drop_words(text, 0.15, rng).split()) < 900
