"""The files a user reads agree with the code: every setting documented, the Procfile's processes runnable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli.stack import procfile
from shared.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    """Each setting appears in the README's settings table with its default."""
    documented = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", README, flags=re.M))
    for name, field in Settings.model_fields.items():
        assert name in documented, f"{name} is not in the README's settings table"
        if field.default not in (None, ""):
            assert str(field.default).rstrip("0").rstrip(".") in documented[name], name


def test_procfile_variables_are_documented():
    """Every variable a Procfile line reads is named in the README."""
    for command in procfile().values():
        for name in re.findall(r"\$\{([A-Z_]+)", command):
            assert f"`{name}`" in README, f"{name} (read by the Procfile) is not documented"


def test_procfile_names_the_three_processes():
    """web runs gunicorn on the app factory, worker and beat run the Celery app."""
    entries = procfile()
    assert set(entries) == {"web", "worker", "beat"}
    assert "gunicorn" in entries["web"] and "api:create_app()" in entries["web"]
    assert "celery -A worker.app worker" in entries["worker"]
    assert "celery -A worker.app beat" in entries["beat"]


def test_settings_warn_of_a_visibility_timeout_shorter_than_three_hard_limits():
    """A visibility timeout under 3x the hard time limit makes slow chunks run twice: every process says so."""
    assert load_settings().warnings() == []
    short = load_settings({"CHUNK_TIME_LIMIT": 100, "CHUNK_SOFT_TIME_LIMIT": 90, "VISIBILITY_TIMEOUT": 200})
    assert "VISIBILITY_TIMEOUT" in short.warnings()[0]
    with pytest.raises(ValueError, match="CHUNK_SOFT_TIME_LIMIT"):
        load_settings({"CHUNK_TIME_LIMIT": 10, "CHUNK_SOFT_TIME_LIMIT": 20})


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the README's test command."""
    assert "./dev test" in README
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()
