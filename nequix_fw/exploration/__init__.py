"""Exploration: candidate structures from ensemble-driven MD, distortions and random packing."""

from nequix_fw.exploration.distortions import (
    distorted_copies,
    random_packing,
    with_substitutions,
    with_vacancies,
)
from nequix_fw.exploration.md import Trajectory, run_md
from nequix_fw.exploration.pool import explore, generate_structures, stop_counts

__all__ = [
    "Trajectory",
    "distorted_copies",
    "explore",
    "generate_structures",
    "random_packing",
    "run_md",
    "stop_counts",
    "with_substitutions",
    "with_vacancies",
]
