"""The original design's `python update_dataset.py`: `nequix-fw update-dataset`, the same flags."""

import sys

from nequix_fw.cli import main

sys.exit(main(["update-dataset", *sys.argv[1:]]))
