"""Synchronous predictions and model metadata: the API in-process against a real Redis-compatible server."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.registry import Registry
from tests.support.models import FEATURES, SENTINEL, training_frame


@pytest.fixture(scope="module")
def registry(models_dir) -> Registry:
    return Registry(models_dir)


@pytest.fixture(scope="module")
def cancer_rows() -> list[dict]:
    return load_breast_cancer(as_frame=True).data.iloc[[0, 19, 100, 250]].to_dict(orient="records")


@pytest.fixture(scope="module")
def diabetes_rows() -> list[dict]:
    return load_diabetes(as_frame=True).data.iloc[[0, 7, 42, 300]].to_dict(orient="records")


def frame_of(mv, rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[f.name for f in mv.features])


def ok_json(response) -> dict:
    assert response.status_code == 200, response.data[:500]
    assert response.mimetype == "application/json"
    return response.json


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- one object -------------------------------------------------------------------------------------

def test_one_object_classifier_matches_estimator(client, registry, cancer_rows):
    """One object gets the model's own label back, with the model name and version it came from."""
    mv = registry.get("breast_cancer")
    for row in cancer_rows:
        body = ok_json(client.post("/v1/models/breast_cancer/predict", json=row))
        assert body["model"] == {"name": "breast_cancer", "version": mv.version}
        assert body["prediction"] == mv.estimator.predict(frame_of(mv, [row]))[0]
        assert "probabilities" not in body


def test_one_object_probabilities_match_predict_proba(client, registry, cancer_rows):
    """?probabilities=true adds each class's probability, keyed by the class label, equal to predict_proba."""
    mv = registry.get("breast_cancer")
    for row in cancer_rows:
        body = ok_json(client.post("/v1/models/breast_cancer/predict?probabilities=true", json=row))
        expected = mv.estimator.predict_proba(frame_of(mv, [row]))[0]
        classes = [str(c) for c in mv.estimator.classes_]
        assert list(body["probabilities"]) == classes == ["benign", "malignant"]
        np.testing.assert_allclose([body["probabilities"][c] for c in classes], expected, rtol=1e-9)
        assert body["prediction"] == mv.estimator.predict(frame_of(mv, [row]))[0]


def test_one_object_regressor_matches_estimator(client, registry, diabetes_rows):
    """A regressor's number equals the estimator's to 1e-9, and asking for probabilities adds none."""
    mv = registry.get("diabetes")
    for row in diabetes_rows:
        body = ok_json(client.post("/v1/models/diabetes/predict?probabilities=true", json=row))
        assert body["model"] == {"name": "diabetes", "version": mv.version}
        assert body["prediction"] == pytest.approx(float(mv.estimator.predict(frame_of(mv, [row]))[0]), rel=1e-9)
        assert body.get("probabilities") is None


# -- arrays -----------------------------------------------------------------------------------------

def test_array_every_row_has_a_prediction_or_an_error(client, registry):
    """In an array, each row gets a prediction or an error with its code and index, never both."""
    mv = registry.get("fussy")
    frame = training_frame(12, seed=3)
    rows: list = frame.to_dict(orient="records")
    del rows[1]["f1"]
    rows[2]["f2"] = "abc"
    rows[3] = "not an object"
    rows[4]["f0"] = SENTINEL
    rows[7] = [1.0, 2.0, 3.0, 4.0, 5.0]
    rows[8] = None
    expected_errors = {1: "missing_feature", 2: "invalid_type", 3: "malformed_row", 4: "prediction_failed",
                       7: "malformed_row", 8: "malformed_row"}

    body = ok_json(client.post("/v1/models/fussy/predict?probabilities=true", json=rows))
    assert body["model"] == {"name": "fussy", "version": mv.version}
    assert len(body["predictions"]) == len(rows) == len(body["probabilities"])
    assert {e["row"]: e["code"] for e in body["errors"]} == expected_errors
    assert [e["row"] for e in body["errors"]] == sorted(expected_errors)
    assert all(isinstance(e["message"], str) and e["message"] for e in body["errors"])
    for i in range(len(rows)):
        has_prediction = body["predictions"][i] is not None
        assert has_prediction != (i in expected_errors), f"row {i}"
        assert (body["probabilities"][i] is not None) == has_prediction, f"row {i}"

    good = [i for i in range(len(rows)) if i not in expected_errors]
    X = frame.iloc[good][FEATURES]
    assert [body["predictions"][i] for i in good] == mv.estimator.predict(X).tolist()
    classes = [str(c) for c in mv.estimator.classes_]
    got = [[body["probabilities"][i][c] for c in classes] for i in good]
    np.testing.assert_allclose(got, mv.estimator.predict_proba(X), rtol=1e-9)


