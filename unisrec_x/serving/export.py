"""Export for serving stacks without this package: numpy item matrix + TorchScript query encoder.

    item_vectors.npy     (N, D) float32, row r is item r + 1 (scores = query @ item_vectors.T); a model with a
                         popularity prior has D + 1 columns, the last log(1 + training count); one that
                         carries the floor (``model/floor.py``) then the unit text vector and log(1 + count)
    item_ids.json        JSON array of the N item ids, one per row (non-ASCII characters \\u-escaped)
    item_ids.txt         the same ids, one per line: written only when no id could be split by a line
                         reader (no line break of any kind, no white space at either end)
    query_encoder.pt     TorchScript: (item_seq (B, L) int64 ids 1..N, 0 = right padding,
                         seq_len (B,)) -> query (B, D); the item table is inside (with a popularity
                         prior the query's last coordinate is the prior's weight)
    manifest.json        format "unisrec-x-export", shapes, similarity, how to score, which id files

Load with ``torch.jit.load``, ``numpy.load`` and ``json.load``; nothing from unisrec_x is imported.
A text file read with ``splitlines()`` splits an id at U+0085, U+2028 or U+2029 (ids of older models,
or of a dataset, may hold them), so the JSON list is the one that always has N entries.
"""

from __future__ import annotations

import copy
import json
import logging
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

log = logging.getLogger(__name__)


class QueryEncoder(nn.Module):
    """History ids -> query vector; cosine models are normalised and divided by the temperature, a
    popularity prior's weight is appended (``UniSRec.query_vectors``), and a carried floor's weighted query
    (``UniSRec.rank_queries``)."""

    def __init__(self, encoder: SequenceEncoder, table: torch.Tensor, cosine: bool, temperature: float,
                 prior_weight: torch.Tensor | None = None, floor_text: torch.Tensor | None = None,
                 floor_knobs: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("table", table)
        self.cosine, self.temperature = cosine, temperature
        self.with_prior = prior_weight is not None
        self.register_buffer("prior_weight", torch.zeros(()) if prior_weight is None else prior_weight.detach().clone())
        self.with_floor = floor_text is not None
        self.register_buffer("floor_text", torch.zeros(0, 0) if floor_text is None else floor_text.detach().clone())
        self.register_buffer("floor_knobs", torch.zeros(3) if floor_knobs is None else floor_knobs.detach().clone())

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        seq_repr = self.encoder(self.table[item_seq], seq_len)
        query = F.normalize(seq_repr, dim=-1) / self.temperature if self.cosine else seq_repr
        if self.with_prior:
            query = torch.cat([query, self.prior_weight.to(query.dtype).expand(query.shape[0], 1)], dim=1)
        if self.with_floor:  # model/floor.py's query, written out: the export imports nothing of unisrec_x
            age = (seq_len.unsqueeze(1) - 1 - torch.arange(item_seq.shape[1], device=item_seq.device)).to(query.dtype)
            weight = torch.where(age >= 0, torch.pow(self.floor_knobs[1].to(query.dtype), age.clamp(min=0.0)),
                                 torch.zeros_like(age))
            history = F.normalize((weight.unsqueeze(-1) * self.floor_text[item_seq]).sum(dim=1), dim=-1)
            beta = self.floor_knobs[2].to(query.dtype).expand(query.shape[0], 1)
            query = torch.cat([query, self.floor_knobs[0].to(query.dtype) * torch.cat([history, beta], dim=1)], dim=1)
        return query


EXPORT = OutputKind("export folder", "manifest.json", "unisrec-x-export",
                    frozenset({"item_vectors.npy", "item_ids.json", "item_ids.txt", "query_encoder.pt", "manifest.json"}))


def line_safe(token: str) -> bool:
    """``token`` survives a one-id-per-line UTF-8 file: ``splitlines()`` and ``strip()`` give it back whole."""
    return token.splitlines() == [token] and token == token.strip() and token.encode("utf-8", "replace").decode() == token


def export(recommender: "Recommender", directory: Path, overwrite: bool = False) -> Path:
    """Write the export; an existing export is replaced only with ``overwrite``, anything else is refused."""
    net = recommender.net
    floor = net.floor_active
    module = QueryEncoder(copy.deepcopy(net.encoder).eval(), recommender.table.clone(), net.similarity == "cosine",
                          float(net.temperature), net.popularity_weight if net.popularity_prior else None,
                          net.unit_text() if floor else None, net.floor_knobs if floor else None).eval()
    scripted = torch.jit.script(module)
    tokens = recommender.item_tokens
    id_files = ["item_ids.json"] + ["item_ids.txt"] * all(map(line_safe, tokens))
    if len(id_files) == 1:
        log.warning("some item ids hold a line break or end in white space: item_ids.txt is not written, "
                    "read the ids from item_ids.json")
    with atomic_directory(directory, EXPORT, overwrite) as tmp:
        np.save(tmp / "item_vectors.npy", recommender.item_vectors())
        (tmp / "item_ids.json").write_text(json.dumps(tokens, ensure_ascii=True))
        if "item_ids.txt" in id_files:
            (tmp / "item_ids.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
        # to a buffer first: torch's writer aborts the process (SIGABRT) when a write to its file fails (disk full)
        (tmp / "query_encoder.pt").write_bytes(scripted.save_to_buffer())
        (tmp / "manifest.json").write_text(json.dumps({
            "format": EXPORT.format, "items": recommender.num_items, "dim": int(recommender.candidates.shape[1]),
            "max_history": recommender.max_history, "similarity": net.similarity, "item_ids": id_files,
            "scoring": "scores = query_encoder(item_seq, seq_len) @ item_vectors.T; "
                       "item_seq holds 1-based positions in item_ids.json, right-padded with 0",
        }, indent=2))
    return Path(directory).resolve()
