"""The original design's `python train_ensemble.py`: `nequix-fw train-ensemble`, the same flags."""

import sys

from nequix_fw.cli import main

sys.exit(main(["train-ensemble", *sys.argv[1:]]))
