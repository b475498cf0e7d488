"""Example structures for the demo: rattled and strained fcc Cu, Al, Ni and CuNi cells.

Usage:
  python examples/make_structures.py initial OUTDIR      # unlabelled starting pool
  python examples/make_structures.py candidates OUTDIR   # a fresh, hotter pool to explore
  python examples/make_structures.py testset OUTDIR      # EMT-labelled held-out set
"""

import sys
from pathlib import Path

import ase.io
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from nequix_fw.exploration import distorted_copies

LATTICE = {"Cu": 3.61, "Al": 4.05, "Ni": 3.52}


def pool(seed: int, mild: float, hot: float, n: int) -> dict[str, list]:
    out = {}
    for k, (el, a) in enumerate(LATTICE.items()):
        cell = bulk(el, "fcc", a=a, cubic=True).repeat((2, 2, 1))
        out[el] = distorted_copies(cell, n, rattle_std=mild, strain_max=0.01, seed=seed + k)
        out[el] += distorted_copies(cell, n, rattle_std=hot, strain_max=0.06, seed=seed + 10 + k)
    alloy = bulk("Cu", "fcc", a=3.57, cubic=True).repeat((2, 2, 1))
    alloy.numbers[::3] = 28
    out["CuNi"] = distorted_copies(alloy, n, rattle_std=hot, strain_max=0.03, seed=seed + 20)
    return out


def main(kind: str, outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "initial":
        for name, frames in pool(0, 0.03, 0.15, 6).items():
            ase.io.write(out / f"{name}_initial.extxyz", frames)
    elif kind == "candidates":
        for name, frames in pool(100, 0.08, 0.25, 8).items():
            ase.io.write(out / f"{name}_candidates.extxyz", frames)
    elif kind == "testset":
        frames = [a for fr in pool(200, 0.05, 0.2, 4).values() for a in fr]
        for a in frames:
            a.calc = EMT()
            labels = dict(energy=a.get_potential_energy(), forces=a.get_forces(),
                          stress=a.get_stress())  # fmt: skip
            a.calc = SinglePointCalculator(a, **labels)
        ase.io.write(out / "testset_emt.extxyz", frames)
    else:
        sys.exit(f"unknown kind {kind!r}: initial, candidates or testset")


if __name__ == "__main__":
    main(*sys.argv[1:3])
