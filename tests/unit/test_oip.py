"""The Open Inference Protocol v2 (REST) on the app in-process: the request shapes of KServe's and Triton's docs."""
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

DEAD_REDIS = "redis://127.0.0.1:1/0"
IRIS_ROWS = [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6], [5.1, 3.5, 1.4, 0.2]]


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


def model(models_dir: str, name: str):
    return joblib.load(f"{models_dir}/{name}/v1/model.joblib")


def infer(client, body, name: str = "iris", content_type: str | None = None, headers: dict | None = None):
    """POST the body as Triton's HTTP client does: JSON text, no content type unless asked."""
    all_headers = dict(headers or {})
    if content_type:
        all_headers["Content-Type"] = content_type
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(f"/v2/models/{name}/infer", data=data, headers=all_headers)


def feature_tensors(rows: list[list], names: list[str], datatype: str = "FP64", column: bool = False) -> list[dict]:
    """One tensor per feature: shape [rows] (or [rows, 1] when column)."""
    shape = [len(rows), 1] if column else [len(rows)]
    out = []
    for j, name in enumerate(names):
        data = [[r[j]] for r in rows] if column else [r[j] for r in rows]
        out.append({"name": name, "shape": shape, "datatype": datatype, "data": data})
    return out


def assert_oip_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.data
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# -- health and metadata ----------------------------------------------------------------------------

def test_server_health_and_metadata(client):
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    meta = client.get("/v2").get_json()
    assert meta["name"] == "predq" and meta["extensions"] == [] and meta["version"]


def test_model_metadata_describes_one_input_per_feature(client):
    """Inputs are the features with their datatypes; a classifier has predict and predict_proba [-1, classes]."""
    meta = client.get("/v2/models/iris").get_json()
    assert meta == {
        "name": "iris", "versions": ["v1"], "platform": "scikit-learn",
        "inputs": [{"name": f, "datatype": "FP64", "shape": [-1]} for f in IRIS_FEATURES],
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]},
                    {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}]}
    mixed = client.get("/v2/models/mixed/versions/v1").get_json()
    assert [(i["name"], i["datatype"]) for i in mixed["inputs"]] == [("n", "INT64"), ("flag", "BOOL"),
                                                                     ("color", "BYTES")]
    assert mixed["outputs"][0] == {"name": "predict", "datatype": "BYTES", "shape": [-1]}
    regressor = client.get("/v2/models/fussy_reg").get_json()
    assert regressor["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1]}]


def test_model_readiness(client):
    assert client.get("/v2/models/iris/ready").get_json() == {"name": "iris", "ready": True}
    assert client.get("/v2/models/iris/versions/v1/ready").status_code == 200
    assert_oip_error(client.get("/v2/models/nope/ready"), 404, "'nope'")
    assert_oip_error(client.get("/v2/models/iris/versions/v9/ready"), 404, "v9")
    assert_oip_error(client.get("/v2/models/nope"), 404, "'nope'")


# -- inference --------------------------------------------------------------------------------------

def test_kserve_sklearn_example_one_rows_by_features_tensor(client, models_dir):
    """KServe's scikit-learn v2 example: one FP32 tensor [2, 4] named input-0, nested rows, features in order."""
    body = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
                        "data": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}]}
    response = infer(client, body)
    assert response.status_code == 200 and response.mimetype == "application/json"
    expected = model(models_dir, "iris").predict(pd.DataFrame(IRIS_ROWS[:2], columns=IRIS_FEATURES)).tolist()
    assert response.get_json() == {"model_name": "iris", "model_version": "v1", "outputs": [
        {"name": "predict", "datatype": "INT64", "shape": [2], "data": expected}]}


@pytest.mark.parametrize("column", [False, True], ids=["shape-rows", "shape-rows-1"])
def test_one_tensor_per_feature_with_probabilities(client, models_dir, column):
    """Named feature tensors; predict and predict_proba ([rows, classes], row-major) as model.predict(_proba)."""
    body = {"id": "req-42", "inputs": feature_tensors(IRIS_ROWS, IRIS_FEATURES, column=column),
            "outputs": [{"name": "predict"}, {"name": "predict_proba", "parameters": {"binary_data": False}}]}
    response = infer(client, body)
    answer = response.get_json()
    frame = pd.DataFrame(IRIS_ROWS, columns=IRIS_FEATURES)
    assert answer["id"] == "req-42" and answer["model_name"] == "iris" and answer["model_version"] == "v1"
    predict, proba = answer["outputs"]
    assert predict == {"name": "predict", "datatype": "INT64", "shape": [3],
                       "data": model(models_dir, "iris").predict(frame).tolist()}
    assert proba["name"] == "predict_proba" and proba["datatype"] == "FP64" and proba["shape"] == [3, 3]
    np.testing.assert_allclose(np.reshape(proba["data"], (3, 3)), model(models_dir, "iris").predict_proba(frame),
                               rtol=1e-12)


