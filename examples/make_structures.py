"""Write example candidate structures: rattled and strained fcc Cu, Al, Ni and a CuNi alloy.

Usage: python examples/make_structures.py OUTDIR
"""

import sys
from pathlib import Path

import ase.io
from ase.build import bulk

from nequix_fw.exploration import distorted_copies


def main(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    lattice = {"Cu": 3.61, "Al": 4.05, "Ni": 3.52}
    for k, (el, a) in enumerate(lattice.items()):
        cell = bulk(el, "fcc", a=a, cubic=True).repeat((2, 2, 1))
        mild = distorted_copies(cell, 6, rattle_std=0.03, strain_max=0.01, seed=k)
        hot = distorted_copies(cell, 6, rattle_std=0.20, strain_max=0.06, seed=10 + k)
        ase.io.write(out / f"{el}_md_like.extxyz", mild + hot)
    alloy = bulk("Cu", "fcc", a=3.57, cubic=True).repeat((2, 2, 2))
    alloy.numbers[::3] = 28
    ase.io.write(out / "CuNi_POSCAR.vasp", distorted_copies(alloy, 1, 0.1, seed=7)[0])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_run/initial_structures")
