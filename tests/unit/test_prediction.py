"""The prediction core: validation codes, vectorised prediction and isolation of failing rows."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from shared.prediction import predict, validate
from shared.registry import Feature, ModelVersion, load_version
from tests.support import models as test_models


@pytest.fixture(scope="module")
def fussy(tmp_path_factory) -> ModelVersion:
    root = tmp_path_factory.mktemp("models")
    test_models.install(root, "fussy", test_models.fussy_classifier())
    return load_version("fussy", "v1", root / "fussy" / "v1")


@pytest.fixture(scope="module")
def lenient(tmp_path_factory) -> ModelVersion:
    from sklearn.ensemble import HistGradientBoostingClassifier

    X = test_models.training_frame()
    est = HistGradientBoostingClassifier(max_iter=20).fit(X, (X["f0"] > 0).astype(int))
    root = tmp_path_factory.mktemp("models")
    test_models.install(root, "lenient", est)
    return load_version("lenient", "v1", root / "lenient" / "v1")


def _rows(n: int, seed: int = 3) -> dict[str, list]:
    X = test_models.training_frame(n, seed)
    return {c: X[c].tolist() for c in X.columns}


def test_loaded_model_metadata(fussy, lenient):
    """Features come from feature_names_in_ and missing-value support from a probe prediction."""
    assert [f.name for f in fussy.features] == test_models.FEATURES
    assert fussy.classes == ["no", "yes"] and fussy.task == "classification"
    assert fussy.allows_missing is False
    assert lenient.allows_missing is True


def test_json_values_get_exact_codes(fussy):
    """None is missing_feature, strings and booleans invalid_type, infinity invalid_value."""
    cols = _rows(6)
    cols["f0"][1] = None
    cols["f1"][2] = "abc"
    cols["f2"][3] = True
    cols["f3"][4] = math.inf
    v = validate(fussy, cols, 6)
    assert v.valid.tolist() == [True, False, False, False, False, True]
    positions, codes, messages = v.row_errors()
    assert positions.tolist() == [1, 2, 3, 4]
    assert codes == ["missing_feature", "invalid_type", "invalid_type", "invalid_value"]
    assert "'f1'" in messages[1] and "'abc'" in messages[1]


def test_all_problems_of_a_row_are_named(fussy):
    """field_errors lists every offending feature, for the single-row 422."""
    cols = {c: [1.0] for c in test_models.FEATURES}
    cols["f0"] = [None]
    cols["f4"] = ["x"]
    v = validate(fussy, cols, 1)
    assert [(f["name"], f["code"]) for f in v.field_errors(0)] == [("f0", "missing_feature"), ("f4", "invalid_type")]


def test_text_columns_are_parsed_by_dtype(fussy):
    """CSV text: numbers parse, blanks are missing, words are invalid_type, nan and inf invalid_value."""
    cols = {c: pa.array(["1.5", "2", "", "abc", "nan", " 3 "], type=pa.string()) for c in test_models.FEATURES}
    cols["f0"] = pa.array(["1.5", "2", None, "abc", "nan", " 3 "], type=pa.string())
    v = validate(fussy, cols, 6)
    codes = v.codes["f0"].tolist()
    assert codes == [0, 0, 1, 2, 3, 0]
    assert v.X.shape == (3, 5)


def test_missing_values_pass_when_the_model_accepts_them(lenient):
    """A null or NaN feature goes to the model as NaN when allows_missing."""
    cols = _rows(3)
    cols["f2"][0] = None
    cols["f3"][1] = math.nan
    v = validate(lenient, cols, 3)
    assert v.valid.all()
    scored = predict(lenient, v)
    assert scored.positions.tolist() == [0, 1, 2]


def test_arrow_types_are_checked(fussy):
    """A boolean or list column is invalid_type for a float feature; an all-null column is missing."""
    cols = {c: pa.array([1.0, 2.0]) for c in test_models.FEATURES}
    cols["f1"] = pa.array([True, False])
    cols["f2"] = pa.array([None, None], type=pa.null())
    v = validate(fussy, cols, 2)
    assert v.codes["f1"].tolist() == [2, 2] and v.codes["f2"].tolist() == [1, 1]


def test_integer_and_category_features():
    """int64 refuses fractions; a category outside the listed ones is invalid_value."""
    from sklearn.dummy import DummyClassifier

    mv = ModelVersion(name="m", version="1", path=None, sha256="", estimator=DummyClassifier().fit([[0]], [0]),
                      features=(Feature("n", "int64"), Feature("c", "category", ("a", "b"))), allows_missing=False,
                      task="classification", classes=[0])
    v = validate(mv, {"n": [1, 1.5, 2, 3], "c": ["a", "b", "z", 1]}, 4)
    assert v.codes["n"].tolist() == [0, 2, 0, 0]
    assert v.codes["c"].tolist() == [0, 0, 3, 2]


def test_prediction_equals_predict_over_valid_rows(fussy):
    """The valid rows get exactly model.predict's answer, probabilities included."""
    cols = _rows(500)
    cols["f0"][10] = None
    v = validate(fussy, cols, 500)
    scored = predict(fussy, v, probabilities=True)
    X = test_models.training_frame(500, 3).drop(index=10)
    assert scored.positions.tolist() == X.index.tolist()
    assert scored.predictions.tolist() == fussy.estimator.predict(X).tolist()
    np.testing.assert_allclose(scored.probabilities, fussy.estimator.predict_proba(X), rtol=1e-12)
    assert scored.error_positions.tolist() == [10] and scored.predict_calls == 1


