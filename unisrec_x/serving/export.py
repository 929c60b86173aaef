"""Export for serving stacks without this package: numpy item matrix + TorchScript query encoder.

    item_vectors.npy     (N, D) float32, row r is item r + 1 (scores = query @ item_vectors.T)
    item_ids.txt         N lines, the item token of each row
    query_encoder.pt     TorchScript: (item_seq (B, L) int64 ids 1..N, 0 = right padding,
                         seq_len (B,)) -> query (B, D); the item table is inside
    manifest.json        format "unisrec-x-export", shapes, similarity, how to score

Load with ``torch.jit.load`` and ``numpy.load``; nothing from unisrec_x is imported.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unisrec_x.model.seq_encoder import SequenceEncoder
from unisrec_x.runtime.outputs import OutputKind, atomic_directory

if TYPE_CHECKING:
    from unisrec_x.serving.recommender import Recommender


class QueryEncoder(nn.Module):
    """History ids -> query vector; cosine models are normalised and divided by the temperature."""

    def __init__(self, encoder: SequenceEncoder, table: torch.Tensor, cosine: bool, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("table", table)
        self.cosine, self.temperature = cosine, temperature

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        seq_repr = self.encoder(self.table[item_seq], seq_len)
        if self.cosine:
            return F.normalize(seq_repr, dim=-1) / self.temperature
        return seq_repr


EXPORT = OutputKind("export folder", "manifest.json", "unisrec-x-export",
                    frozenset({"item_vectors.npy", "item_ids.txt", "query_encoder.pt", "manifest.json"}))


def export(recommender: "Recommender", directory: Path, overwrite: bool = False) -> Path:
    """Write the export; an existing export is replaced only with ``overwrite``, anything else is refused."""
    net = recommender.net
    module = QueryEncoder(copy.deepcopy(net.encoder).eval(), recommender.table.clone(),
                          net.similarity == "cosine", float(net.temperature)).eval()
    scripted = torch.jit.script(module)
    with atomic_directory(directory, EXPORT, overwrite) as tmp:
        np.save(tmp / "item_vectors.npy", recommender.item_vectors())
        (tmp / "item_ids.txt").write_text("".join(f"{t}\n" for t in recommender.item_tokens))
        scripted.save(str(tmp / "query_encoder.pt"))
        (tmp / "manifest.json").write_text(json.dumps({
            "format": EXPORT.format, "items": recommender.num_items, "dim": int(recommender.table.shape[1]),
            "max_history": recommender.max_history, "similarity": net.similarity,
            "scoring": "scores = query_encoder(item_seq, seq_len) @ item_vectors.T; "
                       "item_seq holds 1-based rows of item_ids.txt, right-padded with 0",
        }, indent=2))
    return Path(directory).resolve()
