"""Micro-batched single predictions through a real gunicorn: merged predict calls, one answer per request."""
from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import pandas as pd
import pytest
import requests
from sklearn.datasets import load_breast_cancer

from tests.support.models import FEATURES, PREDICT_SLEEP_ENV, SENTINEL, install_fault_models, training_frame
from tests.support.processes import ApiServer

CONCURRENCY = 16


@pytest.fixture(scope="module")
def batching_models(tmp_path_factory, models_dir) -> Path:
    """The session's models plus `slow_reg`, whose every predict call sleeps PREDQ_TEST_PREDICT_SLEEP seconds."""
    root = tmp_path_factory.mktemp("batching-models")
    for name in ("fussy_reg", "breast_cancer"):
        for version in (Path(models_dir) / name).iterdir():
            (root / name / version.name).mkdir(parents=True)
            (root / name / version.name / "model.joblib").write_bytes((version / "model.joblib").read_bytes())
    install_fault_models(root)
    return root


@pytest.fixture(scope="module")
def api(redis_server, batching_models, tmp_path_factory) -> Iterator[ApiServer]:
    """One gunicorn worker with 16 threads, so that /metrics always reports the process that served the load."""
    server = ApiServer(redis_server.url, models_dir=str(batching_models), workers=1, threads=CONCURRENCY,
                       env={PREDICT_SLEEP_ENV: "0.2"}, log_dir=str(tmp_path_factory.mktemp("api-batching")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def batch_histogram(api: ApiServer) -> tuple[int, int]:
    """(predict calls, rows in them) from predq_predict_batch_size on /metrics."""
    text = requests.get(f"{api.url}/metrics", timeout=10).text
    count = int(float(re.search(r"^predq_predict_batch_size_count (\S+)$", text, flags=re.M).group(1)))
    rows = int(float(re.search(r"^predq_predict_batch_size_sum (\S+)$", text, flags=re.M).group(1)))
    return count, rows


def post_all(api: ApiServer, name: str, rows: list[dict]) -> list[requests.Response]:
    url = f"{api.url}/v1/models/{name}/predict"
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda row: requests.post(url, json=row, timeout=60), rows))


def estimator(batching_models: Path, name: str):
    return joblib.load(batching_models / name / "v1" / "model.joblib")


def test_concurrent_requests_share_predict_calls(api, batching_models):
    """32 requests from 16 clients to a model that takes 0.2 s a call: fewer calls than requests, right answers."""
    calls_before, rows_before = batch_histogram(api)
    rows = training_frame(2 * CONCURRENCY, seed=21).to_dict(orient="records")
    responses = post_all(api, "slow_reg", rows)
    assert [r.status_code for r in responses] == [200] * len(rows), [r.text for r in responses if r.status_code != 200]

    calls, batched = batch_histogram(api)
    assert batched - rows_before == len(rows)
    assert calls - calls_before < len(rows) / 2, "concurrent requests were not merged"

    model = estimator(batching_models, "slow_reg")
    for row, response in zip(rows, responses):
        expected = model.predict(pd.DataFrame([row], columns=FEATURES))[0]
        assert response.json() == {"model": {"name": "slow_reg", "version": "v1"},
                                   "prediction": pytest.approx(float(expected), rel=1e-12)}
    assert "Warning" not in api.log()


def test_rows_the_model_rejects_fail_alone_under_load(api, batching_models):
    """Among concurrent requests, those whose row makes the model raise get 422 prediction_failed, the others 200."""
    rows = training_frame(4 * CONCURRENCY, seed=22).to_dict(orient="records")
    bad = {3, 17, 40}
    for i in bad:
        rows[i]["f1"] = SENTINEL
    responses = post_all(api, "fussy_reg", rows)
    model = estimator(batching_models, "fussy_reg")
    for i, (row, response) in enumerate(zip(rows, responses)):
        if i in bad:
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "prediction_failed"
        else:
            assert response.status_code == 200, response.text
            expected = model.predict(pd.DataFrame([row], columns=FEATURES))[0]
            assert response.json()["prediction"] == pytest.approx(float(expected), rel=1e-12)


def test_probabilities_under_load_match_the_model(api, batching_models):
    """Concurrent ?probabilities=true requests each get the probabilities of their own row."""
    frame = load_breast_cancer(as_frame=True).data.iloc[:48]
    rows = frame.to_dict(orient="records")
    url = f"{api.url}/v1/models/breast_cancer/predict?probabilities=true"
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        responses = list(pool.map(lambda row: requests.post(url, json=row, timeout=60), rows))
    model = estimator(batching_models, "breast_cancer")
    expected = model.predict_proba(frame)
    for k, response in enumerate(responses):
        body = response.json()
        assert body["prediction"] == model.classes_[expected[k].argmax()]
        assert list(body["probabilities"].values()) == pytest.approx(expected[k].tolist(), rel=1e-9)
