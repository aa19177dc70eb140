"""Every 4xx of the contract: its status, its error code, the error body's shape, and no job left behind.

Rejected job requests run against an app on a Redis-compatible server of their own that no worker consumes,
so that the job keys seen before and after a request can only differ because of that request.
"""
from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer

from shared import keys
from tests.support import data
from tests.support.models import training_frame
from tests.support.processes import RedisServer, wait_for

TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
GOOD_ROW = {"f0": 0.1, "f1": -0.2, "f2": 0.3, "f3": 1.4, "f4": -0.5}
GOOD_CSV = b"id,f0,f1,f2,f3,f4\nr0,0.1,-0.2,0.3,1.4,-0.5\nr1,1,2,3,4,5\n"
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The contract's error body, as JSON, with this status and code; returns the `error` object."""
    assert response.status_code == status, (response.status_code, response.data[:500])
    assert response.mimetype == "application/json", response.headers.get("Content-Type")
    assert b"<html" not in response.data.lower() and b"<!doctype" not in response.data.lower()
    body = orjson.loads(response.data)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and SNAKE.fullmatch(error["code"]), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    if "details" in error:
        assert isinstance(error["details"], dict), error
    if code is not None:
        assert error["code"] == code, error
    return error


def field_codes(error: dict) -> dict[str, str]:
    fields = error["details"]["fields"]
    assert fields and all({"name", "code", "message"} <= set(f) and f["message"] for f in fields), fields
    return {f["name"]: f["code"] for f in fields}


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, float_format="%.17g").encode()


def with_part_type(body: bytes, content_type: str) -> bytes:
    """A body from data.multipart with the file part's content type replaced."""
    return body.replace(b"Content-Type: application/octet-stream", f"Content-Type: {content_type}".encode(), 1)


def close_app(app) -> None:
    svc = app.extensions["predq"]
    svc.redis.close()
    svc.celery.close()


# -- an app whose Redis no worker consumes ----------------------------------------------------------

@pytest.fixture(scope="module")
def quiet(models_dir, tmp_path_factory):
    """An app on a Redis-compatible server of its own with no worker: jobs stay queued, nothing changes keys."""
    from api import create_app

    server = RedisServer(dir=str(tmp_path_factory.mktemp("redis-quiet")))
    server.start()
    app = create_app({"REDIS_URL": server.url, "MODELS_DIR": models_dir})
    r = server.client()
    try:
        yield SimpleNamespace(client=app.test_client(), redis=r, server=server)
    finally:
        r.close()
        close_app(app)
        server.stop()


def job_state(r) -> tuple[set, set, set]:
    """Every job key, the ids in the job list, and the ids of active jobs."""
    return (set(r.scan_iter(match=f"{keys.PREFIX}:job:*", count=1000)),
            set(r.zrange(keys.JOBS, 0, -1)),
            set(r.smembers(keys.ACTIVE_JOBS)))


def rejected(env, status: int, code: str | None, **request) -> dict:
    """POST /v1/jobs must fail with this status and code and leave the job keys exactly as they were."""
    before = job_state(env.redis)
    response = env.client.post("/v1/jobs", **request)
    error = assert_error(response, status, code)
    assert "Location" not in response.headers
    assert job_state(env.redis) == before, "a rejected request left a job behind"
    return error


def upload(fields: dict, filename: str, body: bytes, part_type: str | None = None) -> dict:
    payload, content_type = data.multipart(fields, filename, body)
    if part_type:
        payload = with_part_type(payload, part_type)
    return {"data": payload, "content_type": content_type}


def queued_job(env, **options) -> dict:
    response = env.client.post("/v1/jobs", json={"model": "fussy", "rows": [GOOD_ROW] * 3, **options})
    assert response.status_code == 202, response.data[:500]
    return response.json


# -- synchronous predictions ------------------------------------------------------------------------

PREDICT = "/v1/models/fussy/predict"


