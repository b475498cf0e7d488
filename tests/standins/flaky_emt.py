"""A labelling oracle that misbehaves like a real DFT code now and then: EMT on the POSCAR of
the working directory, except that it fails (exit 1) for about 10% of structures and hangs past
any time limit for about 2%, chosen by the structure's content (`verdict`), so a test knows
which ones in advance."""

import hashlib
import sys
import time

import ase.io
import numpy as np
from ase.calculators.emt import EMT


def verdict(atoms) -> str:
    """'fail', 'hang' or 'ok' for a structure (positions to 1e-4 Å, so a POSCAR round trip
    keeps it)."""
    blob = np.round(atoms.get_positions(wrap=True), 4).tobytes() + atoms.numbers.tobytes()
    h = int(hashlib.sha256(blob).hexdigest(), 16)
    return "fail" if h % 10 == 0 else "hang" if h % 50 == 1 else "ok"


if __name__ == "__main__":
    atoms = ase.io.read("POSCAR")
    what = verdict(atoms)
    if what == "fail":
        print("EMT: SCF did not converge (simulated)", file=sys.stderr)
        sys.exit(1)
    if what == "hang":
        time.sleep(3600)
    atoms.calc = EMT()
    atoms.get_potential_energy()
    ase.io.write("labelled.extxyz", atoms)
