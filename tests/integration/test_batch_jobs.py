"""Batch jobs end to end: the API in-process, a real Redis-compatible server and a real Celery worker."""
from __future__ import annotations

import io

import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest

from shared.registry import Registry
from tests.support import data
from tests.support.processes import wait_for

TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
N_ROWS = 50_000


@pytest.fixture(scope="module")
def fussy(models_dir):
    return Registry(models_dir).get("fussy")


def submit(client, planted: data.Planted, **options) -> dict:
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
    body, content_type = data.multipart(form, planted.filename, planted.body)
    response = client.post("/v1/jobs", data=body, content_type=content_type)
    assert response.status_code == 202, response.json
    assert response.headers["Location"] == f"/v1/jobs/{response.json['id']}"
    return response.json


def wait_terminal(client, job_id: str, timeout: float = 180) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}").json
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


def jsonl(response) -> list[dict]:
    assert response.status_code == 200, response.data[:300]
    return [orjson.loads(line) for line in response.data.splitlines() if line]


def assert_job_matches(client, job: dict, planted: data.Planted, model) -> None:
    """Counts add up, results equal model.predict over the good rows, errors name exactly the planted rows."""
    n = len(planted.frame)
    assert job["status"] == "partially_succeeded"
    assert job["counts"] == {"total": n, "succeeded": n - len(planted.errors), "failed": len(planted.errors), "skipped": 0}
    assert job["progress"] == 1.0 and job["rows_per_second"] > 0 and job["finished_at"]

    results = jsonl(client.get(f"/v1/jobs/{job['id']}/results"))
    good = planted.good
    assert [r["row"] for r in results] == good.index.tolist()
    assert [r["id"] for r in results] == good["id"].tolist()
    expected = model.estimator.predict(good[[f.name for f in model.features]])
    assert [r["prediction"] for r in results] == expected.tolist()
    probas = model.estimator.predict_proba(good[[f.name for f in model.features]])
    np.testing.assert_allclose([[r["probability_no"], r["probability_yes"]] for r in results], probas, rtol=1e-9)

    errors = jsonl(client.get(f"/v1/jobs/{job['id']}/errors"))
    assert {e["row"]: e["code"] for e in errors} == planted.errors
    assert [e["row"] for e in errors] == sorted(planted.errors)
    for e in errors:
        assert e["message"]
        if e["code"] != "malformed_row":
            assert e["id"] == f"r{e['row']}"


@pytest.mark.parametrize("make", [data.planted_csv, data.planted_csv_quoted, data.planted_jsonl, data.planted_parquet],
                         ids=["csv", "csv-quoted", "jsonl", "parquet"])
def test_planted_bad_rows_are_reported_exactly(client, worker, fussy, make):
    """A 50,000-row file: every planted bad row is named with its code, every other row predicted exactly."""
    planted = make(N_ROWS)
    created = submit(client, planted, model="fussy", id_column="id", probabilities=True, chunk_size=7000)
    # The 202 may come after the workers finished (a slow API process, a fast worker): any state on the way is right.
    assert created["status"] in ("queued", "running", "partially_succeeded")
    assert created["counts"]["total"] == N_ROWS
    job = wait_terminal(client, created["id"])
    assert_job_matches(client, job, planted, fussy)