def test_predict_body_not_json_is_malformed_json(client):
    """A body that is not JSON is 400 malformed_json."""
    for raw in (b"{not json", b"", b'{"f0": 1,', b"\xff\xfe"):
        assert_error(client.post(PREDICT, data=raw, content_type="application/json"), 400, "malformed_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "text/csv"])
def test_predict_non_json_content_type_is_415(client, content_type):
    """A content type other than JSON is 415."""
    assert_error(client.post(PREDICT, data=orjson.dumps(GOOD_ROW), content_type=content_type), 415)


def test_predict_without_content_type_is_415(client):
    """A body sent with no content type at all is 415."""
    assert_error(client.post(PREDICT, data=orjson.dumps(GOOD_ROW)), 415)


def test_predict_empty_array_is_empty_input(client):
    """`[]` is 422 empty_input."""
    assert_error(client.post(PREDICT, json=[]), 422, "empty_input")


def test_predict_too_many_rows_points_to_jobs(client):
    """More rows than SYNC_MAX_ROWS is 413 too_many_rows, and the message points to /v1/jobs."""
    ok = client.post(PREDICT, json=[GOOD_ROW] * 1000)
    assert ok.status_code == 200 and len(ok.json["predictions"]) == 1000
    error = assert_error(client.post(PREDICT, json=[GOOD_ROW] * 1001), 413, "too_many_rows")
    assert "/v1/jobs" in error["message"]


@pytest.mark.parametrize("raw", [b"3", b"2.5", b'"a string"', b"true", b"null"])
def test_predict_body_neither_object_nor_array_is_invalid_input(client, raw):
    """A JSON body that is neither an object nor an array is 422 invalid_input."""
    assert_error(client.post(PREDICT, data=raw, content_type="application/json"), 422, "invalid_input")


def test_predict_invalid_object_names_each_offending_feature(client):
    """One invalid object is 422 invalid_input naming every offending feature with its row error code."""
    row = load_breast_cancer(as_frame=True).data.iloc[0].to_dict()
    del row["mean radius"]
    row["mean texture"] = "abc"
    row["worst area"] = None
    error = assert_error(client.post("/v1/models/breast_cancer/predict", json=row), 422, "invalid_input")
    assert field_codes(error) == {"mean radius": "missing_feature", "mean texture": "invalid_type",
                                  "worst area": "missing_feature"}
    one = dict(GOOD_ROW, f2=True)
    error = assert_error(client.post(PREDICT, json=one), 422, "invalid_input")
    assert field_codes(error) == {"f2": "invalid_type"}


def test_predict_get_invalid_query_value_is_invalid_input(client):
    """GET with a feature that is not a number is 422 invalid_input naming it."""
    query = {k: str(v) for k, v in GOOD_ROW.items()}
    query["f3"] = "abc"
    del query["f0"]
    error = assert_error(client.get(PREDICT, query_string=query), 422, "invalid_input")
    assert field_codes(error) == {"f0": "missing_feature", "f3": "invalid_type"}


@pytest.mark.parametrize("method,url", [
    ("post", "/v1/models/no_such_model/predict"),
    ("get", "/v1/models/no_such_model/predict"),
    ("get", "/v1/models/no_such_model"),
])
def test_unknown_model_is_404(client, method, url):
    """An unknown model name is 404 model_not_found."""
    kwargs = {"json": GOOD_ROW} if method == "post" else {"query_string": GOOD_ROW}
    assert_error(getattr(client, method)(url, **kwargs), 404, "model_not_found")


@pytest.mark.parametrize("method", ["post", "get"])
def test_predict_bad_probabilities_flag_is_invalid_parameter(client, method):
    """?probabilities=maybe is 400 invalid_parameter."""
    if method == "post":
        response = client.post(PREDICT, json=GOOD_ROW, query_string={"probabilities": "maybe"})
    else:
        response = client.get(PREDICT, query_string={**GOOD_ROW, "probabilities": "maybe"})
    assert_error(response, 400, "invalid_parameter")


# -- routing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/v1/nothing", "/v1/models/fussy/predict/extra", "/v1/jobs/x/y/z", "/v1"])
def test_unknown_route_is_json_404(client, url):
    """An unknown route is a JSON 404."""
    assert_error(client.get(url), 404)
    assert_error(client.post(url, json={}), 404)


@pytest.mark.parametrize("method,url", [
    ("put", "/v1/jobs"), ("delete", "/v1/models"), ("patch", "/v1/models/fussy/predict"),
    ("post", "/v1/models/fussy"), ("put", "/v1/jobs/job_doesnotexist"), ("get", "/v1/jobs/job_x/cancel"),
])
def test_wrong_method_is_json_405(client, method, url):
    """A method a route does not take is a JSON 405."""
    assert_error(getattr(client, method)(url), 405)


# -- POST /v1/jobs: every rejection leaves no job behind ---------------------------------------------

@pytest.mark.parametrize("body", [
    {"model": "no_such_model", "rows": [GOOD_ROW]},
    {"model": "fussy", "version": "v999", "rows": [GOOD_ROW]},
], ids=["model", "version"])
def test_job_unknown_model_or_version_json(quiet, body):
    """A job for an unknown model or version is 422 model_not_found."""
    rejected(quiet, 422, "model_not_found", json=body)


def test_job_unknown_model_upload(quiet):
    """An upload for an unknown model is 422 model_not_found."""
    rejected(quiet, 422, "model_not_found", **upload({"model": "no_such_model"}, "x.csv", GOOD_CSV))


@pytest.mark.parametrize("filename,part_type", [("x.txt", "text/plain"), ("x.xlsx", None), ("data", "image/png")])
def test_job_unsupported_format(quiet, filename, part_type):
    """A file that is not CSV, JSON Lines or Parquet by name or content type is 415 unsupported_format."""
    rejected(quiet, 415, "unsupported_format", **upload({"model": "fussy"}, filename, GOOD_CSV, part_type))


def test_job_csv_lacking_features_names_them(quiet):
    """A CSV header without some of the model's features is 422 missing_columns naming them."""
    body = b"id,f0,f1,f2\nr0,1,2,3\n"
    error = rejected(quiet, 422, "missing_columns", **upload({"model": "fussy"}, "x.csv", body))
    assert "f3" in error["message"] and "f4" in error["message"]


def test_job_parquet_lacking_features_names_them(quiet):
    """A Parquet schema without some of the model's features is 422 missing_columns naming them."""
    sink = io.BytesIO()
    pq.write_table(pa.table({"f0": [1.0], "f2": [2.0], "f4": [3.0]}), sink)
    error = rejected(quiet, 422, "missing_columns", **upload({"model": "fussy"}, "x.parquet", sink.getvalue()))
    assert "f1" in error["message"] and "f3" in error["message"]


def test_job_csv_header_only_is_empty_input(quiet):
    """A CSV with a header and no rows is 422 empty_input."""
    rejected(quiet, 422, "empty_input", **upload({"model": "fussy"}, "x.csv", b"f0,f1,f2,f3,f4\n"))


def test_job_empty_rows_is_empty_input(quiet):
    """`rows: []` is 422 empty_input."""
    rejected(quiet, 422, "empty_input", json={"model": "fussy", "rows": []})


def test_job_garbage_parquet_is_invalid_file(quiet):
    """Bytes that are not Parquet in a .parquet file are 422 invalid_file."""
    garbage = np.random.default_rng(1).integers(0, 256, size=50_000, dtype=np.uint8).tobytes()
    rejected(quiet, 422, "invalid_file", **upload({"model": "fussy"}, "x.parquet", garbage))


def test_job_id_column_absent_is_invalid_parameter(quiet):
    """An id_column the input does not have is 422 invalid_parameter."""
    rejected(quiet, 422, "invalid_parameter", **upload({"model": "fussy", "id_column": "key"}, "x.csv", GOOD_CSV))
    rejected(quiet, 422, "invalid_parameter", json={"model": "fussy", "rows": [GOOD_ROW], "id_column": "key"})


@pytest.mark.parametrize("name", ["row", "prediction"])
def test_job_reserved_id_column_is_invalid_parameter(quiet, name):
    """id_column named `row` or `prediction` is 422 invalid_parameter."""
    rows = [dict(GOOD_ROW, **{name: "a"})]
    rejected(quiet, 422, "invalid_parameter", json={"model": "fussy", "rows": rows, "id_column": name})
    csv = f"{name},f0,f1,f2,f3,f4\na,1,2,3,4,5\n".encode()
    rejected(quiet, 422, "invalid_parameter", **upload({"model": "fussy", "id_column": name}, "x.csv", csv))


@pytest.mark.parametrize("option,value", [("chunk_size", 0), ("chunk_size", -5), ("max_error_rate", 2),
                                          ("max_error_rate", -0.1)])
def test_job_out_of_range_option_is_invalid_parameter(quiet, option, value):
    """chunk_size below 1 or max_error_rate outside 0..1 is 400 invalid_parameter naming the field."""
    error = rejected(quiet, 400, "invalid_parameter", json={"model": "fussy", "rows": [GOOD_ROW], option: value})
    assert option in field_codes(error)
    form = upload({"model": "fussy", option: str(value)}, "x.csv", GOOD_CSV)
    error = rejected(quiet, 400, "invalid_parameter", **form)
    assert option in field_codes(error)


@pytest.mark.parametrize("body,field", [
    ({"rows": [GOOD_ROW]}, "model"),
    ({"model": "fussy", "rows": "not a list"}, "rows"),
    ({"model": "fussy", "rows": [GOOD_ROW], "probabilities": "maybe"}, "probabilities"),
    ({"model": "fussy", "rows": [GOOD_ROW], "metadata": {"team": ["a"]}}, "metadata"),
    ({"model": "fussy"}, "rows"),
], ids=["no-model", "rows-type", "probabilities-type", "metadata-type", "no-rows"])
def test_job_invalid_field_is_invalid_parameter(quiet, body, field):
    """A job body with a missing or mistyped field is 400 invalid_parameter naming the field."""
    error = rejected(quiet, 400, "invalid_parameter", json=body)
    assert any(name.split(".")[0] == field for name in field_codes(error)), error


def test_job_upload_with_bad_form_fields_is_invalid_parameter(quiet):
    """An upload with metadata that is not JSON, or with no file part, is 400 invalid_parameter."""
    form = upload({"model": "fussy", "metadata": "{team"}, "x.csv", GOOD_CSV)
    error = rejected(quiet, 400, "invalid_parameter", **form)
    assert "metadata" in field_codes(error)
    payload = (b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\nfussy\r\n--b0--\r\n')
    rejected(quiet, 400, "invalid_parameter", data=payload, content_type="multipart/form-data; boundary=b0")


def test_job_malformed_json_body(quiet):
    """A job body that is not JSON is 400 malformed_json."""
    rejected(quiet, 400, "malformed_json", data=b'{"model": "fussy", "rows": [', content_type="application/json")


def test_job_text_plain_is_415(quiet):
    """A job body of type text/plain is 415."""
    rejected(quiet, 415, None, data=orjson.dumps({"model": "fussy", "rows": [GOOD_ROW]}), content_type="text/plain")


@pytest.mark.parametrize("source", ["file:///etc/passwd", "/etc/passwd", "s3://bucket/input.csv",
                                    "https://example.com/x.csv"])
def test_job_source_outside_allowed_roots_is_403(quiet, source):
    """A source URI that is not under an allowed root is 403 source_not_allowed."""
    rejected(quiet, 403, "source_not_allowed", json={"model": "fussy", "source": source})


def test_job_truncated_upload_is_invalid_file(quiet):
    """An upload cut off inside its file part, without the closing boundary, is a 4xx invalid_file."""
    payload, content_type = data.multipart({"model": "fussy", "chunk_size": "1000"}, "x.csv",
                                           csv_bytes(training_frame(20_000, seed=2)))
    for cut in (len(payload) // 2, 400, len(payload) - len(b"\r\n--predq-test-boundary-7f3a--\r\n")):
        before = job_state(quiet.redis)
        response = quiet.client.post("/v1/jobs", data=payload[:cut], content_type=content_type)
        assert 400 <= response.status_code < 500, response.data[:500]
        assert_error(response, response.status_code, "invalid_file")
        assert job_state(quiet.redis) == before


def test_job_binary_after_many_rows_is_invalid_file_and_leaves_nothing(tmp_path, models_dir, worker_factory):
    """A CSV that turns into binary after 100,000 good rows is 422 invalid_file, and its job never reappears."""
    from api import create_app

    server = RedisServer(dir=str(tmp_path / "redis"))
    server.start()
    app = create_app({"REDIS_URL": server.url, "MODELS_DIR": models_dir})
    r = server.client()
    try:
        proc = worker_factory(redis_url=server.url, concurrency=2)
        env = SimpleNamespace(client=app.test_client(), redis=r)
        good = csv_bytes(training_frame(100_000, seed=6))
        binary = np.random.default_rng(0).integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes()
        rejected(env, 422, "invalid_file", **upload({"model": "fussy", "chunk_size": "1000"}, "big.csv", good + binary))

        def logged(message: str) -> list[dict]:
            lines = [orjson.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
            return [e for e in lines if e.get("message", "").startswith(message)]

        def settled() -> bool:
            received = [e for e in logged("Task predq.process_chunk[") if e["message"].endswith("received")]
            return (len(received) > 0 and len(logged("chunk committed")) == len(received)
                    and r.llen("predq.chunks") == 0 and r.hlen("unacked") == 0)

        wait_for(settled, timeout=120, what="the worker to take every chunk message of the rejected upload")
        job_ids = {e["job_id"] for e in logged("chunk committed")}
        assert len(job_ids) == 1, job_ids  # the job existed and chunks were sent before the error was found
        job_id = job_ids.pop()
        assert r.keys(f"*{job_id}*") == []
        assert r.zscore(keys.JOBS, job_id) is None
        assert job_state(r) == (set(), set(), set())
        assert_error(env.client.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
    finally:
        r.close()
        close_app(app)
        server.stop()


# -- GET /v1/jobs and a job's routes ----------------------------------------------------------------

@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit=2.5", "status=bogus",
                                   "cursor=xyz", "cursor=job_"])
def test_job_listing_bad_query_is_invalid_parameter(client, query):
    """An out-of-range limit, unknown status or foreign cursor is 400 invalid_parameter."""
    assert_error(client.get(f"/v1/jobs?{query}"), 400, "invalid_parameter")


@pytest.mark.parametrize("method,suffix", [("get", ""), ("get", "/results"), ("get", "/errors"),
                                           ("post", "/cancel"), ("delete", "")])
def test_unknown_job_is_job_not_found(client, method, suffix):
    """Every route of a job that does not exist is 404 job_not_found."""
    assert_error(getattr(client, method)(f"/v1/jobs/job_doesnotexist{suffix}"), 404, "job_not_found")


def test_download_unknown_format_is_400(quiet):
    """results?format=xml or errors?format=parquet is 400 invalid_parameter."""
    job = queued_job(quiet)
    for url in (f"/v1/jobs/{job['id']}/results?format=xml", f"/v1/jobs/{job['id']}/errors?format=parquet",
                "/v1/jobs/job_doesnotexist/results?format=xml"):
        assert_error(quiet.client.get(url), 400, "invalid_parameter")


def test_downloads_of_a_queued_job_are_not_finished(quiet):
    """Results and errors of a job that has not finished are 409 job_not_finished."""
    job = queued_job(quiet)
    assert quiet.client.get(f"/v1/jobs/{job['id']}").json["status"] == "queued"
    assert_error(quiet.client.get(f"/v1/jobs/{job['id']}/results"), 409, "job_not_finished")
    assert_error(quiet.client.get(f"/v1/jobs/{job['id']}/errors?format=csv"), 409, "job_not_finished")
    assert quiet.client.get(f"/v1/jobs/{job['id']}/results?partial=true").status_code == 200


def test_delete_of_a_queued_job_is_409(quiet):
    """DELETE of a job that is not terminal is 409 and the job stays."""
    job = queued_job(quiet)
    assert_error(quiet.client.delete(f"/v1/jobs/{job['id']}"), 409)
    assert quiet.client.get(f"/v1/jobs/{job['id']}").json["status"] == "queued"


def test_cancel_twice_is_job_finished(quiet):
    """Cancelling a job that has ended cancelled is 409 job_finished."""
    job = queued_job(quiet)
    first = quiet.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert first.status_code == 202, first.data[:500]
    status = wait_for(lambda: (s := quiet.client.get(f"/v1/jobs/{job['id']}").json["status"]) in TERMINAL and s,
                      timeout=30, what="the cancelled job to end")
    assert status == "cancelled"
    assert_error(quiet.client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")


def test_cancel_of_a_succeeded_job_is_job_finished(client, worker):
    """Cancelling a job that has succeeded is 409 job_finished, and the job stays succeeded."""
    response = client.post("/v1/jobs", json={"model": "fussy", "rows": [GOOD_ROW] * 5})
    assert response.status_code == 202, response.data[:500]
    job_id = response.json["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json["status"] in TERMINAL, timeout=120,
             what=f"job {job_id} to finish")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished")
    assert client.get(f"/v1/jobs/{job_id}").json["status"] == "succeeded"


def test_upload_options_as_query_parameters_are_validated(quiet):
    """Options given as query parameters of an upload are checked like form fields."""
    payload = upload({}, "x.csv", GOOD_CSV)
    before = job_state(quiet.redis)
    response = quiet.client.post("/v1/jobs?model=fussy&chunk_size=0", **payload)
    assert "chunk_size" in field_codes(assert_error(response, 400, "invalid_parameter"))
    assert job_state(quiet.redis) == before

