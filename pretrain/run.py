"""Thin entry point for multi-domain pretraining: ``python pretrain/run.py fit -c configs/pretrain/pretrain.yaml``.

Everything lives in the package (``unisrec_x.cli``, ``unisrec_x.training.pretrain``); this file only makes the path visible.
"""

from unisrec_x.cli import main

if __name__ == "__main__":
    main()
