"""Existing clients against a real gunicorn: Triton's HTTP client (OIP v2) and MLflow scoring client requests.

The predictions must be exactly those of the model file loaded in this process, on the same rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pytest
import requests
from sklearn.datasets import load_breast_cancer, load_diabetes

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def cancer():
    """20 rows of the breast cancer data (30 features whose names hold spaces), and the deployed model file."""
    return load_breast_cancer(as_frame=True).data.iloc[::25].reset_index(drop=True)


def deployed(models_dir: str, name: str):
    return joblib.load(Path(models_dir) / name / "v1" / "model.joblib")


@pytest.fixture
def triton(api_server):
    client = httpclient.InferenceServerClient(url=api_server.url.removeprefix("http://"), network_timeout=60.0)
    try:
        yield client
    finally:
        client.close()


def feature_inputs(frame, binary_data: bool = False) -> list:
    inputs = []
    for name in frame.columns:
        tensor = httpclient.InferInput(name, [len(frame)], "FP64")
        tensor.set_data_from_numpy(frame[name].to_numpy(dtype=np.float64), binary_data=binary_data)
        inputs.append(tensor)
    return inputs


def test_triton_client_health_metadata_and_infer(triton, models_dir, cancer):
    """tritonclient: live, ready, metadata, then infer with probabilities equal to model.predict(_proba)."""
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("breast_cancer")
    assert not triton.is_model_ready("no_such_model")
    assert triton.is_model_ready("breast_cancer", model_version="v1")
    assert triton.get_server_metadata()["name"] == "predq"
    meta = triton.get_model_metadata("breast_cancer")
    assert [i["name"] for i in meta["inputs"]] == list(cancer.columns)
    assert {o["name"] for o in meta["outputs"]} == {"predict", "predict_proba"}
    outputs = [httpclient.InferRequestedOutput("predict", binary_data=False),
               httpclient.InferRequestedOutput("predict_proba", binary_data=False)]
    result = triton.infer("breast_cancer", feature_inputs(cancer), outputs=outputs, request_id="batch-7")
    model = deployed(models_dir, "breast_cancer")
    assert result.get_response()["id"] == "batch-7" and result.get_response()["model_version"] == "v1"
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("predict").tolist()]
    assert labels == model.predict(cancer).tolist()
    np.testing.assert_allclose(result.as_numpy("predict_proba"), model.predict_proba(cancer), rtol=1e-12)


def test_triton_client_defaults_binary_inputs_on_a_regressor(triton, models_dir):
    """The client's defaults: binary input data and no requested outputs (binary asked for; JSON answered)."""
    frame = load_diabetes(as_frame=True).data.iloc[:7]
    result = triton.infer("diabetes", feature_inputs(frame, binary_data=True), model_version="v1")
    np.testing.assert_allclose(result.as_numpy("predict"), deployed(models_dir, "diabetes").predict(frame), rtol=1e-12)


def test_triton_client_sees_errors(triton, cancer):
    """A bad request reaches the client as an InferenceServerException with the server's message."""
    with pytest.raises(InferenceServerException, match="lacks 1 of the model's features: worst fractal dimension"):
        triton.infer("breast_cancer", feature_inputs(cancer.iloc[:, :-1]))
    with pytest.raises(InferenceServerException, match="Model 'breast_cancer' has no output 'logits'"):
        triton.infer("breast_cancer", feature_inputs(cancer), outputs=[httpclient.InferRequestedOutput("logits")])
    with pytest.raises(InferenceServerException, match="No model named 'no_such_model'"):
        triton.infer("no_such_model", feature_inputs(cancer))


def invoke(url: str, data, params: dict | None = None) -> requests.Response:
    """POST as mlflow's ScoringServerClient.invoke does: dump_input_data's JSON, Content-Type application/json."""
    post_data = {"dataframe_split": data.to_dict(orient="split")}
    if params is not None:
        post_data["params"] = params
    return requests.post(f"{url}/invocations?model=breast_cancer", data=json.dumps(post_data),
                         headers={"Content-Type": "application/json"}, timeout=60)


def test_mlflow_scoring_client_requests(api_server, models_dir, cancer):
    """ping and version as the scoring client calls them; a DataFrame and a CSV answer as model.predict."""
    assert requests.get(f"{api_server.url}/ping", timeout=30).status_code == 200
    assert requests.get(f"{api_server.url}/version", timeout=30).text
    expected = deployed(models_dir, "breast_cancer").predict(cancer).tolist()
    response = invoke(api_server.url, cancer, params={"threshold": 0.5})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": expected}
    csv = requests.post(f"{api_server.url}/invocations?model=breast_cancer", data=cancer.to_csv(index=False),
                        headers={"Content-Type": "text/csv"}, timeout=60)
    assert csv.json() == {"predictions": expected}
    one = invoke(api_server.url, cancer.iloc[:1])
    assert one.json() == {"predictions": expected[:1]}


def test_mlflow_errors_over_http(api_server, cancer):
    bad = cancer.iloc[:3].copy()
    bad = bad.astype(object)
    bad.iloc[2, 4] = "n/a"
    response = invoke(api_server.url, bad)
    assert response.status_code == 400
    assert response.json() == {"error_code": "BAD_REQUEST", "message": "Row 2 is invalid: feature 'mean smoothness' "
                                                                       "has a value of the wrong type: 'n/a'."}
