"""The original design's `python validate_models.py`: `nequix-fw validate`, the same flags."""

import sys

from nequix_fw.cli import main

sys.exit(main(["validate", *sys.argv[1:]]))
