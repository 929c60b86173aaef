"""Load pretrained weights into a ``UniSRec`` with every key accounted for.

Item-ID and item-code embeddings and the popularity prior never transfer (IDs, codes and item counts
mean nothing across domains): they are the only keys allowed to be missing or left behind, besides a
learned history decay, a text top or a knowledge adapter that a pretrained model without one leaves at its
configured start. Anything else that does not match fails loudly, naming the keys and shapes, instead of
a silent ``strict=False`` partial load.

A same-domain start (``same_domain``: the checkpoint was trained on this very item catalog, as CTRL's
alignment stage is) keeps the ID and code embeddings and the prior too: then they must be there, for as
many items.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import BinaryIO

import torch

from unisrec_x.errors import DataError, first_line
from unisrec_x.model.unisrec import UniSRec

#: IDs, codes and item counts mean nothing in another domain (the prior's weight is fitted to those counts, the
#: floor's knobs chosen on that domain's validation)
NON_TRANSFERABLE = ("item_embedding.", "code_embedding.", "popularity_counts", "popularity_weight", "floor_knobs")
#: never loaded, not even from the same domain: a fit starts alone and chooses its own floor after it (a blend carried
#: into training would rank validation with it and stack a second blend on top)
ALWAYS_FRESH = ("floor_knobs",)
#: may be missing from a pretrained checkpoint (one pretrained without it): kept at the model's own start
#: (a knowledge adapter is trained end to end on the target's own fields, as in KAR)
FRESH_IF_ABSENT = ("encoder.learned_history_decay", "text_top.", "knowledge.")


def read_state_dict(path: str | Path, source: BinaryIO | None = None) -> dict[str, torch.Tensor]:
    """The ``net.*`` weights of a Lightning checkpoint (or a bare state dict), loaded without unpickling code."""
    return net_state(read_checkpoint(path, source), path)


def read_checkpoint(path: str | Path, source: BinaryIO | None = None) -> object:
    """The whole checkpoint object, loaded with ``weights_only``; any failure is a ``DataError`` naming the file.

    ``source``: the file already opened (e.g. through a directory handle); ``path`` then only names it.
    """
    path = Path(path)
    if source is None and not path.is_file():
        raise DataError("checkpoint not found", path)
    if (path.stat() if source is None else os.fstat(source.fileno())).st_size == 0:
        raise DataError("checkpoint is truncated or corrupted (file is empty (0 bytes))", path)
    try:
        checkpoint = torch.load(path if source is None else source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DataError(_refusal(str(err)), path) from None
    except Exception as err:  # a damaged zip or pickle fails in many ways (EOFError, IndexError, KeyError, ...)
        raise DataError(f"checkpoint is truncated or corrupted ({first_line(err)})", path) from None
    return checkpoint


def _refusal(message: str) -> str:
    """What torch's safe loader refused, without its advice to load the file unsafely (``weights_only=False``)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return (f"checkpoint holds objects other than tensors and plain values ({found[1]}), which could run code "
                "when loaded; refused")
    found = re.search(r"WeightsUnpickler error: *(\S[^\n]*?)(?:\. Please|$)", message, re.MULTILINE)
    return f"checkpoint is truncated or corrupted ({found[1] if found else 'not a pickle torch can read safely'})"


def net_state(checkpoint: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The network's weights inside a loaded checkpoint, without the Lightning ``net.`` prefix."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise DataError("not a checkpoint: no state_dict inside", path)
    odd = [repr(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise DataError(f"state_dict holds entries that are not named tensors: {', '.join(sorted(odd)[:6])}", path)
    if any(k.startswith("net.") for k in state):
        state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    return state


def load_pretrained(net: UniSRec, path: str | Path, same_domain: bool = False) -> list[str]:
    """Copy pretrained weights into ``net``; returns the keys left at their fresh initialisation.

    ``same_domain``: the checkpoint's items are this model's items (same dataset), so its item-ID and code
    embeddings and popularity prior are loaded too instead of left fresh; a checkpoint with another item
    count is refused.
    """
    state = read_state_dict(path)
    dropped = NON_TRANSFERABLE if not same_domain else ALWAYS_FRESH
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    own = net.state_dict()
    fresh = [k for k in own if k.startswith(dropped) or (k.startswith(FRESH_IF_ABSENT) and k not in state)]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(fresh))
    if unexpected or missing:
        hint = ("a same-domain start keeps the checkpoint's item IDs: it must be a model of the same kind "
                "(use_item_id / use_codes)" if same_domain and any(k.startswith(NON_TRANSFERABLE) for k in missing)
                else "was it trained with use_text=True and the same n_layers / n_experts?")
        raise DataError(f"checkpoint does not fit this model: unexpected keys {unexpected[:6]}, missing keys {missing[:6]} "
                        f"({hint})", path)
    if same_domain:
        _check_item_count(state, own, path)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if v.shape != own[k].shape]
    if mismatched:
        raise DataError("checkpoint has other dimensions (hidden_dim / plm_dim / max_seq_len?): " + "; ".join(mismatched[:4]), path)
    merged = {**own, **state}
    net.load_state_dict(merged, strict=True)
    return fresh


def _check_item_count(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str | Path) -> None:
    """A same-domain start needs the checkpoint's catalog: same item count (ID rows and prior counts)."""
    for key in ("item_embedding.weight", "popularity_counts"):
        if key in state and len(state[key]) != len(own[key]):
            raise DataError(f"checkpoint has {len(state[key]) - 1} items, this data has {len(own[key]) - 1}: a same-domain "
                            "start keeps the item IDs, so it needs the dataset the checkpoint was trained on (same "
                            "dataset, max_users, exclude_items)", path)
