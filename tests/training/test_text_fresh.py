"""Which items a step runs through the text top (``SeqRecModule.fresh_text_ids``)."""

from __future__ import annotations

import pytest
import torch

from unisrec_x.data.sequences import SeqBatch
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.training.module import SeqRecModule

BATCH = SeqBatch(torch.tensor([[3, 5, 0], [7, 0, 0], [2, 9, 4]]), torch.tensor([2, 1, 3]), torch.tensor([8, 5, 6]), torch.zeros(3, dtype=torch.long))


def _module(**args) -> SeqRecModule:
    net = UniSRec(num_items=10, plm_dim=8, hidden_dim=4, n_heads=2, text_top_layers=1, text_top_heads=2,
                  text_top_inner_dim=16)
    return SeqRecModule(net, **args)


def test_targets_or_the_whole_batch_without_padding():
    assert _module().fresh_text_ids(BATCH).tolist() == [5, 6, 8]
    assert _module(text_fresh="batch").fresh_text_ids(BATCH).tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    net = UniSRec(num_items=10, plm_dim=8, hidden_dim=4, n_heads=2)
    assert SeqRecModule(net).fresh_text_ids(BATCH) is None  # no top: nothing runs through one


def test_a_cap_draws_that_many_distinct_items_of_the_batch():
    module = _module(text_fresh="batch", text_fresh_max=3)
    torch.manual_seed(0)
    drawn = {tuple(module.fresh_text_ids(BATCH).tolist()) for _ in range(20)}
    assert all(len(set(d)) == 3 and set(d) <= {2, 3, 4, 5, 6, 7, 8, 9} for d in drawn)
    assert len(drawn) > 1  # a random draw, not always the same items
    with pytest.raises(ValueError, match="text_fresh_max"):
        _module(text_fresh_max=0)
    with pytest.raises(ValueError, match="text_fresh must"):
        _module(text_fresh="history")


def test_a_training_step_passes_straight_through_on_to_the_model(monkeypatch):
    """``text_straight_through`` reaches ``UniSRec.fresh_text`` from both training modules."""
    from unisrec_x.training.pretrain import PretrainModule

    seen = []
    for module in (_module(text_straight_through=True), _module(), PretrainModule(_module().net, text_straight_through=True,
                                                                                  item_drop_view_prob=1)):
        monkeypatch.setattr(module.net, "fresh_text", lambda ids, straight_through=False: seen.append(straight_through))
        module.fresh_text(BATCH)
    assert seen == [True, False, True]
