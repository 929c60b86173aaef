"""CTRL's two stages on a real slice of Scientific (issue 30, part 2): text-ID alignment (configs/ctrl/align.yaml),
then next-item fine-tuning of the ID model alone (configs/ctrl/finetune.yaml), served as a plain SASRec-ID."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unisrec_x.cli import main
from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.items.encoder import TextEncoder
from unisrec_x.items.feature_cache import FeatureCache
from unisrec_x.model.unisrec import UniSRec
from unisrec_x.serving.recommender import Recommender
from unisrec_x.training.align import AlignModule
from unisrec_x.training.checkpoint import read_state_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ctrl"
SMALL = ["--data.max_users", "60", "--data.batch_size", "128", "--model.init_args.net.init_args.hidden_dim", "32",
         "--model.init_args.net.init_args.inner_dim", "32", "--test_after_fit", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SASREC_ID = dict(use_text=False, use_item_id=True, similarity="dot", hidden_dim=32, inner_dim=32)


@pytest.fixture(scope="module")
def fit(real_root, tiny_encoder, tmp_path_factory):
    """``unisrec-x fit -c configs/ctrl/<stage>.yaml`` on the first 60 users, with the tiny text encoder."""
    cache = tmp_path_factory.mktemp("ctrl-cache")

    def run(stage: str, out: Path, *extra: str) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("UNISREC_X_CACHE", str(cache))
            main(["fit", "-c", str(CONFIGS / f"{stage}.yaml"), *SMALL, "--data.text_encoder", tiny_encoder,
                  "--data.data_root", str(real_root), "--trainer.logger.init_args.save_dir", str(out), *extra])

    return run


@pytest.fixture(scope="module")
def aligned(fit, tmp_path_factory) -> Path:
    """5 epochs of alignment (4 steps each), validated every epoch."""
    out = tmp_path_factory.mktemp("align")
    fit("align", out, "--trainer.max_epochs", "5", "--trainer.log_every_n_steps", "1")
    return next(out.rglob("last.ckpt"))


@pytest.fixture(scope="module")
def finetuned(fit, aligned, tmp_path_factory) -> Path:
    """3 epochs of next-item fine-tuning from the aligned ID model; ``--select_initial`` keeps its start."""
    out = tmp_path_factory.mktemp("finetune")
    fit("finetune", out, "--model.init_args.pretrained", str(aligned), "--trainer.max_epochs", "3",
        "--select_initial", "true")
    return next(out.rglob("last.ckpt"))


def _metrics(checkpoint: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((checkpoint.parents[1] / "metrics.csv").open()))


def test_alignment_brings_the_two_views_together(aligned):
    rows = _metrics(aligned)
    validation = [float(r["val/align_seq"]) for r in rows if r.get("val/align_seq")]
    items = [float(r["train/align_item"]) for r in rows if r.get("train/align_item")]
    steps = len(items) // 5
    assert len(validation) == 5 and steps >= 3
    assert validation[-1] < validation[0] - 0.2  # the same validation histories, no dropout: the views moved closer
    assert sum(items[-steps:]) < sum(items[:steps])  # the last epoch's item term below the first's
    assert all(r["val/ndcg@10"] for r in rows if r.get("val/align_seq"))  # validation ranks with the ID model


def test_the_aligned_checkpoint_holds_the_id_model_as_net_and_the_text_model_apart(aligned):
    checkpoint = torch.load(aligned, weights_only=True)
    state = checkpoint["state_dict"]
    net_args = checkpoint["hyper_parameters"]["net"]["init_args"]
    id_model = UniSRec(**net_args)
    assert {k for k in state if k.startswith("net.")} == {f"net.{k}" for k in id_model.state_dict()}
    assert "net.item_embedding.weight" in state and not any(k.startswith("net.adapter") for k in state)
    assert any(k.startswith("text_net.adapter.") for k in state)  # the text model trained beside it
    assert set(read_state_dict(aligned)) == set(id_model.state_dict())  # what a fine-tune or a server reads


def test_the_fine_tune_starts_from_the_aligned_id_model(aligned, finetuned):
    start = read_state_dict(finetuned.parent / "initial.ckpt")
    expected = read_state_dict(aligned)
    assert set(start) == set(expected)
    for key, value in expected.items():  # IDs included: the same domain keeps them
        assert torch.equal(start[key], value), key
    trained = read_state_dict(finetuned)
    assert not torch.equal(trained["item_embedding.weight"], expected["item_embedding.weight"])


def test_a_same_domain_start_on_another_catalog_is_refused(fit, aligned, tmp_path, caplog):
    with pytest.raises(SystemExit) as done:
        fit("finetune", tmp_path, "--model.init_args.pretrained", str(aligned), "--data.max_users", "70")
    assert done.value.code == 2
    assert "items, this data has" in caplog.text and "needs the dataset the checkpoint was trained on" in caplog.text


def _no_text(monkeypatch) -> None:
    """Every way to text vectors fails: the text encoder, the feature cache, the data's vectors, the model's."""
    def refuse(*args, **kwargs):
        raise AssertionError("the served CTRL model touched text")

    monkeypatch.setattr(TextEncoder, "__init__", refuse)
    monkeypatch.setattr(FeatureCache, "get", refuse)
    monkeypatch.setattr(FeatureCache, "load", refuse)
    monkeypatch.setattr(SeqRecDataModule, "item_features", property(refuse))
    monkeypatch.setattr(SeqRecDataModule, "feature_dim", property(refuse))
    monkeypatch.setattr(UniSRec, "set_item_features", refuse)


def test_the_served_model_is_a_plain_sasrec_id_that_touches_no_text(finetuned, real_root, tmp_path, monkeypatch):
    checkpoint = torch.load(finetuned, weights_only=True)
    assert checkpoint["hyper_parameters"]["net"]["init_args"] | SASREC_ID == checkpoint["hyper_parameters"]["net"]["init_args"]
    assert set(checkpoint["state_dict"]) == {f"net.{k}" for k in UniSRec(num_items=1, **SASREC_ID).state_dict()}
    _no_text(monkeypatch)
    served = Recommender.from_checkpoint(finetuned, data_root=str(real_root))
    net = served.net
    assert net.adapter is None and net.text_top is None and net.knowledge is None and net.item_features.numel() == 0
    assert torch.equal(served.table, checkpoint["state_dict"]["net.item_embedding.weight"])  # items are their IDs alone
    histories = [served.item_tokens[:3], [served.item_tokens[7]]]
    answer = served.recommend(histories, k=5)
    assert [len(a) for a in answer] == [5, 5]
    saved = served.save(tmp_path / "model")
    manifest = json.loads((saved / "model.json").read_text())
    assert not (saved / "item_features.npy").exists() and "item_features.npy" not in manifest["checksums"]
    assert Recommender.from_checkpoint(saved).recommend(histories, k=5) == answer
    exported = served.export(tmp_path / "export")
    assert torch.equal(torch.from_numpy(np.load(exported / "item_vectors.npy")), served.table[1:])


def test_the_id_model_must_not_read_text_and_text_net_args_are_checked():
    with pytest.raises(ValueError, match="net is the ID model that is served without text"):
        AlignModule(UniSRec(num_items=10, plm_dim=8, hidden_dim=16, use_item_id=True))  # text + IDs
    sasrec = UniSRec(num_items=10, plm_dim=8, **{**SASREC_ID, "hidden_dim": 16})
    with pytest.raises(ValueError, match=r"cannot set \['hidden_dim', 'use_item_id'\]; unknown UniSRec arguments \['layers'\]"):
        AlignModule(sasrec, text_net_args={"hidden_dim": 8, "use_item_id": True, "layers": 3})
    module = AlignModule(sasrec, text_net_args={"last_item_residual": True, "n_experts": 2})
    text = module.text_net
    assert text.use_text and not text.use_item_id and text.similarity == "cosine" and len(text.adapter.experts) == 2
    assert (text.hidden_dim, text.plm_dim, text.num_items) == (16, 8, 10)


def test_catalog_alignment_places_items_no_history_holds():
    """At 5% of the users most items are in no training history: ``align_items="catalog"`` aligns a draw of the
    whole catalog each step, so their ID vectors move toward their text too; ``batch`` leaves them alone."""
    from unisrec_x.data.sequences import SeqBatch

    torch.manual_seed(0)
    batch = SeqBatch(item_seq=torch.tensor([[1, 2, 0], [3, 1, 2]]), seq_len=torch.tensor([2, 3]),
                     target=torch.tensor([3, 4]), domain=torch.zeros(2, dtype=torch.long))
    moved = {}
    for mode in ("batch", "catalog"):
        torch.manual_seed(0)
        module = AlignModule(UniSRec(num_items=30, plm_dim=8, **{**SASREC_ID, "hidden_dim": 16}), align_items=mode,
                             align_items_max=None if mode == "catalog" else 4096)
        module.text_net.set_item_features(torch.randn(31, 8))
        _, _, items = module.tables(batch)
        assert items.tolist() == ([1, 2, 3, 4] if mode == "batch" else list(range(1, 31)))
        before = module.net.item_embedding.weight.detach().clone()
        module.training_step(batch, 0).backward()
        torch.optim.SGD(module.net.parameters(), lr=0.1).step()
        moved[mode] = (module.net.item_embedding.weight.detach() - before)[5:].abs().sum(dim=1) > 0  # items 5..30
    assert not moved["batch"].any() and moved["catalog"].all()
    module.hparams.align_items_max = 7
    draw = module.catalog_draw(torch.device("cpu"))
    assert len(draw) == 7 == len(set(draw.tolist())) and 1 <= int(draw.min()) and int(draw.max()) <= 30
    with pytest.raises(ValueError, match="align_items must be 'batch' or 'catalog'"):
        AlignModule(UniSRec(num_items=30, plm_dim=8, **{**SASREC_ID, "hidden_dim": 16}), align_items="all")
