"""Settings: the shipped pingu.yaml, the user's copy of it, and how values are read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest
import yaml

from pingu_dask.config import DEFAULTS, DEFAULTS_FILE, setting, setting_flag


def settings_in(config_dir: Path, *keys: str, **environment: str) -> dict:
    """The values of `keys` as a fresh process sees them with DASK_CONFIG=config_dir."""
    script = (
        "import json, sys; from pingu_dask.config import setting; "
        "print(json.dumps({k: setting(k) for k in sys.argv[1:]}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(DASK_CONFIG=str(config_dir), **environment)
    result = subprocess.run(
        [sys.executable, "-c", script, *keys], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_defaults_are_the_shipped_yaml() -> None:
    shipped = yaml.safe_load(Path(DEFAULTS_FILE).read_text())
    assert shipped == DEFAULTS and set(shipped) == {"pingu"}
    assert {key: setting(key) for key in shipped["pingu"]} == shipped["pingu"]
    # A few values as they were when they lived in a dict here (types included).
    assert setting("job-walltime") == "01:00:00" and setting("job-memory") == "16GB"
    assert setting("dashboard-address") == "127.0.0.1:8787"
    assert setting("scan-timeout") == 1800.0 and setting("check-voxel-mm-flag") == [0.3, 4.0]
    assert setting("cache-dir") is None and setting("exclude-labels") == []
    assert setting("batch-tls") is True and setting("batch-tls-directory") is None


def test_first_use_leaves_a_commented_copy_in_the_users_config(tmp_path: Path) -> None:
    assert settings_in(tmp_path, "max-jobs") == {"max-jobs": 4}
    copy = (tmp_path / "pingu.yaml").read_text()
    assert yaml.safe_load(copy) is None  # every line commented out: changes nothing
    assert "# pingu:\n" in copy and "#   batch-tls: true" in copy
    assert len(copy.splitlines()) == len(Path(DEFAULTS_FILE).read_text().splitlines())


def test_the_users_file_and_environment_win_over_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "pingu.yaml").write_text("pingu:\n  max-jobs: 9\n  batch-tls: false\n")
    values = settings_in(tmp_path, "max-jobs", "batch-tls", "min-jobs")
    assert values == {"max-jobs": 9, "batch-tls": False, "min-jobs": 0}
    assert (tmp_path / "pingu.yaml").read_text().startswith("pingu:\n  max-jobs: 9")  # kept
    values = settings_in(tmp_path, "max-jobs", DASK_PINGU__MAX_JOBS="12")
    assert values == {"max-jobs": 12}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("false", False), ("No", False), ("0", False), ("on", True)],
)
def test_yes_no_settings_read_text_as_people_write_it(value, expected: bool) -> None:
    with dask.config.set({"pingu.batch-tls": value}):
        assert setting_flag("batch-tls") is expected


def test_a_yes_no_setting_refuses_other_text() -> None:
    with dask.config.set({"pingu.batch-tls": "maybe"}), pytest.raises(ValueError, match="true"):
        setting_flag("batch-tls")
