"""The settings (`nequix_fw.settings`): defaults in one place, YAML sections, one readable
error per problem, renamed fields refused, worker placeholders (env_chk)."""

import pytest

from nequix_fw.campaign import Campaign
from nequix_fw.errors import SettingsError
from nequix_fw.settings import (
    RENAMED_SECTIONS,
    SECTIONS,
    STAGES,
    CampaignSettings,
    ExplorationSettings,
    LabellingSettings,
    SelectionSettings,
    TrainingSettings,
    ValidationSettings,
    env_chk,
    fill_placeholders,
    load_settings,
    make_settings,
    read_sections,
)
from nequix_fw.workflows import campaign_sections


def test_every_section_builds_with_its_defaults_and_refuses_unknown_keys():
    for name, cls in SECTIONS.items():
        if name == "campaign":
            continue  # directory and initial_structures are required
        assert cls().model_dump() == make_settings(cls).model_dump()
        with pytest.raises(SettingsError, match=f"invalid {cls.__name__}: typo: Extra inputs"):
            make_settings(cls, typo=1)


def test_sections_are_named_as_their_stages():
    stage_sections = set(SECTIONS) - {"ensemble", "campaign"}  # the engine's, the campaign's
    assert stage_sections == set(STAGES) - {"run_ensemble", "update_dataset"}  # no own settings
    assert set(RENAMED_SECTIONS.values()) == stage_sections


def test_yaml_sections_and_overrides(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("train_ensemble: {epochs: 7, architecture: {lmax: 1}}\nselect: {lo: 0.1}\n")
    t = load_settings(cfg, TrainingSettings, batch_size=2, seed=None)  # None: not given
    assert (t.epochs, t.architecture.lmax, t.batch_size, t.seed) == (7, 1, 2, 0)
    assert load_settings(None, SelectionSettings).lo == 0.05
    assert read_sections(cfg) == {
        "train_ensemble": {"epochs": 7, "architecture": {"lmax": 1}},
        "select": {"lo": 0.1},
    }
    cfg.write_text("trainig: {epochs: 7}\n")
    with pytest.raises(SettingsError, match=r"s.yaml: unknown section\(s\) \['trainig'\]"):
        read_sections(cfg)
    cfg.write_text("[1, 2]\n")
    with pytest.raises(SettingsError, match="s.yaml: expected a mapping of sections"):
        read_sections(cfg)
    cfg.write_text("train_ensemble: {epochs: [\n")
    with pytest.raises(SettingsError, match="s.yaml: not valid YAML"):
        read_sections(cfg)
    with pytest.raises(SettingsError, match="cannot read settings file"):
        read_sections(tmp_path / "missing.yaml")


def test_errors_name_every_problem_in_one_line():
    with pytest.raises(SettingsError) as exc:
        make_settings(TrainingSettings, epochs=0, learning_rate=-1)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("invalid TrainingSettings: ")
    assert "epochs: Input should be greater than or equal to 1" in msg
    assert "learning_rate: Input should be greater than 0" in msg
    with pytest.raises(SettingsError, match="lo: auto needs target_force_error"):
        make_settings(SelectionSettings, lo="auto")  # a model-level rule, no "Value error"


@pytest.mark.parametrize(
    ("cls", "old", "new"),
    [
        (ExplorationSettings, "hi", "stop_force_dev"),
        (ExplorationSettings, "min_distance", "stop_min_distance_A"),
        (SelectionSettings, "min_distance", "min_distance_A"),
        (LabellingSettings, "min_distance", "min_distance_A"),
    ],
)
def test_renamed_fields_point_to_their_new_names(cls, old, new):
    with pytest.raises(SettingsError, match=f"renamed: {old} is now {new}"):
        make_settings(cls, **{old: 1.0})
    assert getattr(make_settings(cls, **{new: 1.0}), new) == 1.0


def test_stages_have_one_name_and_old_resource_keys_are_refused():
    assert STAGES == (
        "explore",
        "run_ensemble",
        "select",
        "label",
        "update_dataset",
        "train_ensemble",
        "validate",
    )
    ok = make_settings(
        CampaignSettings,
        directory="d",
        initial_structures="i",
        resources={s: {"priority": 1} for s in STAGES},
    )
    assert set(ok.resources) == set(STAGES)
    with pytest.raises(
        SettingsError, match="dataset is now update_dataset, train is now train_ensemble"
    ):
        make_settings(
            CampaignSettings,
            directory="d",
            initial_structures="i",
            resources={"train": {}, "dataset": {}},
        )


def test_placeholders_are_filled_from_the_worker_env_or_left_out():
    values = {"vasp_cmd": ">>vasp_cmd<<", "max_errors": 3, "note": "a >>b<< c"}
    assert fill_placeholders(values, None, "label") == {"max_errors": 3, "note": "a >>b<< c"}
    filled = fill_placeholders(values, {"vasp_cmd": "srun vasp_std"}, "label")
    assert filled["vasp_cmd"] == "srun vasp_std" and filled["note"] == "a >>b<< c"
    with pytest.raises(
        SettingsError,
        match="label.vasp_cmd is '>>vasp_cmd<<', a FireWorks "
        "worker placeholder, but the worker env has no 'vasp_cmd'",
    ):
        fill_placeholders(values, {}, "label")
    assert env_chk(">>n<<", {"n": 4}, "train_ensemble.n_models") == 4
    assert env_chk(5, None, "x") == 5


def test_old_section_names_are_read_with_a_warning_naming_the_new_one(tmp_path, caplog):
    """Files written before the sections were named as their stages keep working: each old
    name is read as the new one, with a warning; both names of one section are refused."""
    cfg = tmp_path / "old.yaml"
    cfg.write_text(
        "exploration: {steps: 9}\ntraining: {epochs: 7}\nlabelling: {calculator: lj}\n"
        "campaign:\n  directory: run\n  initial_structures: i.xyz\n"
        "  schedule: {2: {selection: {max_selected: 3}}}\n"
        "  stages: [{iterations: 1, settings: {validation: {md_steps: 20}}}]\n"
    )
    with caplog.at_level("WARNING", logger="nequix_fw.settings"):
        assert load_settings(cfg, TrainingSettings).epochs == 7
        c = Campaign(campaign_sections(cfg))
    assert "section 'training' is now 'train_ensemble'" in caplog.text
    assert "section 'selection' is now 'select'" in caplog.text
    assert set(c.sections) == {"explore", "train_ensemble", "label", "campaign"}
    assert c.section(ExplorationSettings, 1).steps == 9
    assert c.section(SelectionSettings, 2).max_selected == 3
    assert "campaign: stages is now phases" in caplog.text
    assert c.sections["campaign"]["phases"][0]["settings"] == {"validate": {"md_steps": 20}}
    assert c.settings.phases[0].iterations == 1
    assert make_settings(ValidationSettings, reference="labelling").reference == "label"
    both = "campaign: {directory: run, initial_structures: i.xyz, stages: [], phases: []}\n"
    cfg.write_text(both)
    with pytest.raises(SettingsError, match="old.yaml: campaign: stages and phases are one"):
        campaign_sections(cfg)
    cfg.write_text("training: {epochs: 7}\ntrain_ensemble: {epochs: 8}\n")
    with pytest.raises(
        SettingsError,
        match="old.yaml: sections 'training' and 'train_ensemble' "
        "are one section \\('training' is its old name\\): give 'train_ensemble' "
        "only",
    ):
        read_sections(cfg)