def test_row_the_model_rejects_fails_alone(client, registry):
    """A row the model raises on is prediction_failed, and the rows around it are still predicted."""
    mv = registry.get("fussy_reg")
    frame = training_frame(5, seed=4)
    rows = frame.to_dict(orient="records")
    rows[2]["f3"] = SENTINEL
    body = ok_json(client.post("/v1/models/fussy_reg/predict", json=rows))
    assert [(e["row"], e["code"]) for e in body["errors"]] == [(2, "prediction_failed")]
    assert body["predictions"][2] is None
    assert "probabilities" not in body
    good = [0, 1, 3, 4]
    expected = mv.estimator.predict(frame.iloc[good][FEATURES])
    for i, value in zip(good, expected):
        assert body["predictions"][i] == pytest.approx(float(value), rel=1e-9)


def test_array_of_good_rows_matches_one_by_one(client, registry, diabetes_rows):
    """An array of good rows has no errors and the same numbers as the rows sent one at a time."""
    mv = registry.get("diabetes")
    body = ok_json(client.post("/v1/models/diabetes/predict", json=diabetes_rows))
    assert body["errors"] == []
    expected = mv.estimator.predict(frame_of(mv, diabetes_rows))
    assert body["predictions"] == pytest.approx(expected.tolist(), rel=1e-9)
    singles = [ok_json(client.post("/v1/models/diabetes/predict", json=r))["prediction"] for r in diabetes_rows]
    assert singles == body["predictions"]


# -- inputs -----------------------------------------------------------------------------------------

def test_unknown_fields_are_ignored(client, cancer_rows):
    """Fields the model does not know are ignored: the answer is the same as without them."""
    row = cancer_rows[0]
    plain = ok_json(client.post("/v1/models/breast_cancer/predict?probabilities=true", json=row))
    noisy = ok_json(client.post("/v1/models/breast_cancer/predict?probabilities=true",
                                json={**row, "customer": "c-17", "nested": {"a": [1, 2]}, "flag": True}))
    assert noisy == plain
    many = ok_json(client.post("/v1/models/breast_cancer/predict", json=[{**row, "extra": "x"}]))
    assert many["errors"] == [] and many["predictions"] == [plain["prediction"]]


def test_null_feature_is_predicted_when_model_allows_missing(client, registry, diabetes_rows):
    """For a model that accepts missing values, a null or absent feature still gets a prediction."""
    mv = registry.get("diabetes")
    assert mv.allows_missing
    row = dict(diabetes_rows[1], bmi=None)
    body = ok_json(client.post("/v1/models/diabetes/predict", json=row))
    expected = mv.estimator.predict(frame_of(mv, [dict(row, bmi=np.nan)]))[0]
    assert body["prediction"] == pytest.approx(float(expected), rel=1e-9)
    absent = {k: v for k, v in diabetes_rows[1].items() if k != "bmi"}
    assert ok_json(client.post("/v1/models/diabetes/predict", json=absent))["prediction"] == body["prediction"]
    many = ok_json(client.post("/v1/models/diabetes/predict", json=[row, absent]))
    assert many["errors"] == [] and many["predictions"] == [body["prediction"]] * 2


@pytest.mark.parametrize("name", ["breast_cancer", "diabetes"])
def test_get_with_query_parameters_equals_post(client, name, cancer_rows, diabetes_rows):
    """GET with the features as query parameters answers exactly as POST of the same row."""
    rows = cancer_rows if name == "breast_cancer" else diabetes_rows
    for row in rows:
        query = {k: repr(v) for k, v in row.items()}
        got = ok_json(client.get(f"/v1/models/{name}/predict", query_string={**query, "probabilities": "true"}))
        posted = ok_json(client.post(f"/v1/models/{name}/predict?probabilities=true", json=row))
        assert got == posted


def test_explicit_version_is_served(client, registry, cancer_rows):
    """?version=v1 predicts with that version and says so."""
    mv = registry.get("breast_cancer", "v1")
    body = ok_json(client.post("/v1/models/breast_cancer/predict?version=v1", json=cancer_rows[0]))
    assert body["model"] == {"name": "breast_cancer", "version": "v1"}
    assert body["prediction"] == mv.estimator.predict(frame_of(mv, cancer_rows[:1]))[0]
    described = ok_json(client.get("/v1/models/breast_cancer?version=v1"))
    assert described["version"] == "v1"


