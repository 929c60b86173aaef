"""A trained model on disk, from a Lightning checkpoint or as a self-contained model directory.

A checkpoint records the network's and the DataModule's arguments, so its items and text
vectors are rebuilt from the dataset (through the data root and the feature cache). A model
directory holds everything itself, so it survives the dataset moving and carries items added
after training:

    model.json          format, network arguments, text-encoder settings
    weights.pt          the network's state dict (loaded with weights_only=True)
    items.item          RecBole atomic file: item_id:token, text:token_seq, alias:token (id order;
                        alias is another name of the item, e.g. its ASIN, or empty)
    item_features.npy   (N + 1, plm_dim) float32 text vectors, row 0 = padding
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from unisrec_x.data.atomic import read_atomic, write_atomic
from unisrec_x.errors import DataError
from unisrec_x.lit.checkpoint import net_state, read_checkpoint, read_state_dict
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.paths import atomic_directory

if TYPE_CHECKING:
    from unisrec_x.serving.recommender import Recommender

FORMAT = "unisrec-x-model"
VERSION = 1
ITEM_FIELDS = [("item_id", "token"), ("text", "token_seq"), ("alias", "token")]


def _hparams(checkpoint: dict, key: str, path: Path) -> dict:
    found = checkpoint.get(key)
    if not isinstance(found, dict):
        raise DataError(f"checkpoint has no {key}: was it written by unisrec-x fit?", path)
    return {k: v for k, v in found.items() if not k.startswith("_")}


def load_checkpoint(cls: type["Recommender"], path: Path, data_root: str | None) -> "Recommender":
    from unisrec_x.data.datamodule import SeqRecDataModule
    from unisrec_x.serving.recommender import TextSettings

    checkpoint = read_checkpoint(path)  # missing, truncated or code-carrying files fail here, named
    state = net_state(checkpoint, path)
    model_args = _hparams(checkpoint, "hyper_parameters", path)
    net_args = model_args.get("net", {}).get("init_args")
    if not isinstance(net_args, dict):
        raise DataError("checkpoint does not record the network's arguments (hyper_parameters.net.init_args)", path)
    data_args = _hparams(checkpoint, "datamodule_hyper_parameters", path)
    if data_root is not None:
        data_args["data_root"] = data_root
    data = SeqRecDataModule(**data_args)
    net = UniSRec(**net_args)
    _load_weights(net, state, path)
    tokens, texts = _merged_items(data)
    features = data.item_features if net.use_text else None
    text = TextSettings(data.cache.encoder, data.cache.pooling, data.cache.max_length, data.cache.batch_size)
    return cls(net, tokens, texts, features, text, aliases=_release_aliases(data, data_args))


def _release_aliases(data, data_args: dict) -> dict[str, str]:
    """ASIN -> integer index for a single UniSRec release (``<prefix>.item2index``); else none."""
    from unisrec_x.data.datamodule import resolve_dataset
    from unisrec_x.data.text import read_item2index

    if len(data.data.domains) != 1 or not isinstance(data_args.get("dataset"), str):
        return {}
    index_file = Path(f"{resolve_dataset(data_args['dataset'], data_args.get('data_root'))}.item2index")
    return read_item2index(index_file) if index_file.is_file() else {}


def _merged_items(data) -> tuple[list[str], list[str]]:
    """Item tokens in global id order; with several domains, a token found in two gets ``Domain:token``."""
    domains = data.data.domains
    counts = Counter(t for d in domains for t in d.item_tokens)
    tokens = [f"{d.name}:{t}" if counts[t] > 1 else t for d in domains for t in d.item_tokens]
    return tokens, [text for d in domains for text in d.item_texts]


def _load_weights(net: UniSRec, state: dict, path: Path) -> None:
    own = net.state_dict()
    problems = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if problems:
        raise DataError(f"weights do not fit the recorded network arguments: {problems[:6]}", path)
    net.load_state_dict(state, strict=True)


def load_model_dir(cls: type["Recommender"], directory: Path) -> "Recommender":
    from unisrec_x.serving.recommender import TextSettings

    manifest_path = directory / "model.json"
    if not manifest_path.is_file():
        raise DataError("not a model directory: model.json is missing", directory)
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"model.json is not valid JSON ({err.msg})", manifest_path, err.lineno) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"model.json is not a {FORMAT} v{VERSION} manifest", manifest_path)
    net = UniSRec(**manifest["net"])
    _load_weights(net, read_state_dict(directory / "weights.pt"), directory / "weights.pt")
    table = read_atomic(directory / "items.item", required=["item_id", "text"])
    tokens, texts = table.column("item_id"), table.column("text")
    aliases = {a: t for a, t in zip(table.column("alias"), tokens) if a} if "alias" in table.fields else {}
    features = None
    if net.use_text:
        features_path = directory / "item_features.npy"
        if not features_path.is_file():
            raise DataError("text model without item_features.npy", features_path)
        features = torch.from_numpy(np.load(features_path))
        if features.shape != (len(tokens) + 1, net.plm_dim):
            raise DataError(f"item_features.npy has shape {tuple(features.shape)}, expected "
                            f"({len(tokens) + 1}, {net.plm_dim}) for {len(tokens)} items", features_path)
    text = TextSettings(**manifest["text"]) if manifest.get("text") else None
    return cls(net, tokens, texts, features, text, aliases=aliases)


def save_model_dir(recommender: "Recommender", directory: Path) -> Path:
    """Write into a sibling temp folder, then swap it in: a crash never leaves half a model."""
    net = recommender.net
    manifest = {
        "format": FORMAT, "version": VERSION,
        "net": {**net.init_args, "num_items": net.num_items},
        "text": recommender.text._asdict() if recommender.text else None,
        "items": recommender.num_items,
    }
    with atomic_directory(directory) as tmp:
        (tmp / "model.json").write_text(json.dumps(manifest, indent=2))
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        (tmp / "weights.pt").write_bytes(buffer.getvalue())
        write_atomic(tmp / "items.item", ITEM_FIELDS, [(t, text, recommender.alias_of.get(t, "")) for t, text in
                                                        zip(recommender.item_tokens, recommender.item_texts)])
        if net.use_text:
            np.save(tmp / "item_features.npy", net.item_features.numpy().astype(np.float32))
    return directory.resolve()

