"""Micro-batching and the prediction cache of single predictions: the app in-process, no server."""
from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from flask import request_started
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.tree import DecisionTreeRegressor

from shared.batching import Batcher, BatchFailed, PredictionCache
from tests.support.models import FEATURES, SENTINEL, training_frame
from tests.support.processes import free_port, wait_for

WAIT = 30.0  # seconds a condition may take before the test fails; never a measured duration

# -- a model whose predict calls the test can hold back and count ---------------------------------------

_gate = threading.Event()
_gate.set()
_calls: list[int] = []  # rows of each predict call that reached the gate
_calls_lock = threading.Lock()


def gate(X):
    """Count the call's rows, wait while the gate is closed, and raise on a SENTINEL value."""
    values = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X)
    with _calls_lock:
        _calls.append(len(values))
    if not _gate.wait(WAIT):
        raise TimeoutError("the test never opened the gate")
    if (values == SENTINEL).any():
        raise ValueError("sentinel value seen")
    return X


def gated_regressor():
    X = training_frame(seed=11)
    y = X["f0"] * 2 - X["f3"]
    return make_pipeline(FunctionTransformer(gate), DecisionTreeRegressor(max_depth=8, random_state=0)).fit(X, y)


def classifier(flipped: bool = False):
    X = training_frame(seed=12)
    y = np.where((X["f0"] + X["f1"] > 0) != flipped, "yes", "no")
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)


def install(root: Path, name: str, estimator, version: str = "v1") -> None:
    target = root / name / version
    target.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, target / "model.joblib.tmp")
    (target / "model.joblib.tmp").replace(target / "model.joblib")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    install(root, "gated", gated_regressor())
    meta = {"features": [{"name": f, "dtype": "float64"} for f in FEATURES], "allows_missing": False}
    (root / "gated" / "v1" / "model.json").write_text(json.dumps(meta))  # a tree would accept NaN otherwise
    install(root, "clf", classifier())
    return root


@pytest.fixture
def make_app(models_root) -> Iterator[Callable]:
    """Build apps against the test models and an address where no Redis answers; closed at the end."""
    from api import create_app

    apps = []

    def make(models_dir: Path = models_root, **settings):
        app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "MODELS_DIR": str(models_dir),
                          "MODEL_RESCAN_SECONDS": 0, **settings})
        apps.append(app)
        with _calls_lock:
            _calls.clear()  # forget the calls that proved the array path at start
        return app

    threads_before = set(threading.enumerate())
    yield make
    for app in apps:
        svc = app.extensions["predq"]
        svc.redis.close()
        svc.celery.close()
    assert set(threading.enumerate()) == threads_before, "a thread was left behind"


@contextmanager
def closed_gate() -> Iterator[None]:
    _gate.clear()
    try:
        yield
    finally:
        _gate.set()


def post(app, name: str, row: dict, query: str = ""):
    return app.test_client().post(f"/v1/models/{name}/predict{query}", json=row)


def batches(app) -> tuple[int, int]:
    """(batches run, rows in them) of this app's batcher."""
    _, count, rows = app.extensions["predq.serving"].batcher.size_histogram()
    return count, rows


def rows_of(n: int, seed: int) -> list[dict]:
    return training_frame(n, seed=seed).to_dict(orient="records")


def expected_value(app, name: str, row: dict) -> float:
    mv = app.extensions["predq"].registry.get(name)
    return mv.estimator.predict(pd.DataFrame([row], columns=FEATURES))[0]


def hold_one_then_queue(app, pool: ThreadPoolExecutor, rows: list[dict], name: str = "gated") -> list:
    """Send rows[0] and hold it inside predict, queue the other rows behind it, then let everything run."""
    serving = app.extensions["predq.serving"]
    with closed_gate():
        futures = [pool.submit(post, app, name, rows[0])]
        wait_for(lambda: len(_calls) == 1, timeout=WAIT, what="the first request to be inside predict")
        futures += [pool.submit(post, app, name, r) for r in rows[1:]]
        wait_for(lambda: serving.batcher.queued() == len(rows) - 1, timeout=WAIT,
                 what="the other requests to gather behind it")
    return [f.result(timeout=WAIT) for f in futures]


# -- merging --------------------------------------------------------------------------------------------

