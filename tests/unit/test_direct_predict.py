"""The direct path of linear models (model.json `direct_predict`): predict's exact bits, or predict itself."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import LinearSVC

from shared.errors import ModelNotFound
from shared.prediction import record_plan
from shared.registry import ModelVersion, Registry, load_version

FEATURES = [f"f{i}" for i in range(20)]
N_SAMPLE = 200_000
KINDS = ["binary_scaled", "binary_bare", "binary_frame", "multiclass", "multiclass_no_mean", "svc_no_std", "linear",
         "ridge"]
META = {"features": [{"name": f, "dtype": "float64"} for f in FEATURES], "allows_missing": False,
        "direct_predict": True}


def _train(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((5_000, len(FEATURES))) * 2.0 + 0.5


def _deploy(root: Path, name: str, estimator, meta: dict | None = META) -> ModelVersion:
    target = root / name / "v1"
    target.mkdir(parents=True)
    joblib.dump(estimator, target / "model.joblib")
    if meta is not None:
        (target / "model.json").write_text(json.dumps(meta))
    return load_version(name, "v1", target)


def _kinds() -> dict:
    X = _train()
    binary = (X[:, 0] + X[:, 1] - 1 > 0).astype(int)
    three = np.digitize(X[:, 0] - X[:, 3], [-1.0, 1.0])
    target = X[:, 0] * 3 - X[:, 2] + 0.1 * X[:, 5] ** 2
    frame = pd.DataFrame(X, columns=FEATURES)
    return {
        "binary_scaled": make_pipeline(StandardScaler(), LogisticRegression()).fit(X, binary),
        "binary_bare": LogisticRegression(C=0.5).fit(X, binary),
        "binary_frame": make_pipeline(StandardScaler(), LogisticRegression()).fit(frame, np.where(binary, "yes", "no")),
        "multiclass": make_pipeline(StandardScaler(), LogisticRegression()).fit(X, three),
        "multiclass_no_mean": make_pipeline(StandardScaler(with_mean=False), LogisticRegression()).fit(X, three),
        "svc_no_std": make_pipeline(StandardScaler(with_std=False), LinearSVC()).fit(X, binary),
        "linear": LinearRegression().fit(X, target),
        "ridge": make_pipeline(StandardScaler(), Ridge(alpha=3.0)).fit(X, target),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, ModelVersion]:
    root = tmp_path_factory.mktemp("models")
    return {name: _deploy(root, name, est) for name, est in _kinds().items()}


def _sample(mv: ModelVersion) -> np.ndarray:
    """Rows from 1e-4 to 1e4 in scale, a quarter of them moved to within a hair of the decision boundary."""
    rng = np.random.default_rng(42)
    X = rng.standard_normal((N_SAMPLE, len(FEATURES))) * 10.0 ** rng.uniform(-4, 4, (N_SAMPLE, 1))
    est = mv.estimator
    if mv.task == "classification" and len(mv.classes) == 2:
        near = X[: N_SAMPLE // 4]
        with sklearn.config_context(assume_finite=True):
            score = est.decision_function(pd.DataFrame(near, columns=FEATURES) if mv.takes_frame else near)
            # the score is affine in the row: step along the gradient to the boundary, then off it a little
            zero = np.zeros((1, len(FEATURES)))
            base = est.decision_function(pd.DataFrame(zero, columns=FEATURES) if mv.takes_frame else zero)
            grad = np.array([est.decision_function(pd.DataFrame(e[None], columns=FEATURES) if mv.takes_frame
                                                   else e[None])[0] for e in np.eye(len(FEATURES))]) - base
        near -= np.outer(score, grad) / (grad @ grad)
        near += np.outer(rng.uniform(-1e-12, 1e-12, len(near)), grad)
    return X


@pytest.mark.parametrize("name", KINDS)
def test_direct_path_equals_predict_and_predict_proba_bit_for_bit(models, name):
    """On 200,000 rows of varied scale, with rows at the boundary, direct answers equal predict's exactly."""
    mv = models[name]
    plan = record_plan(mv)
    assert plan.numeric is not None and plan.numeric.direct is not None, "an opted-in linear model goes direct"
    X = _sample(mv)
    rows = plan.numeric
    preds, probas = rows.call(rows.stack(X), plan.probabilities)
    given = pd.DataFrame(X, columns=FEATURES) if mv.takes_frame else X
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        expected = mv.estimator.predict(given)
        expected_probas = mv.estimator.predict_proba(given) if plan.probabilities else None
    assert preds.dtype == expected.dtype and np.array_equal(preds, expected)
    if expected_probas is None:
        assert probas is None
    else:
        assert probas.dtype == expected_probas.dtype and np.array_equal(probas, expected_probas)
    if mv.task == "classification":
        assert len(np.unique(preds)) == len(mv.classes), "the sample reaches every class"


