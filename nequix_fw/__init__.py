"""nequix-fw: active-learning campaigns for Nequix interatomic potentials."""

__version__ = "0.1.0"
