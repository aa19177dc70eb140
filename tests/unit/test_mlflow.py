"""MLflow's scoring protocol on the app in-process: every request shape of MLflow's docs, and its error bodies."""
from __future__ import annotations

import json

import joblib
import numpy as np
import pandas as pd
import pytest

from api import create_app
from shared.auth import new_key
from tests.support.compat import IRIS_FEATURES, install_compat_models
from tests.support.models import FEATURES, SENTINEL, install_test_models

DEAD_REDIS = "redis://127.0.0.1:1/0"  # scoring never touches Redis
ROWS = pd.DataFrame({"a": [1.0, 4.0, -3.0], "b": [2.0, 5.0, 0.5], "c": [3.0, 6.0, 9.0]})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models")
    install_compat_models(path)
    install_test_models(path)
    return str(path)


@pytest.fixture(scope="module")
def client(models_dir):
    app = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": models_dir, "RATE_LIMIT_PER_MINUTE": 0,
                      "SYNC_MAX_ROWS": 50})
    return app.test_client()


def expected(models_dir: str, name: str, frame: pd.DataFrame) -> list:
    model = joblib.load(f"{models_dir}/{name}/v1/model.joblib")
    return model.predict(frame).tolist()


def invoke(client, body, model: str | None = "abc", content_type: str = "application/json"):
    url = "/invocations" + (f"?model={model}" if model else "")
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(url, data=data, headers={"Content-Type": content_type})


def assert_mlflow_error(response, status: int, error_code: str, *fragments: str) -> None:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error_code", "message"} and body["error_code"] == error_code, body
    for fragment in fragments:
        assert fragment in body["message"], body["message"]


# -- every request shape ----------------------------------------------------------------------------

