"""Labelled data (`nequix_fw.dataset`): formats, units and bad labels."""

import ase.db
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import Hartree
from helpers import emt_labelled

from nequix_fw.dataset import read_labelled, unit_warnings
from nequix_fw.errors import StructureError


def test_hartree_labels_are_flagged(tmp_path):
    ev = emt_labelled(3, seed=0, rattle=0.02)
    ha = emt_labelled(3, seed=1, rattle=0.02)

    for a in ev + ha:  # shift so energies per atom are far from zero (as in real DFT)
        e, f = a.get_potential_energy() - 4.0 * len(a), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
    for a in ha:
        a.calc = SinglePointCalculator(
            a, energy=a.get_potential_energy() / Hartree, forces=a.get_forces() / Hartree
        )
    ase.io.write(tmp_path / "ev.extxyz", ev)
    ase.io.write(tmp_path / "ha.extxyz", ha)
    msgs = unit_warnings(
        read_labelled([tmp_path / "ev.extxyz"]) + read_labelled([tmp_path / "ha.extxyz"])
    )
    assert len(msgs) == 1 and "ha.extxyz" in msgs[0] and "Hartree" in msgs[0]
    with pytest.warns(UserWarning, match="look like Hartree"):
        read_labelled([tmp_path])


def test_reads_ase_db_formats_and_rejects_nan_labels(emt_data, tmp_path):

    frames = ase.io.read(emt_data["train"], ":4")
    for name in ("set.db", "set.aselmdb"):
        db = ase.db.connect(tmp_path / name)
        for a in frames:
            db.write(a)
        if hasattr(db, "close"):
            db.close()
        data = read_labelled([tmp_path / name])
        assert [d.energy for d in data] == [a.get_potential_energy() for a in frames]
        np.testing.assert_allclose(data[2].forces, frames[2].get_forces())
        np.testing.assert_allclose(data[2].stress, frames[2].get_stress())
    bad = frames[0].copy()
    forces = frames[0].get_forces()
    forces[3, 1] = np.nan
    bad.calc = SinglePointCalculator(bad, energy=1.0, forces=forces)
    ase.io.write(tmp_path / "nan.extxyz", bad)
    with pytest.raises(StructureError, match="nan.extxyz frame 0: non-finite energy or forces"):
        read_labelled([tmp_path / "nan.extxyz"])