def test_concurrent_requests_are_merged_into_one_predict_call(make_app):
    """16 concurrent requests take 2 predict calls, and each gets exactly the model's own answer for its row."""
    app = make_app()
    rows = rows_of(16, seed=5)
    with ThreadPoolExecutor(16) as pool:
        responses = hold_one_then_queue(app, pool, rows)
    assert _calls == [1, 15]
    assert batches(app) == (2, 16)
    for row, response in zip(rows, responses):
        assert response.status_code == 200, response.json
        assert response.json == {"model": {"name": "gated", "version": "v1"},
                                 "prediction": expected_value(app, "gated", row)}


def test_free_running_concurrent_requests_each_get_their_own_answer(make_app):
    """64 requests from 16 threads, batched however they meet: every row gets its own answer, counted once."""
    app = make_app()
    rows = rows_of(64, seed=6)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda r: post(app, "gated", r), rows))
    assert all(r.status_code == 200 for r in responses)
    count, batched_rows = batches(app)
    assert batched_rows == 64 == sum(_calls) and count == len(_calls)
    assert [r.json["prediction"] for r in responses] == [expected_value(app, "gated", r) for r in rows]


def test_probabilities_and_plain_requests_are_answered_each_as_asked(make_app):
    """A request with ?probabilities=true and one without, in the same moment, each get their own form."""
    app = make_app()
    row = rows_of(1, seed=8)[0]
    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(post, app, "clf", row) for _ in range(4)]
        probas = [pool.submit(post, app, "clf", row, "?probabilities=true") for _ in range(4)]
    mv = app.extensions["predq"].registry.get("clf")
    expected = mv.estimator.predict_proba(pd.DataFrame([row], columns=FEATURES))[0]
    for f in plain:
        assert set(f.result().json) == {"model", "prediction"}
    for f in probas:
        body = f.result().json
        assert list(body["probabilities"]) == ["no", "yes"]
        np.testing.assert_allclose(list(body["probabilities"].values()), expected, rtol=1e-12)


# -- failures stay with their request -------------------------------------------------------------------

def test_row_the_model_rejects_fails_alone_and_its_batch_mates_succeed(make_app):
    """The merged call raises on one row: that request gets 422 prediction_failed, the 14 others their answers."""
    app = make_app()
    rows = rows_of(16, seed=9)
    rows[7]["f2"] = SENTINEL
    with ThreadPoolExecutor(16) as pool:
        responses = hold_one_then_queue(app, pool, rows)
    assert _calls[:2] == [1, 15] and sorted(_calls[2:]) == [1] * 15  # the merged call, then each row alone
    bad = responses[7]
    assert bad.status_code == 422
    assert bad.json == {"error": {"code": "prediction_failed", "message": "The model could not predict this row: "
                                  "the model raised ValueError: sentinel value seen."}}
    for i, (row, response) in enumerate(zip(rows, responses)):
        if i != 7:
            assert response.status_code == 200, response.json
            assert response.json["prediction"] == expected_value(app, "gated", row)
    alone = post(app, "gated", rows[7])
    assert (alone.status_code, alone.json) == (422, bad.json)


INVALID = [
    ({"f0": None}, "missing_feature", "feature 'f0' is missing"),
    ({"f0": "abc"}, "invalid_type", "feature 'f0' has a value of the wrong type: 'abc'"),
    ({"f0": True}, "invalid_type", "feature 'f0' has a value of the wrong type: True"),
    ({"f0": [1, 2]}, "invalid_type", "feature 'f0' has a value of the wrong type: [1, 2]"),
    ({"f0": "1.5"}, "invalid_type", "feature 'f0' has a value of the wrong type: '1.5'"),
]


def test_invalid_rows_keep_their_exact_errors_and_never_enter_a_batch(make_app):
    """Sent among valid ones, each invalid row gets the same 422 as always and no predict call sees it."""
    app = make_app()
    valid = rows_of(8, seed=10)
    invalid = [dict(valid[0], **change) for change, _, _ in INVALID]
    absent = {k: v for k, v in valid[0].items() if k != "f4"}
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(post, app, "gated", r) for r in valid]
        bad = [pool.submit(post, app, "gated", r) for r in invalid]
        missing = pool.submit(post, app, "gated", absent)
    for f, (_, code, message) in zip(bad, INVALID):
        response = f.result()
        assert response.status_code == 422
        assert response.json == {"error": {"code": "invalid_input", "message": f"The row is invalid: {message}.",
                                           "details": {"fields": [{"name": "f0", "code": code, "message": message}]}}}
    assert missing.result().json["error"]["details"]["fields"] == [
        {"name": "f4", "code": "missing_feature", "message": "feature 'f4' is missing"}]
    assert all(f.result().status_code == 200 for f in good)
    assert batches(app)[1] == len(valid) == sum(_calls)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "Flask"])