def test_dataframe_split_as_in_mlflows_docs(client, models_dir):
    """The docs' split-oriented DataFrame answers {"predictions": [...]} equal to model.predict."""
    response = invoke(client, {"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2, 3], [4, 5, 6]]}})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json() == {"predictions": expected(models_dir, "abc", ROWS.iloc[:2])}


def test_dataframe_split_with_index_as_the_scoring_client_sends_it(client, models_dir):
    """ScoringServerClient sends df.to_dict(orient="split"), index included; columns in any order."""
    frame = ROWS[["c", "a", "b"]]
    response = invoke(client, {"dataframe_split": frame.to_dict(orient="split"), "params": {"x": 1}})
    assert response.get_json() == {"predictions": expected(models_dir, "abc", ROWS)}


def test_dataframe_records_as_in_mlflows_docs(client, models_dir):
    response = invoke(client, {"dataframe_records": [{"a": 1, "b": 2, "c": 3}, {"a": 4, "b": 5, "c": 6}]})
    assert response.get_json() == {"predictions": expected(models_dir, "abc", ROWS.iloc[:2])}


@pytest.mark.parametrize("body", [
    {"instances": ROWS.to_dict(orient="records")},
    {"instances": ROWS.to_numpy().tolist()},
    {"inputs": ROWS.to_dict(orient="list")},
    {"inputs": ROWS.to_dict(orient="records")},
    {"inputs": ROWS.to_numpy().tolist()},
    {"dataframe_split": {"data": ROWS.to_numpy().tolist()}},
], ids=["instances-records", "instances-lists", "inputs-columns", "inputs-records", "inputs-lists", "split-no-columns"])
def test_tensor_formats_give_the_same_predictions(client, models_dir, body):
    """instances and inputs, as records, lists in feature order or a dict of columns, predict the same rows."""
    response = invoke(client, body)
    assert response.status_code == 200, response.data
    assert response.get_json() == {"predictions": expected(models_dir, "abc", ROWS)}


def test_one_row_of_scalars_and_string_labels(client, models_dir):
    """inputs as {feature: value} is one row; a classifier's string labels come back as strings."""
    row = {f: 0.5 for f in FEATURES}
    response = invoke(client, {"inputs": row}, model="fussy")
    assert response.get_json() == {"predictions": expected(models_dir, "fussy", pd.DataFrame([row]))}
    assert isinstance(response.get_json()["predictions"][0], str)


@pytest.mark.parametrize("content_type", ["text/csv", "text/csv; charset=utf-8"])
def test_csv_body(client, models_dir, content_type):
    """A CSV body with a header row (pandas' to_csv) predicts each line."""
    response = invoke(client, ROWS.to_csv(index=False), content_type=content_type)
    assert response.get_json() == {"predictions": expected(models_dir, "abc", ROWS)}


def test_regressor_predictions_are_numbers(client, models_dir):
    frame = pd.DataFrame(np.arange(10.0).reshape(2, 5), columns=FEATURES)
    response = invoke(client, {"dataframe_split": frame.to_dict(orient="split")}, model="fussy_reg")
    assert response.get_json()["predictions"] == pytest.approx(expected(models_dir, "fussy_reg", frame), rel=1e-12)


def test_default_model_and_single_model(models_dir, tmp_path):
    """Without ?model=, DEFAULT_MODEL is used; with one model deployed, that one; with several and none set, 400."""
    app = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": models_dir, "DEFAULT_MODEL": "abc"})
    body = {"dataframe_split": ROWS.to_dict(orient="split")}
    assert invoke(app.test_client(), body, model=None).get_json() == {"predictions": expected(models_dir, "abc", ROWS)}
    single = tmp_path / "single"
    install_compat_models(single)
    for name in ("iris", "mixed"):
        for f in (single / name / "v1").iterdir():
            f.unlink()
    app = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": str(single)})
    assert invoke(app.test_client(), body, model=None).status_code == 200
    assert_mlflow_error(invoke(app.test_client(), body, model="iris"), 404, "RESOURCE_DOES_NOT_EXIST", "iris")


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "fragment"), [
    ({"data": [[1, 2, 3]]}, "exactly one of the input fields"),
    ({"dataframe_split": {}, "inputs": []}, "Received dictionary with input fields"),
    ([{"a": 1}], "Received a list"),
    ({"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2]]}}, "row 0 has 2 values"),
    ({"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2, 3]], "index": [0, 1]}}, "index"),
    ({"dataframe_records": [1, 2]}, "row 0 is int"),
    ({"inputs": {"a": [1, 2], "b": [1], "c": [1, 2]}}, "length of values"),
    ({"instances": [[1, 2]]}, "the model takes 3 features"),
    ({"dataframe_records": []}, "no rows"),
    ({"dataframe_records": [{"a": 1, "b": 2}]}, "lacks 1 of the model's features: c"),
    ({"dataframe_records": [{}]}, "lacks 3 of the model's features: a, b, c"),
    ({"dataframe_records": [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": "x", "c": 3}]}, "Row 1 is invalid: feature 'b'"),
    ({"dataframe_records": [{"a": 1, "b": 2, "c": None}] * 2},
     "Row 0 is invalid: feature 'c' is missing (1 more row is invalid)."),
])
def test_a_body_mlflow_refuses_is_400_bad_request(client, body, fragment):
    """Wrong shape, ragged rows, missing columns, wrong types: 400 BAD_REQUEST with a message naming the fault."""
    assert_mlflow_error(invoke(client, body), 400, "BAD_REQUEST", fragment)


def test_malformed_json_and_bad_params(client):
    assert_mlflow_error(invoke(client, "{not json"), 400, "BAD_REQUEST", "valid JSON")
    body = {"dataframe_records": [{"a": 1, "b": 2, "c": 3}], "params": [1]}
    assert_mlflow_error(invoke(client, body), 400, "INVALID_PARAMETER_VALUE", "params must be a dictionary")


def test_a_row_the_model_cannot_predict_refuses_the_request(client):
    """The model raising on one row is a 400 naming that row, never a 500."""
    rows = [{f: 0.1 for f in FEATURES}, {f: SENTINEL for f in FEATURES}, {f: 0.2 for f in FEATURES}]
    assert_mlflow_error(invoke(client, {"dataframe_records": rows}, model="fussy"), 400, "BAD_REQUEST",
                        "could not predict row 1")
    assert_mlflow_error(invoke(client, {"dataframe_records": rows[1:2]}, model="fussy"), 400, "BAD_REQUEST",
                        "could not predict")


@pytest.mark.parametrize(("content_type", "fragment"), [
    ("text/plain", "only supports the following content types"),
    ("application/json; format=pandas-split", "Unrecognized content type parameters: format"),
    ("application/json; charset=latin-1", "only supports UTF-8"),
])
def test_other_content_types_are_415(client, content_type, fragment):
    body = json.dumps({"dataframe_records": [{"a": 1, "b": 2, "c": 3}]})
    assert_mlflow_error(invoke(client, body, content_type=content_type), 415, "BAD_REQUEST", fragment)


def test_csv_errors(client):
    assert_mlflow_error(invoke(client, "a,b\n1,2\n", content_type="text/csv"), 400, "BAD_REQUEST", "features: c")
    assert_mlflow_error(invoke(client, "a,b,c\n1,2,3\n1,2\n", content_type="text/csv"), 400, "BAD_REQUEST",
                        "row 1")
    assert_mlflow_error(invoke(client, "a,b,c\n1,2,abc\n", content_type="text/csv"), 400, "BAD_REQUEST",
                        "feature 'c'")
    assert_mlflow_error(invoke(client, "a,b,c\n", content_type="text/csv"), 400, "BAD_REQUEST", "no rows")
    assert_mlflow_error(invoke(client, "", content_type="text/csv"), 400, "BAD_REQUEST")
    assert_mlflow_error(invoke(client, b"a,b,c\n1,2,\xff\n", content_type="text/csv"), 400, "BAD_REQUEST")


def test_unknown_model_and_too_many_rows(client):
    assert_mlflow_error(invoke(client, {"inputs": [[1, 2, 3]]}, model="nope"), 404, "RESOURCE_DOES_NOT_EXIST",
                        "'nope'")
    assert_mlflow_error(invoke(client, {"inputs": [[1, 2, 3]]}, model=None), 400, "BAD_REQUEST", "?model=NAME")
    response = invoke(client, {"inputs": [[1, 2, 3]] * 51})
    assert_mlflow_error(response, 413, "BAD_REQUEST", "SYNC_MAX_ROWS", "/v1/jobs")
    assert_mlflow_error(client.get("/invocations?model=abc"), 405, "BAD_REQUEST", "POST")


# -- health and version -----------------------------------------------------------------------------

def test_ping_health_and_version(client, tmp_path):
    """/ping and /health answer 200 with a newline as MLflow's do; /version the server's version as text."""
    for route in ("/ping", "/health"):
        response = client.get(route)
        assert (response.status_code, response.data, response.mimetype) == (200, b"\n", "application/json")
    response = client.get("/version")
    assert response.status_code == 200 and response.mimetype == "text/plain" and response.text[0].isdigit()
    empty = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": str(tmp_path)}).test_client()
    assert_mlflow_error(empty.get("/ping"), 503, "TEMPORARILY_UNAVAILABLE", "No model")


def test_invocations_need_the_predict_scope_and_health_routes_are_open(models_dir, tmp_path):
    """With API keys, /invocations needs 'predict' (errors in MLflow's body); /ping, /health, /version need none."""
    key, entry = new_key("app", ["predict"])
    other, other_entry = new_key("batch", ["jobs"])
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [entry, other_entry]}))
    client = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": models_dir, "API_KEYS_FILE": str(keys),
                         "RATE_LIMIT_PER_MINUTE": 0}).test_client()
    body = json.dumps({"inputs": [[1, 2, 3]]})
    assert_mlflow_error(client.post("/invocations?model=abc", data=body, content_type="application/json"),
                        401, "UNAUTHENTICATED", "API key")
    assert_mlflow_error(client.post("/invocations?model=abc", data=body, content_type="application/json",
                                    headers={"Authorization": f"Bearer {other}"}), 403, "PERMISSION_DENIED", "predict")
    ok = client.post("/invocations?model=abc", data=body, content_type="application/json",
                     headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and len(ok.get_json()["predictions"]) == 1
    for route in ("/ping", "/health", "/version"):
        assert client.get(route).status_code == 200


def test_one_row_goes_through_the_micro_batcher(client):
    """A one-row request is predicted by the single-prediction batcher (merged with concurrent ones); more rows not."""
    batcher = client.application.extensions["predq.serving"].batcher
    before = batcher.size_histogram()[1]
    assert invoke(client, {"inputs": [[1.0, 2.0, 3.0]]}).status_code == 200
    assert batcher.size_histogram()[1] == before + 1
    assert invoke(client, {"inputs": [[1.0, 2.0, 3.0]] * 3}).status_code == 200
    assert batcher.size_histogram()[1] == before + 1


def test_iris_features_with_spaces(client, models_dir):
    """Feature names with spaces and parentheses work as column names."""
    frame = pd.DataFrame([[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]], columns=IRIS_FEATURES)
    response = invoke(client, {"dataframe_split": frame.to_dict(orient="split")}, model="iris")
    assert response.get_json() == {"predictions": expected(models_dir, "iris", frame)}
