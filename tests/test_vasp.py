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
    code = main(
        [
            "label",
            "--backend",
            "vasp",
            "--vasp-cmd",
            "vasp_std",
            "--vasp-inputs",
            str(vasp_env["inputs"]),
            "--structures",
            str(vasp_env["structures"]),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
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
    summary = label_structures(
        vasp_env["structures"], vasp_env["tmp"] / "o", make_backend(s), s, progress=False
    )
    assert summary["n_failed"] == 1 and summary["failed"][0]["reason"].startswith("custodian:")
    assert not list((vasp_env["tmp"] / "o").glob("*/labelled.extxyz"))


def test_bad_vasp_inputs(vasp_env, capsys):
    (vasp_env["inputs"] / "KPOINTS").unlink()
    with pytest.raises(SettingsError, match="vasp_inputs: missing KPOINTS"):
        make_backend(LabellingSettings(backend="vasp", vasp_inputs=vasp_env["inputs"]))
    (vasp_env["inputs"] / "KPOINTS").write_text("Automatic\n0\nGamma\n4 4 4\n")
    code = main(
        [
            "label",
            "--backend",
            "vasp",
            "--vasp-cmd",
            "mpirun -np 2 no_vasp_here",
            "--vasp-inputs",
            str(vasp_env["inputs"]),
            "--structures",
            str(vasp_env["structures"]),
            "--output",
            str(vasp_env["tmp"] / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "label.vasp_cmd: executable" in err
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
        label_structures(
            vasp_env["structures"], vasp_env["tmp"] / "o2", make_backend(s), s, progress=False
        )
    # a file that is not a POTCAR, named in the error
    (vasp_env["inputs"] / "POTCAR").write_text("PAW Si\n but no dataset\n")
    with pytest.raises(SettingsError, match=r"vasp_inputs/POTCAR: not a valid POTCAR"):
        make_backend(s)


@pytest.fixture
def psp_dir(tmp_path):
    """A POTCAR library in pymatgen's layout (header-only stand-ins, as above)."""
    d = tmp_path / "psp" / "POT_GGA_PAW_PBE"
    d.mkdir(parents=True)
    for el in ("Si", "Al"):
        (d / f"POTCAR.{el}").write_text(FAKE_POTCAR.format(el=el))
    return d.parent


def test_pymatgen_input_set_with_worker_placeholder(vasp_env, psp_dir, capsys, monkeypatch):
    """MPStaticSet writes the inputs (user settings on top); >>vasp_cmd<< comes from the
    FireWorks worker file; a real EDDDAV error is corrected (ALGO); labels still equal the
    replayed vasprun.xml."""
    monkeypatch.setenv("STANDIN_VASP_ERROR", "vasp.edddav")  # subspacematrix has no fix left
    cfg = vasp_env["tmp"] / "settings.yaml"
    cfg.write_text(
        "label:\n  vasp_cmd: '>>vasp_cmd<<'\n  vasp_input_set_params:\n"
        "    user_incar_settings: {ENCUT: 400, ISPIN: 1}\n"
        "    user_kpoints_settings: {reciprocal_density: 50}\n"
    )
    fworker = vasp_env["tmp"] / "my_fworker.yaml"
    fworker.write_text("name: test_worker\ncategory: ''\nquery: '{}'\nenv:\n  vasp_cmd: vasp_std\n")
    out = vasp_env["tmp"] / "dft"
    args = [
        "label",
        "--backend",
        "vasp",
        "--config",
        str(cfg),
        "--vasp-input-set",
        "MPStaticSet",
        "--vasp-psp-dir",
        str(psp_dir),
        "--structures",
        str(vasp_env["structures"]),
        "--output",
        str(out),
        "--no-progress",
    ]
    # without the worker file the placeholder cannot be filled: a clear error, nothing run
    assert main(args) == 2
    assert "worker env has no 'vasp_cmd'" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--fworker", str(fworker)]) == 0, capsys.readouterr().err
    (task_path,) = out.glob("*/task.json")
    task = json.loads(task_path.read_text())
    assert task["status"] == "success" and task["command"] == "vasp_std"
    assert task["settings"]["input_set"] == "pymatgen.io.vasp.sets.MPStaticSet"
    (corr,) = task["corrections"]
    assert corr["errors"] == ["edddav"]
    from pymatgen.io.vasp import Incar, Kpoints

    incar = Incar.from_file(task_path.parent / "INCAR")
    assert incar["ENCUT"] == 400 and incar["ISPIN"] == 1 and incar["NSW"] == 0
    assert incar["LASPH"] is True  # from MPStaticSet itself
    assert incar["ALGO"] == "All"  # custodian's correction of MPStaticSet's ALGO = Fast
    assert Kpoints.from_file(task_path.parent / "KPOINTS").kpts[0] != [4, 4, 4]
    assert "TITEL  = PAW_PBE Si" in (task_path.parent / "POTCAR").read_text()
    got = ase.io.read(task_path.parent / "labelled.extxyz")
    assert got.get_potential_energy() == pytest.approx(-10.84147246, abs=1e-8)
    # an element without a POTCAR in the library: a clear error naming set, formula and library
    ge = ase.io.read(vasp_env["structures"] / "si2.vasp")
    ge.set_chemical_symbols(["Ge", "Ge"])
    ase.io.write(vasp_env["structures"] / "si2.vasp", ge, format="vasp")
    assert main([*args, "--fworker", str(fworker), "--output", str(out / "ge")]) == 2
    err = capsys.readouterr().err
    assert "MPStaticSet for Ge2 with POTCARs from" in err and str(psp_dir) in err


def test_scratch_dir_and_gzipped_outputs(vasp_env, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    s = LabellingSettings(
        backend="vasp", vasp_inputs=vasp_env["inputs"], scratch_dir=scratch, gzip_output=True
    )
    summary = label_structures(
        vasp_env["structures"], tmp_path / "o", make_backend(s), s, progress=False
    )
    assert summary["n_success"] == 1
    (workdir,) = [p.parent for p in (tmp_path / "o").glob("*/task.json")]
    assert (workdir / "vasprun.xml.gz").is_file() and not (workdir / "vasprun.xml").exists()
    assert (workdir / "OUTCAR.gz").is_file()
    got = ase.io.read(workdir / "labelled.extxyz")
    assert got.get_potential_energy() == pytest.approx(-10.84147246, abs=1e-8)
    # VASP ran in a scratch directory (removed afterwards), the outputs came back
    import gzip

    ran_in = Path(gzip.decompress((workdir / ".standin_cwd.gz").read_bytes()).decode())
    assert ran_in.parent == scratch.resolve()
    assert not any(scratch.iterdir())


def test_input_set_settings_errors(vasp_env, psp_dir):
    with pytest.raises(SettingsError, match="either label.vasp_inputs .* not both"):
        make_backend(
            LabellingSettings(
                backend="vasp", vasp_inputs=vasp_env["inputs"], vasp_input_set="MPStaticSet"
            )
        )
    with pytest.raises(SettingsError, match="no VaspInputSet 'NoSuchSet' in pymatgen.io.vasp.sets"):
        make_backend(
            LabellingSettings(backend="vasp", vasp_input_set="NoSuchSet", vasp_psp_dir=psp_dir)
        )
    with pytest.raises(SettingsError, match="is not a directory"):
        make_backend(
            LabellingSettings(
                backend="vasp", vasp_input_set="MPStaticSet", vasp_psp_dir=psp_dir / "nowhere"
            )
        )


def test_vasp_input_set_needs_potcar_library(monkeypatch):
    from pymatgen.core import SETTINGS

    from nequix_fw.errors import SettingsError
    from nequix_fw.labelling.vasp import psp_dir

    monkeypatch.setitem(SETTINGS, "PMG_VASP_PSP_DIR", None)
    with pytest.raises(SettingsError, match="VASP input sets need POTCARs: set label.vasp_psp"):
        psp_dir(None)