def test_either_path_merges_requests_and_keeps_their_errors_apart(make_app, fast_path):
    """With PREDICT_FAST_PATH on or off: 16 held requests take 2 predict calls, the row the model rejects fails
    alone, invalid rows sent meanwhile get their own 422; the fast path answers every one of them without Flask."""
    app = make_app(PREDICT_FAST_PATH="on" if fast_path else "off")
    rows = rows_of(16, seed=16)
    rows[7]["f2"] = SENTINEL
    invalid = [dict(rows[0], f0="abc"), dict(rows[0], f1=None)]
    in_flask: list[str] = []
    with request_started.connected_to(lambda sender, **_: in_flask.append("request"), app), \
            ThreadPoolExecutor(16) as pool:
        responses = hold_one_then_queue(app, pool, rows)
        refused = list(pool.map(lambda r: post(app, "gated", r), invalid))
    assert _calls[:2] == [1, 15] and sorted(_calls[2:]) == [1] * 15
    assert responses[7].status_code == 422 and responses[7].json["error"]["code"] == "prediction_failed"
    for i, (row, response) in enumerate(zip(rows, responses)):
        if i != 7:
            assert response.status_code == 200, response.json
            assert response.json["prediction"] == expected_value(app, "gated", row)
    assert [(r.status_code, r.json["error"]["details"]["fields"][0]["name"]) for r in refused] == [
        (422, "f0"), (422, "f1")]
    assert len(in_flask) == (0 if fast_path else len(rows) + len(invalid))


# -- waiting --------------------------------------------------------------------------------------------

def test_a_lone_request_is_not_held_for_max_wait(make_app):
    """With a 10-minute PREDICT_MAX_WAIT_MS, requests one after another each run at once as a batch of one."""
    app = make_app(PREDICT_MAX_WAIT_MS=600_000)
    for row in rows_of(5, seed=13):
        assert post(app, "gated", row).status_code == 200
    sizes = app.extensions["predq.serving"].batcher.sizes
    assert (sizes.batches, sizes.rows, sizes.waited) == (5, 5, 0)


def submit_alone(batcher: Batcher, payload: int, run: Callable) -> int:
    with batcher.arrival() as arrival:
        return arrival.submit("k", payload, run)


def test_a_leader_waits_only_for_requests_already_on_their_way():
    """A batch waits for a request that has arrived, runs once it submits, and stops waiting when one leaves."""
    batcher = Batcher(max_size=8, max_wait_ms=600_000)
    seen: list[list[int]] = []

    def run(payloads: list[int]) -> list[int]:
        seen.append(list(payloads))
        return [p * 10 for p in payloads]

    with ThreadPoolExecutor(1) as pool:
        with batcher.arrival() as on_its_way:
            leader = pool.submit(submit_alone, batcher, 1, run)
            wait_for(lambda: batcher.queued() == 1, timeout=WAIT, what="the leader to gather")
            assert not leader.done()
            assert on_its_way.submit("k", 2, run) == 20
        assert leader.result(timeout=WAIT) == 10
        assert seen == [[1, 2]]

        with batcher.arrival() as on_its_way:
            leader = pool.submit(submit_alone, batcher, 3, run)
            wait_for(lambda: batcher.queued() == 1, timeout=WAIT, what="the leader to gather")
            on_its_way.leave()  # e.g. its body was invalid
        assert leader.result(timeout=WAIT) == 30
    assert seen == [[1, 2], [3]]


def test_a_failing_batch_is_reported_to_every_caller():
    """When the merged call raises, each caller gets BatchFailed, and the next batch runs normally."""
    batcher = Batcher(max_size=8, max_wait_ms=600_000)

    def boom(payloads):
        raise RuntimeError("merged call failed")

    with ThreadPoolExecutor(1) as pool:
        with batcher.arrival() as on_its_way:
            leader = pool.submit(submit_alone, batcher, 1, boom)
            wait_for(lambda: batcher.queued() == 1, timeout=WAIT, what="the leader to gather")
            with pytest.raises(BatchFailed, match="merged call failed"):
                on_its_way.submit("k", 2, boom)
        with pytest.raises(BatchFailed):
            leader.result(timeout=WAIT)
    with batcher.arrival() as arrival:
        assert arrival.submit("k", 3, lambda p: [x + 1 for x in p]) == 4


