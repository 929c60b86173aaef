"""Thin entry point for single-domain training and fine-tuning: ``python finetune/run.py fit -c CONFIG``.

Everything lives in the package (``unisrec_x.cli``); this file only makes the path visible.
"""

from unisrec_x.cli import main

if __name__ == "__main__":
    main()
