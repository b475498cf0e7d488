"""The original design's `python run_ensemble.py`: `nequix-fw run-ensemble`, the same flags."""

import sys

from nequix_fw.cli import main

sys.exit(main(["run-ensemble", *sys.argv[1:]]))
