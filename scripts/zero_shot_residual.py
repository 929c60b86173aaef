"""Why does the pretrained model rank a new domain worse than raw text-kNN? A training-free probe.

The pretrained UniSRec's query is ``unit(Transformer) + w * unit(last item)`` (``last_item_residual``).
Raising ``w`` moves it from the pretrained sequence model towards an item-item kNN *through the
pretrained adapter* (w = 100: practically only the last item counts). Comparing that end with raw
text-kNN separates the two ways pretraining can hurt a new domain: the adapter's item geometry, or
the sequence encoder. Validation split only; nothing is trained or selected on test.

    python scripts/zero_shot_residual.py results/transfer/pretrained-38cc9952f6.pt --dataset office
"""

from __future__ import annotations

import argparse

import torch

from unisrec_x.evaluation.baselines import text_knn
from unisrec_x.data.datamodule import SeqRecDataModule
from unisrec_x.training.module import SeqRecModule
from unisrec_x.model.unisrec import UniSRec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrained", help="a pretraining checkpoint (e.g. results/transfer/pretrained-<hash>.pt)")
    parser.add_argument("--dataset", default="scientific/Scientific", help="target dataset prefix under the data root")
    parser.add_argument("--data_root", help="folder holding the datasets (default $UNISREC_X_DATA_ROOT or ../shared/data)")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0, 100.0],
                        help="residual weights to try besides the pretrained one")
    args = parser.parse_args()

    data = SeqRecDataModule(args.dataset, data_root=args.data_root)
    data.setup("fit")
    print(f"text-kNN (raw text vectors): val N@10 {text_knn(data.item_features, data.val_dataloader())['ndcg@10']:.4f}")
    net = UniSRec(num_items=data.num_items, plm_dim=data.item_features.shape[1], use_text=True,
                  similarity="cosine", last_item_residual=True)
    module = SeqRecModule(net, pretrained=args.pretrained)
    net.set_item_features(data.item_features)
    learned = net.encoder.residual_weight.item()
    for weight in [learned, *args.weights]:
        with torch.no_grad():
            net.encoder.residual_weight.fill_(weight)
        metrics = module.evaluate(data.val_dataloader())
        label = " (pretrained)" if weight == learned else ""
        print(f"w = {weight:g}{label}: val N@10 {metrics['ndcg@10']:.4f}  R@10 {metrics['recall@10']:.4f}")


if __name__ == "__main__":
    main()
