"""Uncertainty (`nequix_fw.uncertainty`): calibration against the true errors."""

import numpy as np
import pytest

from nequix_fw.errors import SettingsError
from nequix_fw.selection import resolve_lo
from nequix_fw.settings import SelectionSettings
from nequix_fw.uncertainty import calibrate, lower_trust_level


def test_calibration_recovers_a_known_scale_and_sets_lo():
    rng = np.random.default_rng(0)
    dev = rng.lognormal(-2.0, 0.8, size=4000)  # eV/Å
    noise = rng.lognormal(0.0, 0.3, size=4000)
    err = 2.5 * dev * noise  # the true error is 2.5x the spread, with log-normal scatter
    cal = calibrate(dev, err, coverage=0.9)
    assert cal["scale"] == pytest.approx(2.5, rel=0.02)
    # conformal factor: the 90% quantile of the ratio, exp(1.2816 * 0.3) * 2.5 analytically
    assert cal["conformal_factor"] == pytest.approx(2.5 * np.exp(1.2816 * 0.3), rel=0.03)
    # on fresh data from the same distribution the bound holds for ~90% of structures
    dev2 = rng.lognormal(-2.0, 0.8, size=4000)
    err2 = 2.5 * dev2 * rng.lognormal(0.0, 0.3, size=4000)
    assert np.mean(err2 <= cal["conformal_factor"] * dev2) == pytest.approx(0.9, abs=0.02)
    lo = lower_trust_level(cal, 0.1)
    assert lo == pytest.approx(0.1 / cal["conformal_factor"])
    s = SelectionSettings(lo="auto", target_force_error=0.1)
    assert resolve_lo(s, cal, "here") == lo
    with pytest.raises(SettingsError, match="lo: auto needs a calibration .* iteration 2 has none"):
        resolve_lo(s, None, "the validation of iteration 2")
    with pytest.raises(ValueError, match="at least 2 structures"):
        calibrate([0.1], [0.2])


def test_the_collapse_alarm_fires_below_a_third_and_campaign_status_says_what_to_change(
    tmp_path, capsys
):
    import json

    from nequix_fw.cli import main
    from nequix_fw.uncertainty import collapse_warning, uncertainty_error_ratio

    err = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert uncertainty_error_ratio(err * 0.5, err) == pytest.approx(0.5)
    assert uncertainty_error_ratio(err, np.zeros(5)) is None
    assert collapse_warning(0.31, "here") is None and collapse_warning(None, "here") is None
    assert "collapsed: median max_force_dev is 0.12x" in collapse_warning(0.12, "here")
    its = [
        {"iteration": 0, "dataset_size": 6, "uncertainty_error_ratio": 0.55},
        {"iteration": 1, "dataset_size": 14, "uncertainty_error_ratio": 0.08},
    ]
    (tmp_path / "campaign.json").write_text(json.dumps({"name": "c", "iterations": its}))
    assert main(["campaign-status", str(tmp_path)]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "iteration 1's validation: the uncertainty has collapsed" in warnings[0]
    assert "0.08x" in warnings[0] and "train_ensemble.uncertainty: llpr" in warnings[0]