def test_only_probabilities_and_a_json_content_type(client, models_dir):
    body = {"inputs": feature_tensors(IRIS_ROWS[:1], IRIS_FEATURES),
            "outputs": [{"name": "predict_proba"}]}
    response = infer(client, body, content_type="application/json")
    (proba,) = response.get_json()["outputs"]
    expected = model(models_dir, "iris").predict_proba(pd.DataFrame(IRIS_ROWS[:1], columns=IRIS_FEATURES))
    assert proba["shape"] == [1, 3]
    np.testing.assert_allclose(proba["data"], expected[0], rtol=1e-12)


def test_int_bool_and_bytes_tensors(client, models_dir):
    """INT64, BOOL and BYTES tensors feed int64, bool and category features; string labels come back as BYTES."""
    body = {"inputs": [{"name": "n", "shape": [3], "datatype": "INT64", "data": [1, 5, 6]},
                       {"name": "flag", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
                       {"name": "color", "shape": [3], "datatype": "BYTES", "data": ["red", "blue", "red"]}]}
    answer = infer(client, body, name="mixed").get_json()
    frame = pd.DataFrame({"n": [1, 5, 6], "flag": [True, False, True],
                          "color": pd.Categorical(["red", "blue", "red"], categories=["blue", "red"])})
    assert answer["outputs"] == [{"name": "predict", "datatype": "BYTES", "shape": [3],
                                  "data": model(models_dir, "mixed").predict(frame).tolist()}]


def test_versioned_route_and_regressor(client, models_dir):
    rows = np.arange(10.0).reshape(2, 5).tolist()
    response = client.post("/v2/models/fussy_reg/versions/v1/infer",
                           data=json.dumps({"inputs": feature_tensors(rows, FEATURES)}))
    (predict,) = response.get_json()["outputs"]
    expected = model(models_dir, "fussy_reg").predict(pd.DataFrame(rows, columns=FEATURES))
    assert predict["datatype"] == "FP64" and predict["shape"] == [2]
    np.testing.assert_allclose(predict["data"], expected, rtol=1e-12)


def test_unknown_inputs_are_ignored(client, models_dir):
    tensors = feature_tensors(IRIS_ROWS, IRIS_FEATURES) + [{"name": "request_id", "shape": [3], "datatype": "BYTES",
                                                            "data": ["a", "b", "c"]}]
    answer = infer(client, {"inputs": tensors}).get_json()
    expected = model(models_dir, "iris").predict(pd.DataFrame(IRIS_ROWS, columns=IRIS_FEATURES)).tolist()
    assert answer["outputs"][0]["data"] == expected


def binary_request(tensors: list[tuple[str, str, list[int], bytes]], extra: bytes = b"") -> tuple[bytes, dict]:
    """A body in Triton's binary tensor data extension: the JSON header, then each input's bytes in order."""
    header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                    for n, d, s, b in tensors]}).encode()
    body = header + b"".join(b for *_, b in tensors) + extra
    return body, {"Inference-Header-Content-Length": str(len(header))}


def bytes_tensor(values: list[str]) -> bytes:
    return b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values)


def test_binary_tensor_data_as_tritons_client_sends_by_default(client, models_dir):
    """Inputs in the binary extension (FP32, INT32, BOOL, BYTES) predict as the same values in JSON."""
    rows = np.array(IRIS_ROWS, dtype=np.float32)
    body, headers = binary_request([(f, "FP32", [3], rows[:, j].tobytes()) for j, f in enumerate(IRIS_FEATURES)])
    answer = infer(client, body, headers=headers).get_json()
    expected = model(models_dir, "iris").predict(pd.DataFrame(rows.astype(np.float64), columns=IRIS_FEATURES))
    assert answer["outputs"][0]["data"] == expected.tolist()
    body, headers = binary_request([("n", "INT32", [2], np.array([1, 6], dtype="<i4").tobytes()),
                                    ("flag", "BOOL", [2], np.array([True, False]).tobytes()),
                                    ("color", "BYTES", [2], bytes_tensor(["red", "blue"]))])
    answer = infer(client, body, name="mixed", headers=headers).get_json()
    frame = pd.DataFrame({"n": [1, 6], "flag": [True, False],
                          "color": pd.Categorical(["red", "blue"], categories=["blue", "red"])})
    assert answer["outputs"][0]["data"] == model(models_dir, "mixed").predict(frame).tolist()


@pytest.mark.parametrize(("tensors", "extra", "fragment"), [
    ([("n", "INT32", [2], b"\x01\x00\x00\x00")], b"", "has 4 bytes of binary data; 2 INT32 values take 8"),
    ([("color", "BYTES", [2], bytes_tensor(["red"]))], b"", "has 1 BYTES elements; its shape needs 2"),
    ([("color", "BYTES", [1], b"\x09\x00\x00\x00red")], b"", "runs past the input's data"),
    ([("color", "BYTES", [1], b"\x02\x00\x00\x00\xff\xfe")], b"", "not UTF-8"),
    ([("n", "INT64", [1], np.array([1], dtype="<i8").tobytes())], b"xyz", "3 bytes of binary data belong to no input"),
])
def test_bad_binary_tensor_data_is_400(client, tensors, extra, fragment):
    body, headers = binary_request(tensors, extra)
    assert_oip_error(infer(client, body, name="mixed", headers=headers), 400, fragment)


