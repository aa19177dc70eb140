"""Uploads over real HTTP (gunicorn): chunks are sent to workers while the file is still arriving."""
from __future__ import annotations

import orjson
import requests

from shared import keys
from tests.support import data
from tests.support.processes import wait_for

def _newest_job(r, known: set[bytes]) -> str | None:
    ids = [i for i in r.zrevrangebylex(keys.JOBS, "+", "-", start=0, num=5) if i not in known]
    return ids[0].decode() if ids else None


def test_workers_start_before_the_upload_ends(api_server, worker, redis_server):
    """A chunk of the job is committed by a worker while the client is still sending the rest of the file."""
    planted = data.planted_csv(150_000)
    half = planted.body.index(b"\n", len(planted.body) // 2) + 1
    r = redis_server.client()
    known = set(r.zrange(keys.JOBS, 0, -1))
    seen_during_upload: dict[str, int] = {}

    def pause() -> None:
        def committed():
            job_id = _newest_job(r, known)
            return job_id and r.scard(keys.done(job_id)) and job_id

        job_id = wait_for(committed, timeout=60, what="a worker to commit a chunk during the upload")
        seen_during_upload[job_id] = r.scard(keys.done(job_id))

    body, content_type = data.paused_multipart({"model": "fussy", "chunk_size": "5000", "id_column": "id"},
                                               "rows.csv", planted.body, half, pause)
    response = requests.post(f"{api_server.url}/v1/jobs", data=body, timeout=120,
                             headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text
    job = response.json()
    assert seen_during_upload.get(job["id"], 0) >= 1
    assert job["counts"]["total"] == 150_000

    def finished():
        current = requests.get(f"{api_server.url}/v1/jobs/{job['id']}", timeout=10).json()
        return current if current["status"] not in ("queued", "running") else None

    done = wait_for(finished, timeout=120, what="the streamed job to finish")
    assert done["counts"] == {"total": 150_000, "succeeded": 150_000 - len(planted.errors),
                              "failed": len(planted.errors), "skipped": 0}
    results = requests.get(f"{api_server.url}/v1/jobs/{job['id']}/results", timeout=60)
    rows = [orjson.loads(line)["row"] for line in results.content.splitlines()]
    assert rows == planted.good.index.tolist()


def test_http_errors_are_json(api_server):
    """Over real HTTP too, unknown routes and wrong methods answer with the JSON error body."""
    missing = requests.get(f"{api_server.url}/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = requests.put(f"{api_server.url}/v1/jobs", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