def test_results_in_every_format_agree(client, worker, fussy):
    """jsonl, csv and parquet downloads hold the same rows and values."""
    planted = data.planted_csv(5000)
    job = wait_terminal(client, submit(client, planted, model="fussy", id_column="id", chunk_size=1000)["id"])
    base = f"/v1/jobs/{job['id']}/results"
    as_jsonl = pd.DataFrame(jsonl(client.get(base)))
    as_csv = pd.read_csv(io.BytesIO(client.get(f"{base}?format=csv").data))
    parquet = client.get(f"{base}?format=parquet")
    assert parquet.headers["Content-Type"] == "application/vnd.apache.parquet"
    as_parquet = pq.read_table(io.BytesIO(parquet.data)).to_pandas()
    for frame in (as_csv, as_parquet):
        assert frame.columns.tolist() == ["row", "id", "prediction"]
        assert frame["row"].tolist() == as_jsonl["row"].tolist()
        assert frame["prediction"].tolist() == as_jsonl["prediction"].tolist()
    errors_csv = pd.read_csv(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/errors?format=csv").data))
    assert errors_csv.columns.tolist() == ["row", "id", "code", "message"]
    assert dict(zip(errors_csv["row"], errors_csv["code"])) == planted.errors


def test_json_rows_job_with_regressor(client, worker, models_dir):
    """A JSON body job on a regressor: numbers equal predict to 1e-9, metadata and bad rows come back."""
    model = Registry(models_dir).get("fussy_reg")
    frame = data.base_frame(3000)
    rows = frame.to_dict(orient="records")
    rows[7]["f1"] = None
    rows[8] = "not an object"
    rows[9]["f0"] = 666.0
    response = client.post("/v1/jobs", json={"model": "fussy_reg", "rows": rows, "id_column": "id", "chunk_size": 500,
                                             "metadata": {"team": "a"}})
    assert response.status_code == 202, response.json
    job = wait_terminal(client, response.json["id"])
    assert job["metadata"] == {"team": "a"}
    assert job["counts"] == {"total": 3000, "succeeded": 2997, "failed": 3, "skipped": 0}
    results = jsonl(client.get(f"/v1/jobs/{job['id']}/results"))
    good = frame.drop(index=[7, 8, 9])
    np.testing.assert_allclose([r["prediction"] for r in results], model.estimator.predict(good[model.estimator.feature_names_in_]), rtol=1e-9)
    errors = jsonl(client.get(f"/v1/jobs/{job['id']}/errors"))
    assert [(e["row"], e["code"]) for e in errors] == [(7, "missing_feature"), (8, "malformed_row"), (9, "prediction_failed")]


def test_cancel_mid_job_keeps_finished_chunks(client, worker, fussy):
    """Cancel: the job ends cancelled, processed rows stay downloadable and every row is accounted for once."""
    planted = data.planted_csv(N_ROWS)
    created = submit(client, planted, model="fussy", id_column="id", chunk_size=250)
    response = client.post(f"/v1/jobs/{created['id']}/cancel")
    assert response.status_code == 202
    job = wait_terminal(client, created["id"])
    counts = job["counts"]
    assert job["status"] == "cancelled"
    assert counts["skipped"] > 0
    assert counts["succeeded"] + counts["failed"] + counts["skipped"] == counts["total"] == N_ROWS
    results = jsonl(client.get(f"/v1/jobs/{job['id']}/results"))
    errors = jsonl(client.get(f"/v1/jobs/{job['id']}/errors"))
    assert len(results) == counts["succeeded"] and len(errors) == counts["failed"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json["error"]["code"] == "job_finished"


def test_partial_results_while_running_and_not_finished_error(client, worker):
    """Results of a running job: 409 job_not_finished, or the rows so far with partial=true."""
    planted = data.planted_csv(N_ROWS)
    created = submit(client, planted, model="fussy", id_column="id", chunk_size=500)
    early = client.get(f"/v1/jobs/{created['id']}/results")
    if early.status_code == 409:  # the job may legitimately finish before the request
        assert early.json["error"]["code"] == "job_not_finished"
        partial = jsonl(client.get(f"/v1/jobs/{created['id']}/results?partial=true"))
        assert [r["row"] for r in partial] == sorted(r["row"] for r in partial)
    job = wait_terminal(client, created["id"])
    assert len(jsonl(client.get(f"/v1/jobs/{job['id']}/results?partial=true"))) == job["counts"]["succeeded"]


def test_error_budget_fails_the_job(client, worker):
    """max_error_rate: the job fails with error_budget_exceeded and the counts still add up."""
    planted = data.planted_csv(20_000)
    job = wait_terminal(client, submit(client, planted, model="fussy", max_error_rate=0.0001, chunk_size=2000)["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "error_budget_exceeded"
    c = job["counts"]
    assert c["succeeded"] + c["failed"] + c["skipped"] == c["total"] == 20_000


def test_listing_pages_through_jobs(client, worker):
    """The list is newest first; next_cursor walks it page by page without repeats."""
    ids = [client.post("/v1/jobs", json={"model": "fussy", "rows": [{"f0": 1, "f1": 2, "f2": 3, "f3": 4, "f4": i}]}).json["id"]
           for i in range(5)]
    seen, cursor = [], None
    while len(seen) < 5:
        page = client.get("/v1/jobs", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})}).json
        assert len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        assert cursor or len(seen) >= 5
    assert seen[:5] == ids[::-1]
    for job_id in ids:
        wait_terminal(client, job_id)
    succeeded = client.get("/v1/jobs", query_string={"status": "succeeded", "limit": 100}).json["data"]
    assert {j["status"] for j in succeeded} == {"succeeded"}


def test_delete_removes_a_finished_job(client, worker, redis_server):
    """DELETE: 204, then 404 for the job and its results, and no key of it left in Redis."""
    job_id = client.post("/v1/jobs", json={"model": "fussy", "rows": [{"f0": 1, "f1": 2, "f2": 3, "f3": 4, "f4": 5}]}).json["id"]
    wait_terminal(client, job_id)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").json["error"]["code"] == "job_not_found"
    assert client.get(f"/v1/jobs/{job_id}/results").status_code == 404
    assert redis_server.client().keys(f"*{job_id}*") == []


def test_finished_job_keys_expire(client, worker, redis_server):
    """Every key of a finished job carries the result TTL."""
    job_id = client.post("/v1/jobs", json={"model": "fussy", "rows": [{"f0": 1, "f1": 2, "f2": 3, "f3": 4, "f4": 5}]}).json["id"]
    wait_terminal(client, job_id)
    r = redis_server.client()
    job_keys = r.keys(f"*{job_id}*")
    assert job_keys
    assert all(0 < r.ttl(k) <= 7 * 24 * 3600 for k in job_keys)