@pytest.mark.parametrize("method,url", [
    ("post", "/v1/models/breast_cancer/predict?version=v999"),
    ("get", "/v1/models/breast_cancer/predict?version=v999"),
    ("get", "/v1/models/breast_cancer?version=v999"),
])
def test_unknown_version_is_model_not_found(client, cancer_rows, method, url):
    """A version that is not deployed is 404 model_not_found."""
    kwargs = {"json": cancer_rows[0]} if method == "post" else {}
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "model_not_found"
    assert response.json["error"]["message"]


# -- model metadata ---------------------------------------------------------------------------------

def test_model_listing_matches_the_registry(client, registry, models_dir):
    """GET /v1/models lists every deployed model once, describing its newest version as loaded."""
    body = ok_json(client.get("/v1/models"))
    assert list(body) == ["data"]
    by_name = {m["name"]: m for m in body["data"]}
    assert len(by_name) == len(body["data"])
    assert set(by_name) == set(registry.names()) >= {"breast_cancer", "diabetes", "fussy", "fussy_reg"}
    for name, entry in by_name.items():
        mv = registry.get(name)
        versions = registry.versions()[name]
        assert set(entry) == {"name", "version", "versions", "sha256", "task", "features", "classes",
                              "allows_missing"}
        assert entry["version"] == mv.version == versions[-1]
        assert entry["versions"] == versions
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        assert entry["sha256"] == sha256_of(Path(models_dir) / name / mv.version / "model.joblib")
        assert entry["task"] == mv.task
        assert entry["features"] == [{"name": f.name, "dtype": f.dtype} for f in mv.features]
        assert entry["classes"] == mv.classes
        assert entry["allows_missing"] is mv.allows_missing
        assert ok_json(client.get(f"/v1/models/{name}")) == entry

    cancer = by_name["breast_cancer"]
    assert cancer["task"] == "classification" and cancer["classes"] == ["benign", "malignant"]
    assert [f["name"] for f in cancer["features"]] == list(load_breast_cancer().feature_names)
    assert {f["dtype"] for f in cancer["features"]} == {"float64"}
    assert cancer["allows_missing"] is False
    diabetes = by_name["diabetes"]
    assert diabetes["task"] == "regression" and diabetes["classes"] is None
    assert [f["name"] for f in diabetes["features"]] == list(load_diabetes().feature_names)
    assert diabetes["allows_missing"] is True
    assert [f["name"] for f in by_name["fussy"]["features"]] == FEATURES


def _flipped_classifier():
    X = training_frame()
    y = np.where(X["f0"] + X["f1"] > 0, "no", "yes")
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)


def test_new_version_is_served_without_restart(tmp_path, models_dir, redis_server):
    """A version dropped into the models directory while the service runs is served next, in natural order."""
    from api import create_app

    root = tmp_path / "models"
    for version in ("v1", "v2"):
        shutil.copytree(Path(models_dir) / "fussy" / "v1", root / "fussy" / version)
    app = create_app({"REDIS_URL": redis_server.url, "MODELS_DIR": str(root), "MODEL_RESCAN_SECONDS": 0})
    client = app.test_client()
    try:
        row = training_frame(1, seed=9).to_dict(orient="records")[0]
        row.update(f0=1.5, f1=1.0)
        before = ok_json(client.get("/v1/models/fussy"))
        assert before["version"] == "v2" and before["versions"] == ["v1", "v2"]
        old = ok_json(client.post("/v1/models/fussy/predict", json=row))
        assert old["model"] == {"name": "fussy", "version": "v2"} and old["prediction"] == "yes"

        estimator = _flipped_classifier()
        target = root / "fussy" / "v10"
        target.mkdir()
        joblib.dump(estimator, target / "model.joblib.tmp")
        (target / "model.joblib.tmp").replace(target / "model.joblib")

        after = ok_json(client.get("/v1/models/fussy"))
        assert after["version"] == "v10"
        assert after["versions"] == ["v1", "v2", "v10"]
        assert after["sha256"] == sha256_of(target / "model.joblib")
        listed = {m["name"]: m for m in ok_json(client.get("/v1/models"))["data"]}
        assert listed["fussy"]["version"] == "v10" and listed["fussy"]["versions"] == ["v1", "v2", "v10"]
        new = ok_json(client.post("/v1/models/fussy/predict", json=row))
        assert new["model"] == {"name": "fussy", "version": "v10"}
        assert new["prediction"] == estimator.predict(pd.DataFrame([row], columns=FEATURES))[0] == "no"
        pinned = ok_json(client.post("/v1/models/fussy/predict?version=v2", json=row))
        assert pinned["model"]["version"] == "v2" and pinned["prediction"] == "yes"
    finally:
        svc = app.extensions["predq"]
        svc.redis.close()
        svc.celery.close()