def test_bisection_isolates_failing_rows(fussy):
    """Only the rows the model raises on become prediction_failed; the rest of the batch succeeds."""
    cols = _rows(1000)
    bad = [0, 417, 418, 999]
    for i in bad:
        cols["f3"][i] = test_models.SENTINEL
    scored = predict(fussy, validate(fussy, cols, 1000))
    assert scored.error_positions.tolist() == bad
    assert set(scored.error_codes) == {"prediction_failed"}
    assert "sentinel" in scored.error_messages[0]
    assert len(scored.positions) == 996
    good = test_models.training_frame(1000, 3).drop(index=bad)
    assert scored.predictions.tolist() == fussy.estimator.predict(good).tolist()
    assert scored.predict_calls <= 2 * len(bad) * math.ceil(math.log2(1000)) + 1


def test_bisection_stops_at_the_call_cap(fussy):
    """Past the cap, unresolved rows fail with a message saying so instead of looping on."""
    cols = _rows(256)
    for i in range(0, 256, 2):
        cols["f3"][i] = test_models.SENTINEL
    scored = predict(fussy, validate(fussy, cols, 256), max_calls=20)
    assert scored.predict_calls == 20
    assert len(scored.positions) + len(scored.error_positions) == 256
    assert any("isolation stopped after 20" in m for m in scored.error_messages)
    assert set(range(0, 256, 2)) <= set(scored.error_positions.tolist())


def test_a_step_that_changes_its_input_in_place_does_not_change_the_probabilities(tmp_path):
    """StandardScaler(copy=False) scales the array it is given: predict_proba must still see the rows as sent."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from shared.prediction import record_plan

    X = test_models.training_frame(2000, 5) * 10 + 3  # far from mean 0, scale 1: scaling twice shows
    est = make_pipeline(StandardScaler(copy=False), LogisticRegression()).fit(X.copy(), (X["f0"] > 3).astype(int))
    test_models.install(tmp_path, "inplace", est)
    mv = load_version("inplace", "v1", tmp_path / "inplace" / "v1")
    rows = test_models.training_frame(300, 6) * 10 + 3
    expected = est.predict_proba(rows.copy())

    scored = predict(mv, validate(mv, {c: rows[c].tolist() for c in rows.columns}, 300), probabilities=True)
    np.testing.assert_allclose(scored.probabilities, expected, rtol=1e-12)
    assert scored.predictions.tolist() == est.predict(rows.copy()).tolist()

    plan = record_plan(mv)  # the single-prediction path (array or DataFrame, whichever the probe proved)
    answers = plan.score(mv, [plan.numeric.row(r) if plan.numeric else plan.values(mv, r)
                              for r in rows.to_dict(orient="records")], probabilities=True)
    got = np.array([[p[k] for k in plan.labels] for _, p in answers])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
