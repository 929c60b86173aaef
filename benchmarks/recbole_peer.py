"""RecBole 1.2.1's SASRec on the Scientific benchmark files: the peer the speed benchmarks run against.

Settings are UniSRec's (hidden 300, inner 256, 2 layers, 2 heads, dropout 0.5, max length 50,
CE over all items, batch 2048, Adam 1e-3); full-sort evaluation gets 1,024 users per batch,
as unisrec-x does. Importing RecBole's models switches on autograd anomaly detection for the
whole process (STACK.md); it is switched off again so neither side pays for it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

for _alias, _type in (("float", float), ("bool", bool), ("int", int)):  # RecBole 1.2.1 uses removed aliases
    if _alias not in np.__dict__:
        setattr(np, _alias, _type)

SASREC = {"hidden_size": 300, "inner_size": 256, "n_layers": 2, "n_heads": 2, "hidden_dropout_prob": 0.5,
          "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
          "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": 50}
EVAL_USERS_PER_BATCH = 1024


class RecBoleSASRec:
    """RecBole's dataset, loaders, SASRec model and trainer for ``<data_root>/scientific/Scientific``."""

    def __init__(self, data_root: Path, batch_size: int = 2048, seed: int = 2022) -> None:
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.trainer import Trainer

        torch.autograd.set_detect_anomaly(False)
        self._tmp = tempfile.TemporaryDirectory()
        folder = Path(self._tmp.name) / "Scientific"  # RecBole wants <data_path>/<name>/<name>.<suffix>
        folder.mkdir()
        for split in ("train", "valid", "test"):
            os.symlink(Path(data_root).resolve() / "scientific" / f"Scientific.{split}.inter", folder / f"Scientific.{split}.inter")
        argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole reads unknown flags from the command line
        config = Config(model="SASRec", dataset="Scientific", config_dict={
            **SASREC, "data_path": self._tmp.name, "benchmark_filename": ["train", "valid", "test"],
            "alias_of_item_id": ["item_id_list"], "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
            "train_neg_sample_args": None, "train_batch_size": batch_size, "learning_rate": 1e-3,
            "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"},
            "metrics": ["Recall", "NDCG", "MRR", "Hit"], "topk": [10, 50], "valid_metric": "NDCG@10",
            "metric_decimal_place": 6, "device": "cpu", "use_gpu": False, "show_progress": False, "seed": seed,
            "reproducibility": True, "checkpoint_dir": str(Path(self._tmp.name) / "saved"), "log_wandb": False,
            "eval_batch_size": EVAL_USERS_PER_BATCH * 4400,
        })
        sys.argv = argv
        logging.getLogger().setLevel(logging.WARNING)
        torch.autograd.set_detect_anomaly(False)
        self.config = config
        self.dataset = create_dataset(config)
        self.train_data, self.valid_data, self.test_data = data_preparation(config, self.dataset)
        torch.manual_seed(seed)
        self.model = SASRec(config, self.train_data.dataset)
        here = os.getcwd()
        os.chdir(self._tmp.name)  # RecBole's Trainer writes ./log_tensorboard/ wherever it is run
        try:
            self.trainer = Trainer(config, self.model)
        finally:
            os.chdir(here)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        torch.autograd.set_detect_anomaly(False)

    def train_steps(self, steps: int) -> int:
        """``steps`` optimiser steps of RecBole's own loss on its own batches; returns sequences seen."""
        self.model.train()
        seen = 0
        for step, interaction in enumerate(self.train_data):
            if step == steps:
                break
            self.optimizer.zero_grad()
            loss = self.model.calculate_loss(interaction)
            loss.backward()
            self.optimizer.step()
            seen += len(interaction)
        return seen

    def evaluate(self) -> dict[str, float]:
        """RecBole's full-sort validation pass (its Trainer.evaluate), metrics by name."""
        result = self.trainer.evaluate(self.valid_data, load_best_model=False, show_progress=False)
        return {k.lower(): float(v) for k, v in result.items()}

    def token_ids(self) -> dict[str, int]:
        """RecBole's internal item id of each item token."""
        return {t: i for i, t in enumerate(self.dataset.field2id_token["item_id"]) if i > 0}


def copy_sasrec_weights(recbole_model, net, token_to_recbole: dict[str, int], our_tokens: list[str]) -> None:
    """Put RecBole SASRec's weights into an ID-only ``UniSRec`` (same architecture, other names).

    Item rows are matched by token, since the two libraries number items differently.
    """
    src = {k: v.detach() for k, v in recbole_model.state_dict().items()}
    rows = torch.tensor([0] + [token_to_recbole[t] for t in our_tokens])
    state = {"item_embedding.weight": src["item_embedding.weight"][rows],
             "encoder.position.weight": src["position_embedding.weight"],
             "encoder.input_norm.weight": src["LayerNorm.weight"], "encoder.input_norm.bias": src["LayerNorm.bias"]}
    for i in range(len(net.encoder.layers)):
        pre = f"trm_encoder.layer.{i}."
        att, ff = pre + "multi_head_attention.", pre + "feed_forward."
        for part in ("weight", "bias"):
            state[f"encoder.layers.{i}.qkv.{part}"] = torch.cat([src[f"{att}{n}.{part}"] for n in ("query", "key", "value")])
            state[f"encoder.layers.{i}.attn_out.{part}"] = src[f"{att}dense.{part}"]
            state[f"encoder.layers.{i}.attn_norm.{part}"] = src[f"{att}LayerNorm.{part}"]
            state[f"encoder.layers.{i}.ff_in.{part}"] = src[f"{ff}dense_1.{part}"]
            state[f"encoder.layers.{i}.ff_out.{part}"] = src[f"{ff}dense_2.{part}"]
            state[f"encoder.layers.{i}.ff_norm.{part}"] = src[f"{ff}LayerNorm.{part}"]
    net.load_state_dict(state, strict=True)
