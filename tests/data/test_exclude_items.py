"""Held-out items leave the catalog and every history of a real Scientific slice."""

from __future__ import annotations

import numpy as np
import pytest

from unisrec_x.data.domain import load_domain, without_items
from unisrec_x.errors import DataError


@pytest.fixture(scope="module")
def scientific(real_root):
    return load_domain(real_root / "scientific" / "Scientific")


def test_without_items_removes_them_and_keeps_everything_else(scientific):
    held = ["590", "2"]
    out = without_items(scientific, held)
    assert out.num_items == scientific.num_items - 2
    assert not set(held) & set(out.item_tokens)
    old_index = {t: i + 1 for i, t in enumerate(scientific.item_tokens)}
    for before, after in zip(scientific.sequences[:500], out.sequences[:500]):
        kept_tokens = [scientific.item_tokens[i - 1] for i in before if scientific.item_tokens[i - 1] not in held]
        assert [out.item_tokens[i - 1] for i in after] == kept_tokens
    assert dict(zip(out.item_tokens, out.item_texts))["4"] == scientific.item_texts[old_index["4"] - 1]
    assert sum(map(len, out.sequences)) < sum(map(len, scientific.sequences))
    assert all(s.dtype == np.int64 for s in out.sequences[:10])


def test_unknown_held_out_item_is_an_error(scientific):
    with pytest.raises(DataError, match="no-such-item"):
        without_items(scientific, ["no-such-item"])