def test_boundary_rows_are_at_the_boundary(models):
    """The sample's boundary rows score within a hair of zero, so a rounding difference would flip them."""
    mv = models["binary_scaled"]
    near = _sample(mv)[: N_SAMPLE // 4]
    scores = mv.estimator.decision_function(near)
    assert np.abs(scores).max() < 1e-6 and (scores > 0).any() and (scores <= 0).any()


def test_model_without_direct_predict_keeps_predict(tmp_path):
    """Default off: a linear model without the field in model.json is predicted by scikit-learn."""
    meta = {k: v for k, v in META.items() if k != "direct_predict"}
    mv = _deploy(tmp_path, "plain", _kinds()["ridge"], meta=meta)
    assert mv.direct_predict is False
    assert record_plan(mv).numeric.direct is None


@pytest.mark.parametrize("estimator, why, off_by_one_ulp", [
    (make_pipeline(MinMaxScaler(), LogisticRegression()), "MinMaxScaler", False),
    (make_pipeline(StandardScaler(), LogisticRegression()), "differs from predict_proba", True),
])
def test_unsupported_model_opted_in_keeps_predict_with_a_warning(tmp_path, caplog, monkeypatch, estimator, why,
                                                                   off_by_one_ulp):
    """A pipeline the direct path does not compute exactly keeps predict, and says so once, naming the model."""
    if off_by_one_ulp:  # a direct path whose probabilities are one ulp off must be caught by the plan-time check
        import shared.direct

        exact = shared.direct.DirectLinear.call

        def off(self, X, probabilities):
            preds, probas = exact(self, X, probabilities)
            return preds, (None if probas is None else np.nextafter(probas, 2.0))

        monkeypatch.setattr(shared.direct.DirectLinear, "call", off)
    X = _train()
    mv = _deploy(tmp_path, "odd", estimator.fit(X, (X[:, 0] > 0.5).astype(int)))
    with caplog.at_level(logging.WARNING, logger="shared.prediction"):
        plan = record_plan(mv)
        record_plan(mv)
    assert plan.numeric is not None and plan.numeric.direct is None
    warned = [r.getMessage() for r in caplog.records if "direct_predict" in r.getMessage()]
    assert len(warned) == 1 and "odd/v1" in warned[0] and why in warned[0]


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_model_json_with_a_bad_direct_predict_is_refused(tmp_path, caplog, value):
    """direct_predict must be true or false: anything else refuses the model, naming the file and the field."""
    with pytest.raises(ValueError, match=r"model\.json: field 'direct_predict' must be true or false"):
        _deploy(tmp_path, "bad", LinearRegression().fit(_train(), _train()[:, 0]), meta={**META, "direct_predict": value})
    with caplog.at_level(logging.ERROR), pytest.raises(ModelNotFound):
        Registry(tmp_path).get("bad")
    assert any("direct_predict" in r.getMessage() for r in caplog.records)


def test_single_predictions_through_the_app_equal_the_path_without_direct(tmp_path):
    """POST /predict answers of an opted-in model are the same JSON as those of the same model without it."""
    from api import create_app

    estimator = _kinds()["multiclass"]
    meta = {k: v for k, v in META.items() if k != "direct_predict"}
    _deploy(tmp_path, "direct", estimator)
    _deploy(tmp_path, "plain", estimator, meta=meta)
    app = create_app({"REDIS_URL": "redis://127.0.0.1:1/0", "MODELS_DIR": str(tmp_path),
                      "RATE_LIMIT_PER_MINUTE": 0})
    registry = app.extensions["predq"].registry
    try:
        client = app.test_client()
        rng = np.random.default_rng(5)
        rows = pd.DataFrame(rng.standard_normal((200, len(FEATURES))) * 3, columns=FEATURES).to_dict(orient="records")
        answers = {}
        for name in ("direct", "plain"):
            answers[name] = []
            for row in rows:
                response = client.post(f"/v1/models/{name}/predict?probabilities=true", json=row)
                assert response.status_code == 200, response.get_data(as_text=True)
                body = response.get_json()
                answers[name].append((body["prediction"], body["probabilities"]))
        assert record_plan(registry.get("direct")).numeric.direct is not None
        assert record_plan(registry.get("plain")).numeric.direct is None
        assert answers["direct"] == answers["plain"]
        assert len({a for a, _ in answers["direct"]}) == 3
    finally:
        svc = app.extensions["predq"]
        svc.redis.close()
        svc.celery.close()
