"""The whole campaign through FireWorks for real: `nequix-fw campaign --write`, `lpad reset`,
`lpad add`, `rlaunch rapidfire`, on FireWorks' embedded store, with EMT labels and tiny Nequix
ensembles. Each command is its own process (the embedded store is written back at exit)."""

import hashlib
import json
import subprocess

import ase.db
import ase.io
import pytest
import yaml
from helpers import BIN, LPAD, RLAUNCH, fireworks, make_cells, run_campaign


def test_campaign_runs_iterations_and_stops_at_max_iterations(tmp_path, launchpad_file):
    # from iteration 2 on, the schedule selects at most 2 structures instead of 3
    r = run_campaign(
        tmp_path, "cu_au", lo=0.0, extra="campaign: {schedule: {2: {select: {max_selected: 2}}}}"
    )
    its = r["log"]
    assert [it["iteration"] for it in its] == [0, 1, 2]
    # iteration 0 labels the 4 initial structures; 1 selects, labels and adds 3, 2 adds 2
    assert [it["dataset_size"] for it in its] == [4, 7, 9]
    assert [it["n_selected"] for it in its[1:]] == [3, 2]
    assert its[2]["stop_reason"] == "max_iterations (2) reached"
    assert all(it["validation"]["force_rmse_eV_per_A"] > 0 for it in its)
    for k in range(3):  # every iteration trained its own ensemble; 1 and 2 warm-started
        metas = [
            json.loads(p.read_text())
            for p in (r["dir"] / f"iter_{k:03d}" / "train_ensemble").glob("member_*.json")
        ]
        assert len(metas) == 2 and {m["start"] for m in metas} == {
            "scratch" if k == 0 else "warm_start"
        }
        # train_ensemble.epochs is ">>train_epochs<<": the worker's env gave 3 (env_chk)
        assert {m["epochs_run"] for m in metas} == {3}
    # the labels landed in MongoDB with their iteration; FireWorks ran 4 + 2 x 7 Fireworks
    # (label, update_dataset, train_ensemble, validate; then explore, run_ensemble, select too)
    db = r["db"]
    assert [it for _, it in db["dataset"]] == [0] * 4 + [1] * 3 + [2] * 2
    assert db["backends"] == ["ase"]
    assert len(db["fireworks"]) == 18 and {s for _, s in db["fireworks"]} == {"COMPLETED"}
    # one workflow per iteration, each added by the iteration before (FireWorks' cost per
    # Firework grows with the size of its workflow)
    assert db["workflow_state"] == ["COMPLETED"] * 3
    assert db["workflows"] == [
        ["cu_au iteration 0", 4, 0],  # the documented `<name> iteration <k>`, 0 too
        ["cu_au iteration 1", 7, 1],
        ["cu_au iteration 2", 7, 2],
    ]
    # each stage logged what it did into its launch directory
    logs = [p.read_text() for p in tmp_path.rglob("launcher_*/nequix_fw.log")]
    assert len(logs) == 18 and all(logs)  # one per Firework
    text = "".join(logs)
    assert text.count("INFO nequix_fw.labelling.base: labelled ") == 3
    assert "campaign cu_au iteration 2: n_models=2" in text
    assert text.count("INFO nequix_fw.validation: validation on 6 structures") == 3
    # the progress plot is redrawn after every validation; campaign-status prints the table
    png = r["dir"] / "campaign.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = subprocess.run(
        [BIN / "nequix-fw", "campaign-status", str(r["dir"]), "--plot"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = p.stdout.splitlines()[3:]
    rows = [line.split() for line in lines if line[:4].strip().isdigit()]
    # iteration, selected, labelled, dataset size (the candidate count depends on MD stops)
    assert [[row[0], *row[2:5]] for row in rows] == [
        ["0", "-", "4", "4"],
        ["1", "3", "3", "7"],
        ["2", "2", "2", "9"],
    ]
    assert int(rows[1][1]) > 0 and int(rows[2][1]) > 0
    # validation errors, the calibration factor and the selection method of every iteration
    for row, it in zip(rows, its, strict=True):
        assert row[5] == f"{it['validation']['force_rmse_eV_per_A']:.4f}"
        assert row[6] == f"{it['validation']['energy_rmse_meV_per_atom']:.1f}"
        assert row[7] == f"{it['calibration']['conformal_factor']:.2f}"
        # the collapse alarm's measure, every iteration, and its warning under the row
        ratio = it["uncertainty_error_ratio"]
        alarm = f"iteration {it['iteration']}'s validation: the uncertainty has collapsed"
        warned = any(alarm in line for line in lines)
        assert ratio > 0 and warned == (ratio < 0.3)
    assert [row[9] for row in rows] == ["-", "uncertainty", "uncertainty"]
    assert "max_iterations (2) reached" in p.stdout and f"plot -> {png}" in p.stdout
    assert "(from MongoDB (" in p.stdout.splitlines()[0]  # campaign-status reads the database
    # everything the campaign produced is in MongoDB: per iteration its record, labelling tasks,
    # members (checkpoints in GridFS), validation report and (from 1 on) selection manifest
    assert db["counts"] == {
        "nequix_fw_iterations": 3,
        "nequix_fw_label_tasks": 4 + 3 + 2,
        "nequix_fw_models": 3 * 2,
        "nequix_fw_validation": 3,
        "nequix_fw_selections": 2,
    }
    stops = [None, None, "max_iterations (2) reached"]
    assert [it[:3] for it in db["iterations"]] == [
        [0, 4, stops[0]],
        [1, 7, stops[1]],
        [2, 9, stops[2]],
    ]
    assert [it[3] for it in db["iterations"]] == [
        it["validation"]["force_rmse_eV_per_A"] for it in its
    ]
    assert {tuple(t[:2]) for t in db["tasks"]} == {(0, "success"), (1, "success"), (2, "success")}
    assert "campaign_1_iteration_1" in db["indexes"]
    files = {(k, f): sha for k, f, sha in db["models"]}
    for k in range(3):
        for f in ("member_0.nqx", "member_1.nqx"):
            data = (r["dir"] / f"iter_{k:03d}" / "train_ensemble" / f).read_bytes()
            assert files[(k, f)] == hashlib.sha256(data).hexdigest()
    # export: the training data for other codes, and an ensemble for a worker without the files
    nfw = [BIN / "nequix-fw"]
    lp = ["--launchpad", str(tmp_path / "my_launchpad.yaml")]
    subprocess.run(
        [
            *nfw,
            "export",
            "--dataset",
            "db:cu_au",
            "--iteration",
            "1",
            "2",
            "--output",
            str(tmp_path / "new.extxyz"),
            *lp,
        ],
        check=True,
    )
    new = ase.io.read(tmp_path / "new.extxyz", ":")
    assert sorted(a.info["iteration"] for a in new) == [1, 1, 1, 2, 2]
    subprocess.run(
        [
            *nfw,
            "export",
            "--dataset",
            "db:cu_au",
            "--format",
            "ase-db",
            "--output",
            str(tmp_path / "all.db"),
            *lp,
        ],
        check=True,
    )
    with ase.db.connect(tmp_path / "all.db") as con:
        rows = list(con.select())
    assert len(rows) == 9 and {row.backend for row in rows} == {"ase"}
    assert sorted(row.structure_id for row in rows) == db["ids"]
    subprocess.run(
        [*nfw, "export", "--models", "cu_au/2", "--output", str(tmp_path / "m2"), *lp], check=True
    )
    for f in ("member_0.nqx", "member_1.nqx"):
        assert (tmp_path / "m2" / f).read_bytes() == (
            r["dir"] / "iter_002" / "train_ensemble" / f
        ).read_bytes()


def test_campaign_stops_when_nothing_is_selected(tmp_path, launchpad_file):
    r = run_campaign(tmp_path, "quiet", lo=50.0)  # every candidate 'accurate' at 50 eV/Å
    its = r["log"]
    assert [it["iteration"] for it in its] == [0, 1]
    assert its[1]["n_selected"] == 0 and its[1]["stop_reason"] == "converged: 0 selected (< 1)"
    names = [n for n, _ in r["db"]["fireworks"]]
    assert "quiet select 1" in names and "quiet label 1" not in names
    assert r["db"]["workflow_state"] == ["COMPLETED", "COMPLETED"]


def test_a_campaign_on_one_model_with_llpr_heads_selects_and_goes_on(tmp_path, launchpad_file):
    """The default for fine-tuning, one member whose LLPR heads give the spread, through the
    whole loop: explore, evaluate, select, label, retrain (warm start keeps the heads)."""
    r = run_campaign(
        tmp_path,
        "heads",
        lo=0.0,
        # the 3-epoch model errs by ~1 eV/Å and its heads say so: MD must not stop on that
        extra="train_ensemble: {n_models: 1, uncertainty: llpr, llpr_heads: 4}\n"
        "campaign: {max_iterations: 1}\nexplore: {stop_force_dev: null}",
    )
    its = r["log"]
    assert [it["dataset_size"] for it in its] == [4, 7]
    assert its[1]["n_selected"] == 3
    for k in range(2):  # one member and its heads each iteration
        train = r["dir"] / f"iter_{k:03d}" / "train_ensemble"
        assert [p.name for p in sorted(train.glob("member_*.nqx"))] == ["member_0.nqx"]
        assert (train / "member_0.llpr.npz").is_file()
    header = json.loads((r["dir"] / "iter_001/run_ensemble/ensemble_results.json").read_text())
    assert header["uncertainty_method"] == "llpr" and len(header["models"]) == 1
    assert all(it["uncertainty_error_ratio"] > 0 for it in its)
    assert {s for _, s in r["db"]["fireworks"]} == {"COMPLETED"}


def test_rerun_appends_nothing_twice_and_reuses_labels(tmp_path, launchpad_file):
    """`lpad rerun_fws` on a finished iteration: the validation runs the next iteration's
    workflow (added by its first run) again instead of adding another, the selection picks the
    same structures, their labels are reused and the dataset stays as it was. A rerun that now
    stops defuses the next iteration."""
    ase.io.write(tmp_path / "pool.extxyz", make_cells(6, seed=5))
    pool = f"campaign: {{candidate_pool: [{tmp_path / 'pool.extxyz'}], explore: false, "
    first = run_campaign(
        tmp_path, "again", lo=0.0, extra=pool + "max_iterations: 1, label_group_size: 2}"
    )
    # labelling in groups of 2: iteration 0 (4 structures) and 1 (3 selected) in 2 Fireworks each
    names = [
        "again " + n
        for n in (
            "label 0.0",
            "label 0.1",
            "label 1.0",
            "label 1.1",
            "run_ensemble 1",
            "select 1",
            "train_ensemble 0",
            "train_ensemble 1",
            "update_dataset 0",
            "update_dataset 1",
            "validate 0",
            "validate 1",
        )
    ]
    assert first["db"]["fireworks"] == [[n, "COMPLETED"] for n in names]
    groups = [
        json.loads(p.read_text())["n_structures"]
        for p in sorted((first["dir"] / "iter_001" / "label").glob("summary*.json"))
    ]
    assert groups == [2, 1]
    selected = (first["dir"] / "iter_001" / "select" / "manifest.json").read_text()

    again = fireworks(tmp_path, [*LPAD, "rerun_fws", "-n", "again validate 0"], RLAUNCH)
    assert again["db"] == first["db"]  # the same Fireworks, all COMPLETED, same dataset
    assert (again["dir"] / "iter_001" / "select" / "manifest.json").read_text() == selected
    it1 = again["log"][1]
    assert (it1["n_selected"], it1["n_labelled"], it1["n_label_reused"]) == (3, 3, 3)
    assert it1["stop_reason"] == "max_iterations (1) reached"

    # the same rerun with max_iterations 0: validation 0 now stops and defuses iteration 1
    update = '{"_tasks.0.sections.campaign.max_iterations": 0}'
    stopped = fireworks(
        tmp_path,
        [*LPAD, "rerun_fws", "-n", "again validate 0"],
        [*LPAD, "update_fws", "-n", "again validate 0", "-u", update],
        RLAUNCH,
    )
    states = dict(stopped["db"]["fireworks"])
    assert states["again validate 0"] == "COMPLETED"
    assert states["again run_ensemble 1"] == "DEFUSED" and states["again select 1"] == "WAITING"
    assert stopped["db"]["workflow_state"] == ["COMPLETED", "DEFUSED"]
    assert len(stopped["db"]["workflows"]) == 2  # none added twice
    assert stopped["log"][0]["stop_reason"] == "max_iterations (0) reached"
    assert stopped["db"]["ids"] == first["db"]["ids"]


def test_schedule_and_accurate_fraction_stop(tmp_path, capsys):
    from nequix_fw.campaign import Campaign
    from nequix_fw.cli import main
    from nequix_fw.settings import ExplorationSettings, SelectionSettings
    from nequix_fw.stopping import selection_stop
    from nequix_fw.workflows import campaign_sections

    cfg = tmp_path / "c.yaml"
    schedule = {
        2: {"explore": {"temperatures_K": [900.0]}},
        3: {"explore": {"steps": 50}, "select": {"max_selected": 7}},
    }
    cfg.write_text(
        yaml.safe_dump(
            {
                "campaign": {
                    "directory": str(tmp_path / "r"),
                    "initial_structures": "i.xyz",
                    "schedule": schedule,
                    "accurate_fraction": 0.95,
                },
                "explore": {"temperatures_K": [300.0], "steps": 500},
                "select": {"max_selected": 20},
            }
        )
    )
    c = Campaign(campaign_sections(cfg))
    assert list(c.sections["campaign"]["schedule"]) == ["2", "3"]  # string keys for MongoDB
    explore = [c.section(ExplorationSettings, k) for k in range(1, 5)]
    assert [(e.temperatures_K, e.steps) for e in explore] == [
        ([300.0], 500),
        ([900.0], 500),
        ([900.0], 50),
        ([900.0], 50),
    ]
    assert [c.section(SelectionSettings, k).max_selected for k in (2, 3)] == [20, 7]
    # DP-GEN's convergence measure: the share of candidates the ensemble already gets right
    record = {"n_selected": 4, "selection": {"accurate": 96, "candidate": 4, "failed": 0}}
    assert selection_stop(c, 3, record) == "converged: 96 of 100 candidates accurate (>= 95%)"
    record["selection"].update(accurate=94, candidate=6)
    assert selection_stop(c, 3, record) is None
    # a bad value in the schedule is caught when the workflow is built, with where it is
    schedule[3]["explore"]["steps"] = -1
    cfg.write_text(
        yaml.safe_dump(
            {
                "campaign": {
                    "directory": str(tmp_path / "r"),
                    "initial_structures": "i.xyz",
                    "schedule": schedule,
                }
            }
        )
    )
    assert main(["campaign", "--config", str(cfg), "--write", str(tmp_path / "w.yaml")]) == 2
    err = capsys.readouterr().err
    assert "invalid ExplorationSettings: steps" in err
    assert "(campaign.schedule from iteration 3)" in err
    cfg.write_text(
        yaml.safe_dump(
            {
                "campaign": {
                    "directory": str(tmp_path / "r"),
                    "initial_structures": "i.xyz",
                    "schedule": {1: {"campaign": {}}},
                }
            }
        )
    )
    assert main(["campaign", "--config", str(cfg), "--write", str(tmp_path / "w.yaml")]) == 2
    assert "schedule.1.campaign" in capsys.readouterr().err
    assert not (tmp_path / "w.yaml").exists()


@pytest.mark.parametrize("bad", ["no_campaign", "placeholder"])
def test_campaign_bad_input(tmp_path, bad, capsys):
    from nequix_fw.cli import main

    cfg = tmp_path / "c.yaml"
    if bad == "no_campaign":
        cfg.write_text("train_ensemble: {n_models: 2}\n")
        assert main(["campaign", "--config", str(cfg), "--write", str(tmp_path / "w.yaml")]) == 2
        assert "no 'campaign' section" in capsys.readouterr().err
    else:  # a typo in a section is caught before anything is added
        cfg.write_text("campaign: {directory: r, initial_structures: i.xyz}\nselection: {lo: -1}\n")
        assert main(["campaign", "--config", str(cfg), "--write", str(tmp_path / "w.yaml")]) == 2
        assert "invalid SelectionSettings" in capsys.readouterr().err
    assert not (tmp_path / "w.yaml").exists()


def test_property_tolerances_stop_the_campaign(tmp_path, capsys):
    """The structural checks' errors against validate.reference stop the campaign once all
    are within campaign.property_tolerances, and a campaign that stops with one missed is not
    called converged; bad tolerances are refused."""
    from nequix_fw.campaign import Campaign
    from nequix_fw.cli import main
    from nequix_fw.stopping import iteration_stop, selection_stop
    from nequix_fw.workflows import campaign_sections

    cfg = tmp_path / "c.yaml"
    (tmp_path / "t.xyz").write_text("")  # the test set must exist (its contents are not read)
    settings = {
        "campaign": {
            "directory": str(tmp_path / "r"),
            "initial_structures": "i.xyz",
            "max_iterations": 5,
            "testset": [str(tmp_path / "t.xyz")],
            "property_tolerances": {"v0_percent": 1, "bulk_modulus_percent": 5},
        },
        "validate": {"reference": "emt"},
    }
    cfg.write_text(yaml.safe_dump(settings))
    c = Campaign(campaign_sections(cfg))
    record = {
        "properties": {
            "v0_percent": 0.4,
            "bulk_modulus_percent": -7.0,
            "vacancy_formation_eV": None,
        }
    }
    assert iteration_stop(c, 1, record) is None  # B0 off by 7% > 5%
    record["properties"]["bulk_modulus_percent"] = -4.0
    assert iteration_stop(c, 1, record) == (
        "converged: bulk_modulus_percent error -4 within 5.0, v0_percent error +0.4 within 1.0"
    )
    assert iteration_stop(c, 1, {}) is None  # no structural checks: not converged by them
    # a selection that shows convergence while a tolerance is missed stops the campaign
    # (nothing is left to label) but does not call it converged
    empty = {"n_selected": 0, "selection": {"accurate": 24, "candidate": 0, "failed": 0}}
    c.record(1, properties={"v0_percent": 0.4, "bulk_modulus_percent": -7.0})
    assert selection_stop(c, 2, empty) == (
        "stopped: 0 selected (< 1), but not converged: iteration 1 missed "
        "bulk_modulus_percent -7 (tolerance 5.0)"
    )
    c.record(1, properties={"v0_percent": 0.4, "bulk_modulus_percent": -4.0})
    assert selection_stop(c, 2, empty) == "converged: 0 selected (< 1)"
    # the elastic and phonon checks' largest errors, likewise
    settings["campaign"]["property_tolerances"] = {"elastic_percent": 10, "phonon_percent": 5}
    settings["validate"].update(elastic=True, phonons=True)
    cfg.write_text(yaml.safe_dump(settings))
    c = Campaign(campaign_sections(cfg))
    record = {"properties": {"elastic_percent": 12.0, "phonon_percent": 3.0}}
    assert iteration_stop(c, 1, record) is None
    record["properties"]["elastic_percent"] = 8.0
    assert iteration_stop(c, 1, record) == (
        "converged: elastic_percent error +8 within 10.0, phonon_percent error +3 within 5.0"
    )
    settings["campaign"]["property_tolerances"] = {"v0_percent": 1, "bulk_modulus_percent": 5}
    settings["validate"] = {"reference": "emt"}
    # without a reference to compare with, a negative tolerance, an unknown property
    no_testset = {k: v for k, v in settings["campaign"].items() if k != "testset"}
    cases = [
        ({"validate": {}}, "campaign.property_tolerances needs validate.reference"),
        (
            {"campaign": no_testset},
            "the structural checks (validate.reference) run in "
            "the validation, which needs campaign.testset",
        ),
        (
            {"campaign": {**settings["campaign"], "property_tolerances": {"v0_percent": -1}}},
            "property_tolerances: v0_percent must be a finite number > 0, got -1.0",
        ),
        (
            {"campaign": {**settings["campaign"], "property_tolerances": {"c11": 1}}},
            "property_tolerances.c11",
        ),
        (
            {"campaign": {**settings["campaign"], "property_tolerances": {"elastic_percent": 10}}},
            "campaign.property_tolerances.elastic_percent needs validate.elastic: true",
        ),
        (
            {
                "campaign": {
                    **settings["campaign"],
                    "property_tolerances": {"vacancy_formation_eV": 0.05},
                },
                "validate": {"reference": None, "reference_data": [str(tmp_path / "t.xyz")]},
            },
            "campaign.property_tolerances.vacancy_formation_eV needs validate.reference as a "
            "calculator",
        ),
        (
            {
                "campaign": {
                    k: v for k, v in settings["campaign"].items() if k != "property_tolerances"
                },
                "validate": {"phonons": True},
            },
            "validate.elastic and validate.phonons compare with a reference: validate.reference",
        ),
    ]
    for change, msg in cases:
        cfg.write_text(yaml.safe_dump({**settings, **change}))
        assert main(["campaign", "--config", str(cfg), "--write", str(tmp_path / "w.yaml")]) == 2
        assert msg in capsys.readouterr().err, msg


def test_stage_and_system_settings_are_checked(tmp_path, capsys):
    """Bad phases and systems: one error line, exit 2, no workflow written."""
    from nequix_fw.cli import main

    cfg = tmp_path / "c.yaml"
    system = {"name": "cu", "initial_structures": "cu.xyz"}
    phase = {"iterations": 1}
    cases = [
        ({"phases": [{"name": "x"}]}, "a phase needs accurate_fraction or iterations"),
        (
            {"phases": [{"iterations": 1, "settings": {"explore": {"steps": -1}}}]},
            "(campaign.phases[0])",
        ),
        ({"systems": [system, system]}, "systems: names must differ (cu, cu)"),
        (
            {
                "systems": [system],
                "phases": [{**phase, "settings": {"train_ensemble": {"epochs": 3}}}],
            },
            "with systems, each system goes through the phases on its own, so a phase sets "
            "explore and select only, not train_ensemble",
        ),
        ({"systems": [{**system, "settings": {"select": {"hi": -1}}}]}, "(campaign.systems[0])"),
    ]
    for extra, msg in cases:
        cfg.write_text(
            yaml.safe_dump(
                {"campaign": {"directory": str(tmp_path / "r"), "initial_structures": "i", **extra}}
            )
        )
        assert main(["campaign", "--config", str(cfg), "--write", str(tmp_path / "w.yaml")]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "w.yaml").exists()


def test_a_relative_on_disk_dataset_grows_under_rapidfire(tmp_path, launchpad_file):
    """`campaign.dataset: data_dir` (an on-disk dataset, relative): every Firework of
    `rlaunch rapidfire` runs in its own launcher_* directory, and all of them grow the one
    dataset in the directory the campaign was built in (before: iteration 0 wrote
    launcher_.../data_dir and the training Firework fizzled)."""
    r = run_campaign(
        tmp_path, "rel", lo=0.0, extra="campaign: {dataset: data_dir, max_iterations: 1}"
    )
    assert [it["dataset_size"] for it in r["log"]] == [4, 7]
    data = ase.io.read(tmp_path / "data_dir" / "training_set.extxyz", ":")
    assert sorted(a.info["iteration"] for a in data) == [0] * 4 + [1] * 3
    assert not list(tmp_path.glob("launcher_*/data_dir"))
    assert {s for _, s in r["db"]["fireworks"]} == {"COMPLETED"} and not r["db"]["fizzled"]
    assert r["db"]["dataset"] == []  # nothing in the store's datasets
