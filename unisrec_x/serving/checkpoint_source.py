"""A ``Recommender``'s parts from a Lightning checkpoint: the network from its recorded arguments and
weights, its items and text vectors rebuilt from its dataset (through the data root and the feature cache)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from unisrec_x.data.text import join_fields
from unisrec_x.errors import DataError
from unisrec_x.items.codes import CHECKPOINT_KEY, checked_state
from unisrec_x.items.encoder import TextSettings
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.parts import ModelParts, load_weights
from unisrec_x.training.checkpoint import net_state, read_checkpoint


def _hparams(checkpoint: dict, key: str, path: Path) -> dict:
    found = checkpoint.get(key)
    if not isinstance(found, dict):
        raise DataError(f"checkpoint has no {key}: was it written by unisrec-x fit?", path)
    return {k: v for k, v in found.items() if not k.startswith("_")}


def load_checkpoint(path: Path, data_root: str | None) -> ModelParts:
    """A Lightning checkpoint; its items and text vectors come from its dataset (data root, feature cache)."""
    from unisrec_x.data.datamodule import SeqRecDataModule

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
    load_weights(net, state, path)
    tokens, texts = _merged_items(data, net.use_text or net.use_codes)
    frozen = features = data.item_features if net.use_text else None
    if net.text_top is not None:  # the trained top's vectors over the frozen layers' token states
        net.text_top.set_states(*data.text_top_inputs(len(net.text_top.layers), load_weights=False)[0])
        features = net.text_top.table()
    codes = None
    if net.use_codes:  # the codes it was trained with; checkpoints written before they carried them: refit
        stored = checkpoint.get(CHECKPOINT_KEY)
        codes = (checked_state(stored, len(tokens), net.code_digits, net.codes_per_digit, net.plm_dim,
                               None if frozen is None else frozen[1:].numpy(), path) if stored is not None
                 else data.item_codes(net.code_digits, net.codes_per_digit))
    text = TextSettings(data.cache.encoder, data.cache.pooling, data.cache.max_length, data.cache.batch_size,
                        data.cache.precision)
    knowledge = knowledge_texts = None
    if net.knowledge is not None:  # the fields' vectors from the feature cache, their texts from the .item files
        knowledge = data.knowledge_features(net.knowledge_fields)
        knowledge_texts = _field_texts(data, net.knowledge_fields)
        if not (net.use_text or net.use_codes):  # no item text of its own: show its fields
            texts = [join_fields(parts) for parts in zip(*knowledge_texts.values())]
    return ModelParts(net, tokens, texts, features, text, _release_aliases(data, data_args), codes,
                      knowledge_features=knowledge, knowledge_texts=knowledge_texts)


def _field_texts(data, fields: list[str]) -> dict[str, list[str]]:
    """Each knowledge field's text of every item, in global id order."""
    per_domain = [d.field_texts(fields) for d in data.data.domains]
    return {f: [text for texts in per_domain for text in texts[f]] for f in fields}


def _release_aliases(data, data_args: dict) -> dict[str, str]:
    """ASIN -> integer index for a single UniSRec release (``<prefix>.item2index``); else none."""
    from unisrec_x.data.datamodule import resolve_dataset
    from unisrec_x.data.text import read_item2index

    if len(data.data.domains) != 1 or not isinstance(data_args.get("dataset"), str):
        return {}
    index_file = Path(f"{resolve_dataset(data_args['dataset'], data_args.get('data_root'))}.item2index")
    return read_item2index(index_file) if index_file.is_file() else {}


def _merged_items(data, use_text: bool) -> tuple[list[str], list[str]]:
    """Item tokens in global id order; with several domains, a token found in two gets ``Domain:token``.
    Texts are read only for a model that uses them (an ID-only model gets empty ones)."""
    domains = data.data.domains
    counts = Counter(t for d in domains for t in d.item_tokens)
    tokens = [f"{d.name}:{t}" if counts[t] > 1 else t for d in domains for t in d.item_tokens]
    return tokens, [text for d in domains for text in d.item_texts] if use_text else [""] * len(tokens)
