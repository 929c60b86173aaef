"""After a fit, choose on validation how much of the floor a model carries (``UniSRec.floor_blend``).

With few target users a trained model learns little that the floor (``model/floor.py``: the decayed
history's text similarity plus a popularity prior) does not already know: on Scientific with 5% of the
users the floor ranked above every trained arm. A model with ``floor_blend`` ranks by
``its score + weight * floor``. The floor's own knobs (decay, beta) are chosen first, on the floor alone,
then the weight, each on the validation rows the fit was selected on; weight 0 (the model alone) is
always a candidate, so validation never prefers the blend by construction. The chosen model is saved
as ``blended.ckpt`` beside the fit's checkpoints and is the one that is tested and served.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch

from unisrec_x.errors import DataError
from unisrec_x.evaluation.baselines import floor_grid
from unisrec_x.evaluation.metrics import RankingMetrics
from unisrec_x.evaluation.ranking import chunked_target_ranks

log = logging.getLogger(__name__)
FILENAME = "blended.ckpt"
#: weights on the floor, on the logit scale of a cosine model (cosine / temperature: 1 / 0.07 ~ 14 per unit
#: of cosine); the largest makes the model little more than a tie-breaker
FLOOR_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
METRIC = "ndcg@10"


def choose_floor_blend(module, batches: Sequence, with_counts: bool = True,
                       weights: Sequence[float] = FLOOR_WEIGHTS) -> dict:
    """Set ``module.net``'s floor to the knobs and weight with the best validation ``METRIC`` on ``batches``
    (ties: the smaller weight), and return what was chosen and every candidate's score, for the record.
    The floor's prior counts are the model's own (``popularity_counts``, the fit's training targets), the very
    ones it adds; ``with_counts=False`` (zero-shot: none) searches the decay alone."""
    net = module.net
    counts = net.popularity_counts.cpu() if with_counts else None
    knobs, floor_scores = floor_grid(net.item_features.cpu(), counts, batches, metric=METRIC)
    scores = blend_scores(module, batches, weights, knobs.decay, knobs.beta)
    best = max(scores, key=lambda w: (scores[w], -w))
    net.set_floor(best, knobs.decay, knobs.beta)
    log.info("floor blend: weight %s, decay %s, beta %s (validation %s %.4f; the model alone %.4f, the floor alone "
             "%.4f)", best, knobs.decay, knobs.beta, METRIC, scores[best], scores[0.0], floor_scores[tuple(knobs)])
    return {"weight": best, "decay": knobs.decay, "beta": knobs.beta,
            f"validation_{METRIC}": {"blend": round(scores[best], 6), "model": round(scores[0.0], 6),
                                     "floor": round(floor_scores[tuple(knobs)], 6),
                                     "weights": {str(w): round(v, 6) for w, v in scores.items()}}}


@torch.no_grad()
def blend_scores(module, batches: Sequence, weights: Sequence[float], decay: float, beta: float) -> dict[float, float]:
    """``METRIC`` of ``score + weight * floor`` on ``batches`` for every weight, the histories encoded once: the
    ranking queries and candidates of weight 1 (``UniSRec.rank_queries``) with the floor's coordinates rescaled."""
    net = module.net.eval()
    net.set_floor(1.0, decay, beta)
    table = net.item_table(module.eval_chunk_size)
    candidates = net.rank_candidates(table[1:])
    own = net.query_vectors(table[:1]).shape[-1]  # the model's own coordinates come first
    metrics = {w: RankingMetrics([int(METRIC.split("@")[1])]) for w in weights}
    for batch in batches:
        batch = type(batch)(*(field.to(module.device) for field in batch))
        query = net.rank_queries(net.encode_sequences(batch.item_seq, batch.seq_len, table), batch.item_seq, batch.seq_len)
        for weight, metric in metrics.items():
            weighted = torch.cat([query[:, :own], weight * query[:, own:]], dim=1)
            metric.update_ranks(chunked_target_ranks(weighted, candidates, batch.target - 1, module.eval_chunk_size),
                                batch.target)
    return {w: m.compute()[METRIC] for w, m in metrics.items()}


def choose_floor_blend_on(module, datamodule) -> dict:
    """Zero-shot: choose the floor on another dataset's validation rows (the pretraining sources': a zero-shot
    user has no target labels) and without counts (a model never fit on its target has none). The model reads
    that data's text vectors for the choice; the test installs the target's after."""
    net = module.net
    if net.use_item_id or net.use_codes or net.knowledge is not None or net.text_top is not None:
        raise DataError("choosing the floor on other data needs a model whose items are their frozen text vectors "
                        "alone (IDs, codes and knowledge vectors are per domain; a text top's are set up by the test)")
    net.item_features = datamodule.item_features.to(module.device, torch.float32)  # not set_item_features: the
    # counts table is the target's size, and every count is 0 here (zero-shot), as an id past it reads
    choice = choose_floor_blend(module, list(datamodule.val_dataloader()), with_counts=False)
    return {**choice, "chosen_on": f"validation rows of {datamodule.hparams.dataset}"}


def blended_checkpoint(trainer: pl.Trainer, module, datamodule, tested: str | None) -> str | None:
    """Load ``tested`` (the checkpoint the fit would test), choose the floor blend on validation and save the
    result as ``blended.ckpt``; its path, or ``None`` when the fit keeps no checkpoints (the module, blended in
    memory, is tested as it is). The choice is kept on ``module.floor_blend_choice`` for the record.

    Every rank makes the same choice on all validation rows (no split across ranks); rank 0 writes the file.
    """
    if tested:  # the weights to blend: validate() loads them into the module (and reports their score)
        trainer.validate(module, datamodule=datamodule, ckpt_path=tested, weights_only=True, verbose=False)
    module.to(trainer.strategy.root_device)  # Lightning's teardown left it on the CPU
    apart = getattr(datamodule, "blend_rows", 0) > 0
    module.floor_blend_choice = {**choose_floor_blend(module, list(datamodule.blend_dataloader())),
                                 "chosen_on": ("validation rows kept apart from early stopping" if apart
                                               else "the validation rows early stopping used")}
    checkpoints = trainer.checkpoint_callback
    if checkpoints is None or not checkpoints.dirpath:
        return None
    path = Path(checkpoints.dirpath) / FILENAME
    trainer.save_checkpoint(path, weights_only=True)
    return str(path)
