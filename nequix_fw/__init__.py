"""nequix-fw: active-learning campaigns for Nequix interatomic potentials."""

import logging

__version__ = "0.1.0"

#: Format of the log lines of the CLI and of FireTasks' launch logs.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logging.getLogger(__name__).addHandler(logging.NullHandler())
