"""VASP under custodian, with a stand-in `vasp_std` replaying real VASP outputs and errors."""

import json
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.units import GPa

from nequix_fw.cli import main
from nequix_fw.dataset import read_labelled, update_dataset
from nequix_fw.errors import SettingsError
from nequix_fw.labelling import label_structures, make_backend
from nequix_fw.settings import LabellingSettings

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "vasp-fixtures"
STANDINS = Path(__file__).resolve().parent / "standins"
# POTCARs are licensed and not available here: a header-only stand-in in POTCAR's format.
FAKE_POTCAR = """  PAW_PBE {el} 05Jan2001
 4.00000000000000000
 parameters from PSCTR are:
   VRHFIN ={el}: s2p2
   LEXCH  = PE
   TITEL  = PAW_PBE {el} 05Jan2001
   ZVAL   =    4.000
   ENMAX  =  245.345; ENMIN  =  184.009 eV
 END of PSCTR-controll parameters
 local part
   98.4099241658563
  0.13279138E+02  0.13277092E+02  0.13270954E+02  0.13260729E+02  0.13246426E+02
 End of Dataset
"""


@pytest.fixture
def vasp_env(tmp_path, monkeypatch):
    if not (FIX / "si2_relax").is_dir():
        pytest.skip("vasp fixtures not available")
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_VASP_FIXTURES", str(FIX))
    inputs = tmp_path / "vasp_inputs"
    inputs.mkdir()
    incar = "PREC = Accurate\nENCUT = 520\nISMEAR = 0\nSIGMA = 0.05\nEDIFF = 1e-06\nNSW = 0\n"
    (inputs / "INCAR").write_text(incar + "IBRION = -1\nLREAL = Auto\n")
    (inputs / "KPOINTS").write_text("Automatic\n0\nGamma\n4 4 4\n")
    (inputs / "POTCAR").write_text(FAKE_POTCAR.format(el="Si"))
    structures = tmp_path / "selected"
    structures.mkdir()
    si2 = ase.io.read(FIX / "si2_relax" / "vasprun.xml.gz", index=0)
    ase.io.write(structures / "si2.vasp", si2, format="vasp")
    return {"inputs": inputs, "structures": structures, "tmp": tmp_path}


def test_handler_corrects_and_labels_equal_vasprun(vasp_env, capsys):
    from pymatgen.io.vasp import Vasprun

    out = vasp_env["tmp"] / "dft_results"
    code = main(["label", "--backend", "vasp", "--vasp-cmd", "vasp_std", "--vasp-inputs",
                 str(vasp_env["inputs"]), "--structures", str(vasp_env["structures"]),
                 "--output", str(out), "--no-progress"])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0 and "labelled 1 of 1 structures with vasp" in cap.out, cap.err
    (task_path,) = out.glob("*/task.json")
    task = json.loads(task_path.read_text())
    assert task["status"] == "success"
    (corr,) = task["corrections"]  # the stand-in's first call printed a real VASP error
    assert corr["errors"] == ["subspacematrix"] and corr["actions"]
    run = Vasprun(str(FIX / "si2_relax" / "vasprun.xml.gz"))
    got = ase.io.read(task_path.parent / "labelled.extxyz")
    assert got.get_potential_energy() == pytest.approx(run.final_energy, abs=1e-8)
    assert got.get_potential_energy() == pytest.approx(-10.84147246, abs=1e-8)
    np.testing.assert_allclose(got.get_forces(), run.ionic_steps[-1]["forces"], atol=1e-8)
    # VASP: kBar, positive = compressive; ASE/nequix-fw: eV/Å3, positive = tensile
    kbar = np.array(run.ionic_steps[-1]["stress"])
    assert kbar[0, 0] < 0
    np.testing.assert_allclose(got.get_stress(voigt=False) / GPa, -0.1 * kbar, atol=1e-9)
    # the corrected INCAR was used for the second run
    assert (task_path.parent / "INCAR").read_text() != (vasp_env["inputs"] / "INCAR").read_text()
    s = update_dataset(out, vasp_env["tmp"] / "ds", iteration=2)
    assert s["n_added"] == 1
    (entry,) = read_labelled([vasp_env["tmp"] / "ds"])
    assert (
        entry.frame.atoms.info["backend"] == "vasp" and entry.frame.atoms.info["corrections"] == 1
    )


def test_uncorrectable_run_is_recorded_as_failed(vasp_env, monkeypatch):
    monkeypatch.setenv("STANDIN_VASP_ALWAYS_FAIL", "1")
    s = LabellingSettings(backend="vasp", vasp_inputs=vasp_env["inputs"], max_errors=2)
    summary = label_structures(vasp_env["structures"], vasp_env["tmp"] / "o", make_backend(s), s,
                               progress=False)  # fmt: skip
    assert summary["n_failed"] == 1 and summary["failed"][0]["reason"].startswith("custodian:")
    assert not list((vasp_env["tmp"] / "o").glob("*/labelled.extxyz"))


def test_bad_vasp_inputs(vasp_env, capsys):
    (vasp_env["inputs"] / "KPOINTS").unlink()
    with pytest.raises(SettingsError, match="vasp_inputs: missing KPOINTS"):
        make_backend(LabellingSettings(backend="vasp", vasp_inputs=vasp_env["inputs"]))
    (vasp_env["inputs"] / "KPOINTS").write_text("Automatic\n0\nGamma\n4 4 4\n")
    code = main(["label", "--backend", "vasp", "--vasp-cmd", "mpirun -np 2 no_vasp_here",
                 "--vasp-inputs", str(vasp_env["inputs"]), "--structures",
                 str(vasp_env["structures"]), "--output", str(vasp_env["tmp"] / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "labelling.vasp_cmd: executable" in err
    ase.io.write(
        vasp_env["structures"] / "ge.vasp",
        ase.io.read(vasp_env["structures"] / "si2.vasp"),
        format="vasp",
    )
    ge = ase.io.read(vasp_env["structures"] / "ge.vasp")
    ge.set_chemical_symbols(["Ge", "Si"])
    ase.io.write(vasp_env["structures"] / "ge.vasp", ge, format="vasp")
    s = LabellingSettings(backend="vasp", vasp_inputs=vasp_env["inputs"])
    with pytest.raises(SettingsError, match="no POTCAR for Ge"):
        label_structures(vasp_env["structures"], vasp_env["tmp"] / "o2", make_backend(s), s,
                         progress=False)  # fmt: skip
