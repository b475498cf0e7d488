"""Example structures for the demo: rattled and strained fcc Cu, Al, Ni and CuNi cells.

Usage:
  python examples/make_structures.py initial OUTDIR      # unlabelled starting pool
  python examples/make_structures.py candidates OUTDIR   # a fresh, hotter pool to explore
  python examples/make_structures.py testset OUTDIR      # EMT-labelled held-out set (MD frames
                                                         # at 600/1200 K, cells rattled <= 0.1 Å)
"""

import sys
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

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


def held_out(seed: int) -> list:
    """Structures of the kind the demo explores, from seeds nothing else uses: EMT MD frames at
    its exploration temperatures (600 and 1200 K) and cells rattled by up to 0.1 Å (random
    directions, lengths uniform in [0, 0.1] Å) and strained by up to 2 %."""
    rng = np.random.default_rng(seed)
    starts = [bulk(el, "fcc", a=a, cubic=True).repeat((2, 2, 1)) for el, a in LATTICE.items()]
    alloy = bulk("Cu", "fcc", a=3.57, cubic=True).repeat((2, 2, 1))
    alloy.numbers[::3] = 28
    starts.append(alloy)
    out = []
    for k, start in enumerate(starts):
        for temperature in (600, 1200):
            a = start.copy()
            a.calc = EMT()
            thermalize_momenta(a, temperature, rng=rng)
            dyn = Langevin(
                a, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False
            )
            for _ in range(2):
                dyn.run(100)
                out.append(Atoms(a.numbers, a.positions, cell=a.cell, pbc=True))
        out += distorted_copies(
            start, 2, rattle_std=0.1, strain_max=0.02, seed=seed + k, rattle_distribution="uniform"
        )
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
        frames = held_out(200)
        for a in frames:
            a.calc = EMT()
            labels = dict(
                energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress()
            )
            a.calc = SinglePointCalculator(a, **labels)
        ase.io.write(out / "testset_emt.extxyz", frames)
    else:
        sys.exit(f"unknown kind {kind!r}: initial, candidates or testset")


if __name__ == "__main__":
    main(*sys.argv[1:3])
