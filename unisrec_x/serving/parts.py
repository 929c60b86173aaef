"""What a ``Recommender`` is built from, whichever file it was read from (checkpoint or model directory)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from unisrec_x.errors import DataError
from unisrec_x.items.codes import ItemCodes
from unisrec_x.items.encoder import TextSettings
from unisrec_x.model.unisrec import UniSRec


class ModelParts(NamedTuple):
    """What a ``Recommender`` is built from, as read from a checkpoint or a model directory."""

    net: UniSRec
    item_tokens: list[str]
    item_texts: list[str]
    item_features: torch.Tensor | None
    text: TextSettings | None
    aliases: dict[str, str]
    item_codes: ItemCodes | None
    text_fingerprint: "TextFingerprint | None" = None
    knowledge_features: torch.Tensor | None = None  # (N + 1, fields, plm_dim) for a model with knowledge fields
    knowledge_texts: dict[str, list[str]] | None = None  # field -> its text of items 1..N ("" where empty)


class TextFingerprint(NamedTuple):
    """Items whose stored vectors the text encoder must reproduce before it encodes new ones, and a hash of
    the text settings and their texts at save time (it tells an edited model.json from a changed encoder).
    No items: a directory written before fingerprints, whose settings cannot be verified."""

    items: tuple[str, ...]
    sha256: str
    manifest: Path


def load_weights(net: UniSRec, state: dict, path: Path) -> None:
    """Load ``state`` exactly (every key, every shape) and only if all its floats are finite."""
    own = net.state_dict()
    problems = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if problems:
        raise DataError(f"weights do not fit the recorded network arguments: {problems[:6]}", path)
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if not_finite:
        raise DataError(f"weights hold NaN or inf values: {not_finite[:6]} (expected finite numbers)", path)
    net.load_state_dict(state, strict=True)