# -- the prediction cache -------------------------------------------------------------------------------

def metric(app, name: str) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return float(re.search(rf"^{name} (\S+)$", text, flags=re.M).group(1))


def cache_counts(app) -> tuple[float, float]:
    """(hits, misses) on /metrics."""
    return metric(app, "predq_prediction_cache_hits_total"), metric(app, "predq_prediction_cache_misses_total")


def test_cache_counts_hits_and_misses_and_forgets_the_least_recent(make_app):
    """A repeated row is a hit with the same answer; past PREDICTION_CACHE_SIZE the oldest row is forgotten."""
    app = make_app(PREDICTION_CACHE_SIZE=2)
    a, b, c = rows_of(3, seed=14)
    first = post(app, "clf", a, "?probabilities=true").json
    assert post(app, "clf", a, "?probabilities=true").json == first
    assert post(app, "clf", a).json == {"model": first["model"], "prediction": first["prediction"]}  # own key
    assert cache_counts(app) == (1, 2)
    post(app, "clf", b)
    post(app, "clf", c)   # a (plain) is now the least recent of three: forgotten
    post(app, "clf", a)
    assert cache_counts(app) == (1, 5)
    assert batches(app)[1] == 5  # every miss, and only the misses, were predicted


def test_cache_is_off_by_default(make_app):
    """Without PREDICTION_CACHE_SIZE every request is predicted and nothing is counted as a hit or miss."""
    app = make_app()
    row = rows_of(1, seed=15)[0]
    post(app, "clf", row)
    post(app, "clf", row)
    assert app.extensions["predq.serving"].cache is None
    assert cache_counts(app) == (0, 0)
    assert batches(app) == (2, 2)


def test_cache_never_answers_with_another_model_version(make_app, tmp_path, models_root):
    """After v2 (another file, other answers) is deployed, the cached v1 answer is served only to ?version=v1."""
    shutil.copytree(models_root / "clf", tmp_path / "clf")
    app = make_app(models_dir=tmp_path, PREDICTION_CACHE_SIZE=100)
    row = dict(rows_of(1, seed=16)[0], f0=1.5, f1=1.0)
    v1 = post(app, "clf", row, "?probabilities=true").json
    assert v1["model"] == {"name": "clf", "version": "v1"} and v1["prediction"] == "yes"
    assert post(app, "clf", row, "?probabilities=true").json == v1

    install(tmp_path, "clf", classifier(flipped=True), version="v2")
    v2 = post(app, "clf", row, "?probabilities=true").json
    assert v2["model"] == {"name": "clf", "version": "v2"} and v2["prediction"] == "no"
    assert v2["probabilities"]["no"] == pytest.approx(v1["probabilities"]["yes"], rel=0.05)
    assert post(app, "clf", row, "?probabilities=true&version=v1").json == v1
    assert post(app, "clf", row, "?probabilities=true").json == v2

    shutil.copytree(tmp_path / "clf" / "v2", tmp_path / "clf" / "v3")  # the same file: same sha256
    v3 = post(app, "clf", row, "?probabilities=true").json
    assert v3 == dict(v2, model={"name": "clf", "version": "v3"})
    assert cache_counts(app) == (4, 2)


def test_prediction_cache_is_a_bounded_lru():
    """get refreshes an entry; put beyond the size drops the least recently used."""
    cache = PredictionCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("b"), cache.get("a"), cache.get("c"), len(cache)) == (None, 1, 3, 2)
    assert (cache.hits, cache.misses) == (3, 1)


def test_metrics_expose_the_batch_size_histogram(make_app):
    """/metrics has predq_predict_batch_size buckets, sum and count, counted by this process."""
    app = make_app()
    rows = rows_of(16, seed=17)
    with ThreadPoolExecutor(16) as pool:
        hold_one_then_queue(app, pool, rows)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert "# TYPE predq_predict_batch_size histogram" in text
    buckets = {le: float(n) for le, n in re.findall(r'^predq_predict_batch_size_bucket\{le="([^"]+)"\} (\S+)$',
                                                     text, flags=re.M)}
    assert (buckets["1"], buckets["8"], buckets["16"], buckets["+Inf"]) == (1, 1, 2, 2)
    assert metric(app, "predq_predict_batch_size_sum") == 16
    assert metric(app, "predq_predict_batch_size_count") == 2
