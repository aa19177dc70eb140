"""The array path of single predictions: same answers as the DataFrame path, same validation, no warnings."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from shared.prediction import _KINDS, NumericRows, predict, record_plan, validate
from shared.registry import Feature, ModelVersion, load_version

N_ROWS = 10_000
FEATURES = [f"f{i}" for i in range(20)]


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.standard_normal((n, len(FEATURES))), columns=FEATURES)


def _deploy(root: Path, name: str, estimator, meta: dict | None = None) -> ModelVersion:
    target = root / name / "v1"
    target.mkdir(parents=True)
    joblib.dump(estimator, target / "model.joblib")
    if meta is not None:
        (target / "model.json").write_text(json.dumps(meta))
    return load_version(name, "v1", target)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def train() -> tuple[pd.DataFrame, pd.Series]:
    X = _frame(20_000, seed=0)
    return X, (X["f0"] + X["f1"] > 0).astype(int)


def _models(root: Path, train) -> dict[str, ModelVersion]:
    X, y = train
    target = X["f0"] * 3 - X["f2"] + 0.1 * X["f5"] ** 2
    return {
        "logreg": _deploy(root, "logreg",
                          Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression())]).fit(X, y)),
        "hgb": _deploy(root, "hgb", HistGradientBoostingClassifier(max_iter=50, random_state=0).fit(X, y)),
        "hgb_reg": _deploy(root, "hgb_reg", HistGradientBoostingRegressor(max_iter=50, random_state=0).fit(X, target)),
        "ridge": _deploy(root, "ridge", make_pipeline(StandardScaler(), Ridge()).fit(X, target)),
        "ridge_numpy": _deploy(root, "ridge_numpy", Ridge().fit(X.to_numpy(), target),
                               meta={"features": [{"name": f} for f in FEATURES]}),
    }


@pytest.fixture(scope="module")
def models(root, train) -> dict[str, ModelVersion]:
    return _models(root, train)


@pytest.mark.parametrize("name", ["logreg", "hgb", "hgb_reg", "ridge", "ridge_numpy"])
def test_array_path_equals_the_dataframe_path(models, name):
    """On 10,000 rows, predict and predict_proba through the array path equal the DataFrame path bit for bit."""
    mv = models[name]
    plan = record_plan(mv)
    assert plan.numeric is not None, "a numeric model takes the array path"
    X = _frame(N_ROWS, seed=7)
    records = X.to_dict(orient="records")
    rows = [plan.numeric.row(r) for r in records]
    assert all(r is not None for r in rows)
    probabilities = mv.task == "classification"

    expected = predict(mv, validate(mv, {c: X[c].tolist() for c in FEATURES}, N_ROWS), probabilities)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy input to a model fitted on a DataFrame must not warn
        preds, probas = plan.numeric.call(plan.numeric.stack(rows), probabilities)

    assert expected.positions.tolist() == list(range(N_ROWS))
    assert preds.dtype == expected.predictions.dtype
    assert np.array_equal(preds, expected.predictions)
    if probabilities:
        assert np.array_equal(probas, expected.probabilities)
    # and what the endpoint answers for a batch is what the DataFrame path gives for the same batch
    few = X.iloc[:50]
    expected = predict(mv, validate(mv, {c: few[c].tolist() for c in FEATURES}, 50), probabilities)
    answers = plan.score(mv, rows[:50], probabilities)
    assert [a for a, _ in answers] == expected.predictions.tolist()
    if probabilities:
        assert [list(p.values()) for _, p in answers] == expected.probabilities.tolist()


def test_estimator_fitted_on_a_dataframe_is_left_untouched(models):
    """The array path predicts with a twin: the loaded model still checks feature names."""
    mv = models["logreg"]
    plan = record_plan(mv)
    assert plan.numeric.estimator is not mv.estimator
    assert list(mv.estimator.feature_names_in_) == FEATURES
    assert mv.estimator[-1].coef_ is plan.numeric.estimator[-1].coef_  # fitted arrays are shared, not copied
    with pytest.warns(UserWarning, match="feature names"):
        mv.estimator.predict(np.zeros((1, len(FEATURES))))


def test_string_and_category_features_keep_the_dataframe_path(root):
    """A model with category features is scored from a DataFrame."""
    X = pd.DataFrame({"x": np.arange(200.0), "plan": np.where(np.arange(200) % 2, "a", "b")})
    est = make_pipeline(ColumnTransformer([("num", "passthrough", ["x"]), ("cat", OneHotEncoder(), ["plan"])]),
                        LogisticRegression()).fit(X, X["plan"] == "a")
    features = [{"name": "x", "dtype": "float64"}, {"name": "plan", "dtype": "category", "categories": ["a", "b"]}]
    mv = _deploy(root, "mixed", est, meta={"features": features})
    plan = record_plan(mv)
    assert plan.numeric is None
    assert [a for a, _ in plan.score(mv, [[1.0, "a"], [2.0, "b"]], False)] == [True, False]


def test_model_that_needs_column_names_keeps_the_dataframe_path(root, train):
    """A numeric model that selects columns by name cannot take an array: the probe sees it and keeps the DataFrame."""
    X, y = train
    est = make_pipeline(ColumnTransformer([("keep", "passthrough", ["f0", "f1"])]), LogisticRegression()).fit(X, y)
    mv = _deploy(root, "by_name", est)
    plan = record_plan(mv)
    assert plan.numeric is None
    rows = X.iloc[:5]
    assert [a for a, _ in plan.score(mv, rows.to_numpy().tolist(), False)] == est.predict(rows).tolist()


def test_features_listed_in_another_order_keep_the_dataframe_path(root, train):
    """A model.json that orders the features unlike feature_names_in_ never gets an array in the wrong order."""
    X, y = train
    est = LogisticRegression().fit(X, y)
    mv = _deploy(root, "reordered", est, meta={"features": [{"name": f} for f in reversed(FEATURES)]})
    assert record_plan(mv).numeric is None


VALUES = [0, 1, 2, -3, 0.0, 1.0, 0.5, -0.0, 2.5, 1e300, 10**30, 10**400, True, False, None, "1", "abc", "", [1], {}]


@pytest.mark.parametrize("dtype", ["float64", "int64", "bool"])
@pytest.mark.parametrize("allows_missing", [False, True])
def test_a_value_takes_the_array_path_only_when_validation_accepts_it_as_the_same_number(dtype, allows_missing):
    """row() accepts a value only if validate() accepts it with the same float; anything else goes to validate()."""
    mv = ModelVersion(name="m", version="v1", path=Path("m"), sha256="0" * 64, estimator=Ridge(),
                      features=(Feature("a", dtype),), allows_missing=allows_missing, task="regression", classes=None)
    rows = NumericRows(estimator=None, features=(("a", _KINDS[dtype]),), allows_missing=allows_missing, order="C")
    accepted = 0
    for value in VALUES:
        row = rows.row({"a": value})
        if row is None:
            continue
        accepted += 1
        try:
            validation = validate(mv, {"a": [value]}, 1)
        except OverflowError:
            pytest.fail(f"row() accepted {value!r}, which validate() cannot convert")
        assert validation.valid[0], (value, dtype)
        typed = validation.X[0, 0]
        assert (math.isnan(row[0]) and math.isnan(typed)) or row[0] == typed, (value, dtype)
    assert accepted >= 2  # the common values do take the array path
    assert rows.row({}) == ([math.nan] if allows_missing else None)