# -- errors -----------------------------------------------------------------------------------------

def test_the_protocol_specs_own_example_is_refused_for_its_shape(client):
    """The OIP spec's example request (input1 of shape [3] with one value) gets a 400 naming the mismatch."""
    body = {"id": "42", "inputs": [{"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
                                   {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]}],
            "outputs": [{"name": "predict"}]}
    assert_oip_error(infer(client, body), 400, "'input1' has 1 values; its shape [3] needs 3")


def with_tensor(name: str, **changes) -> dict:
    tensors = feature_tensors(IRIS_ROWS[:2], IRIS_FEATURES)
    for t in tensors:
        if t["name"] == name:
            t.update(changes)
    return {"inputs": tensors}


@pytest.mark.parametrize(("body", "fragment"), [
    ({"inputs": feature_tensors(IRIS_ROWS, IRIS_FEATURES[:3])}, "lacks 1 of the model's features: petal width (cm)"),
    (with_tensor("petal width (cm)", data=[1.0, "x"]), "declared FP64 but holds 'x'"),
    (with_tensor("petal width (cm)", datatype="BYTES", data=["1.0", "2.0"]),
     "Row 0 is invalid: feature 'petal width (cm)' has a value of the wrong type: '1.0'"),
    (with_tensor("petal width (cm)", data=[1.0, None]), "Row 1 is invalid: feature 'petal width (cm)' is missing"),
    (with_tensor("petal width (cm)", shape=[3], data=[1.0, 2.0, 3.0]), "has 3 rows; the inputs before it have 2"),
    (with_tensor("petal width (cm)", datatype="FP128"), "datatype 'FP128'"),
    (with_tensor("petal width (cm)", shape=[2, 2], data=[1, 2, 3, 4]), "shape [rows] or [rows, 1]"),
    (with_tensor("petal width (cm)", parameters={"binary_data_size": 16}), "claims 16 bytes of binary data"),
    ({"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
     "second dimension must be 4"),
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}]}, "No input is a feature"),
    ({**with_tensor("x"), "outputs": [{"name": "logits"}]}, "no output 'logits'; it has predict, predict_proba"),
    ({**with_tensor("x"), "id": 7}, "\"id\" must be a string"),
    ([1, 2], "must be a JSON object"),
    ({"inputs": feature_tensors([[1.0] * 4] * 51, IRIS_FEATURES)}, "SYNC_MAX_ROWS"),
])
def test_bad_requests_are_400_naming_the_fault(client, body, fragment):
    response = infer(client, body)
    assert_oip_error(response, 413 if "SYNC_MAX_ROWS" in fragment else 400, fragment)


def test_other_errors(client):
    assert_oip_error(infer(client, "{nope"), 400, "not valid JSON")
    assert_oip_error(infer(client, with_tensor("x"), name="nope"), 404, "'nope'")
    body = {"inputs": feature_tensors(IRIS_ROWS, IRIS_FEATURES)}
    assert_oip_error(infer(client, body, headers={"Inference-Header-Content-Length": "x"}), 400,
                     "Inference-Header-Content-Length 'x' is not a length")
    regressor = {"inputs": feature_tensors([[0.0] * 5], FEATURES), "outputs": [{"name": "predict_proba"}]}
    assert_oip_error(infer(client, regressor, name="fussy_reg"), 400, "no output 'predict_proba'")
    poisoned = {"inputs": feature_tensors([[0.1] * 5, [SENTINEL] * 5], FEATURES)}
    assert_oip_error(infer(client, poisoned, name="fussy"), 400, "could not predict row 1")
    assert_oip_error(client.get("/v2/models/iris/infer"), 405, "POST")
    assert_oip_error(client.get("/v2/nothing"), 404, "/v2/nothing")


def test_model_routes_need_the_predict_scope_and_health_routes_are_open(models_dir, tmp_path):
    key, entry = new_key("app", ["predict"])
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [entry]}))
    client = create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": models_dir, "API_KEYS_FILE": str(keys),
                         "RATE_LIMIT_PER_MINUTE": 0}).test_client()
    for route in ("/v2", "/v2/models/iris", "/v2/models/iris/ready"):
        assert_oip_error(client.get(route), 401, "API key")
        assert client.get(route, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert_oip_error(infer(client, with_tensor("x")), 401, "API key")
    assert infer(client, with_tensor("x"), headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for route in ("/v2/health/live", "/v2/health/ready"):
        assert client.get(route).status_code == 200
