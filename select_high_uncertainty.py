"""The original design's `python select_high_uncertainty.py`: `nequix-fw select`, the same flags."""

import sys

from nequix_fw.cli import main

sys.exit(main(["select", *sys.argv[1:]]))
