"""Model files load only as deployed: a file whose sha256 differs from its model.json is refused, with a log line."""
from __future__ import annotations

import json
import logging

import joblib
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from shared.demo import record_sha256
from shared.errors import ModelNotFound
from shared.registry import Registry


X = pd.DataFrame({"x": [0.0, 1.0]})


def _deploy(root, version: str, c: float) -> None:
    target = root / "m" / version
    target.mkdir(parents=True)
    joblib.dump(LogisticRegression(C=c).fit(X, [0, 1]), target / "model.joblib")


def test_a_changed_model_file_is_refused_and_logged(tmp_path, caplog):
    _deploy(tmp_path, "v1", 1.0)
    record_sha256(tmp_path / "m" / "v1" / "model.joblib")
    assert Registry(str(tmp_path)).get("m", "v1").sha256 == json.loads((tmp_path / "m" / "v1" / "model.json").read_text())["sha256"]
    joblib.dump(LogisticRegression(C=2.0).fit(X, [0, 1]), tmp_path / "m" / "v1" / "model.joblib")
    with caplog.at_level(logging.ERROR, logger="shared.registry"):
        with pytest.raises(ModelNotFound):
            Registry(str(tmp_path)).get("m", "v1")
    assert any("refusing model m/v1" in r.getMessage() and "does not match" in r.getMessage() for r in caplog.records)


def test_the_newest_loadable_version_serves_when_the_newest_is_refused(tmp_path):
    _deploy(tmp_path, "v1", 1.0)
    _deploy(tmp_path, "v2", 2.0)
    (tmp_path / "m" / "v2" / "model.json").write_text(json.dumps({"sha256": "0" * 64}))
    assert Registry(str(tmp_path)).get("m").version == "v1"


def test_names_in_a_request_cannot_leave_the_models_dir(tmp_path):
    _deploy(tmp_path, "v1", 1.0)
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    registry = Registry(str(tmp_path / "m" / ".."))
    for name, version in (("..", None), ("m", ".."), ("m", "../v1"), ("../m", "v1"), ("/etc", None), ("m", "/v1")):
        with pytest.raises(ModelNotFound):
            registry.get(name, version)
