"""unisrec-x's side of the Scientific benchmarks: the same modules `unisrec-x fit` trains."""

from __future__ import annotations

import torch

from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.training.heap import GrowthTrim
from unisrec_x.training.module import SeqRecModule
from unisrec_x.model.unisrec import UniSRec

#: The two arms compared with RecBole: ID-only SASRec (same model as the peer) and UniSRec transductive.
VARIANTS = {
    "sasrec": {"use_text": False, "use_item_id": True, "similarity": "dot"},
    "unisrec_transductive": {"use_text": True, "use_item_id": True, "similarity": "cosine"},
}
#: arms of other benchmarks, built the same way
OTHER_VARIANTS = {"unisrec_inductive": {"use_text": True, "use_item_id": False, "similarity": "cosine"}}


def scientific(data_root: str | None, batch_size: int = 2048, length_bucketing: bool = True,
               training_examples: str = "positions") -> SeqRecDataModule:
    return SeqRecDataModule("scientific/Scientific", data_root=data_root, batch_size=batch_size,
                            eval_batch_size=1024, length_bucketing=length_bucketing, training_examples=training_examples)


def build(data: SeqRecDataModule, variant: str, seed: int = 2022, net_args: dict | None = None,
          **module_args) -> SeqRecModule:
    torch.manual_seed(seed)
    net = UniSRec(num_items=data.num_items, plm_dim=data.feature_dim, **{**VARIANTS, **OTHER_VARIANTS}[variant],
                  **(net_args or {}))
    module = SeqRecModule(net, **module_args)
    if net.use_text:
        net.set_item_features(data.item_features)
    module.set_training_targets(data.examples("train").targets)
    return module


def train_steps(module: SeqRecModule, loader, optimizer: torch.optim.Optimizer, steps: int | None = None) -> int:
    """Optimiser steps of ``training_step`` (the code Lightning runs); returns the training sequences
    (targets: prefix examples, or the target positions of windows) seen. The heap is trimmed by the
    policy of the CLI's ``HeapTrim`` (``GrowthTrim``, a fresh one per call, so each call's first step sets
    the warm level), so the figures include its cost; unlike ``HeapTrim``, callers do not trim after
    their own evaluation passes."""
    module.train()
    seen, trim = 0, GrowthTrim()
    for step, batch in enumerate(loader):
        if steps is not None and step == steps:
            break
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
        seen += int((batch.target > 0).sum())
        trim.after_step()
    return seen
