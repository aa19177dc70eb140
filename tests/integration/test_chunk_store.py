"""Jobs with CHUNK_STORE_URL: blobs in a file:// folder or an S3-compatible server, only state in Redis."""
from __future__ import annotations

import os
from collections.abc import Iterator

import fsspec
import orjson
import pytest
import requests

from shared.chunkstore import FsspecBlobs
from shared.jobs import JobStore
from shared.registry import Registry
from tests.support import data
from tests.support.processes import ApiServer, CeleryWorker, MotoServer, RedisServer, _ManagedProcess, wait_for

N_ROWS = 6000
CHUNK_SIZE = 1500
TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module", params=["file", "s3"])
def stack(request, models_dir, tmp_path_factory) -> Iterator[dict]:
    """Its own Redis, an API and a worker, all with CHUNK_STORE_URL pointing at a file:// folder or at moto."""
    logs = str(tmp_path_factory.mktemp(f"chunkstore-{request.param}"))
    started: list[_ManagedProcess] = []
    env: dict[str, str] = {}
    try:
        if request.param == "s3":
            moto = MotoServer(logs).start()
            started.append(moto)
            env = {"AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}
            os.environ.update(env)  # for this process's own look at the bucket; restored below
            fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=moto.url).mkdir("predq-test")
            url = "s3://predq-test/chunks"
        else:
            url = f"file://{tmp_path_factory.mktemp('chunks')}"
        env["CHUNK_STORE_URL"] = url
        redis_server = RedisServer(dir=str(tmp_path_factory.mktemp("redis")))
        redis_server.start()
        started.append(redis_server)
        worker = CeleryWorker(redis_server.url, models_dir=models_dir, env=env, concurrency=1, log_dir=logs)
        worker.start(wait_ready=False)  # starts while the API does
        started.append(worker)
        api = ApiServer(redis_server.url, models_dir=models_dir, env=env, log_dir=logs)
        api.start()
        started.append(api)
        worker.wait_ready()
        yield {"api": api.url, "redis": redis_server, "url": url, "blobs": FsspecBlobs(url)}
    finally:
        for proc in reversed(started):
            proc.stop()
        for name in env:
            if name != "CHUNK_STORE_URL":
                os.environ.pop(name, None)


def _objects(stack: dict, job_id: str) -> list[str]:
    blobs: FsspecBlobs = stack["blobs"]
    blobs.fs.invalidate_cache()
    base = f"{blobs.root}/{job_id}"
    if not blobs.fs.exists(base):
        return []
    return sorted(p[len(base) + 1:] for p in blobs.fs.find(base))


def _submit(stack: dict, planted: data.Planted) -> str:
    body, content_type = data.multipart({"model": "fussy", "id_column": "id", "chunk_size": str(CHUNK_SIZE)},
                                        planted.filename, planted.body)
    response = requests.post(f"{stack['api']}/v1/jobs", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait(stack: dict, job_id: str) -> dict:
    def done():
        job = requests.get(f"{stack['api']}/v1/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout=180, what=f"job {job_id} to finish")


def _jsonl(stack: dict, job_id: str, kind: str) -> list[dict]:
    response = requests.get(f"{stack['api']}/v1/jobs/{job_id}/{kind}", timeout=30)
    assert response.status_code == 200, response.text[:300]
    return [orjson.loads(line) for line in response.content.splitlines() if line]


def test_a_job_keeps_its_blobs_in_the_store_and_only_names_in_redis(stack, models_dir):
    """Exact counts, results equal in-process predictions, Redis holds no blob bytes, a duplicate changes nothing,
    DELETE removes the objects."""
    planted = data.planted_csv(N_ROWS)
    job_id = _submit(stack, planted)
    job = _wait(stack, job_id)
    n_bad = len(planted.errors)
    assert job["status"] == "partially_succeeded"
    assert job["counts"] == {"total": N_ROWS, "succeeded": N_ROWS - n_bad, "failed": n_bad, "skipped": 0}

    model = Registry(models_dir).get("fussy")
    results = _jsonl(stack, job_id, "results")
    good = planted.good
    assert [r["row"] for r in results] == good.index.tolist()
    assert [r["prediction"] for r in results] == model.estimator.predict(good[[f.name for f in model.features]]).tolist()
    errors = _jsonl(stack, job_id, "errors")
    assert {e["row"]: e["code"] for e in errors} == planted.errors

    # The blobs are objects under the job's name; inputs went when their chunks committed.
    chunks = N_ROWS // CHUNK_SIZE
    objects = _objects(stack, job_id)
    assert sorted(o.split(".")[0] for o in objects if o.startswith("results/")) == [f"results/{i}" for i in range(chunks)]
    assert not [o for o in objects if o.startswith("inputs/")]
    assert len([o for o in objects if o.startswith("errors/")]) >= 1

    # Redis holds names: every key of the job is small, whatever the chunks weigh.
    client = stack["redis"].client()
    job_keys = [k.decode() for k in client.keys(f"predq:job:{{{job_id}}}*")]
    assert job_keys
    sizes = {k: client.memory_usage(k) for k in job_keys}
    assert max(sizes.values()) < 2048, sizes
    names = client.hvals(f"predq:job:{{{job_id}}}:results")
    assert len(names) == chunks and all(n.decode().startswith(f"{job_id}/results/") for n in names)

    # A late duplicate run of chunk 0 writes its own blob; its commit is refused, its blob deleted.
    store = JobStore(client, result_ttl=3600, blobs=stack["blobs"])
    before = _objects(stack, job_id)
    assert store.commit(job_id, 0, 5, 0, b"a duplicate run's results", b"")[0] == "duplicate"
    assert _objects(stack, job_id) == before
    assert _jsonl(stack, job_id, "results") == results

    assert requests.delete(f"{stack['api']}/v1/jobs/{job_id}", timeout=30).status_code == 204
    assert _objects(stack, job_id) == []
    assert not client.keys(f"predq:job:{{{job_id}}}*")
    client.close()


def test_the_reconciler_sweeps_blobs_of_expired_jobs(stack, models_dir):
    """Once a job's Redis keys expire, the worker's reconcile task removes its objects; other jobs keep theirs."""
    from shared import keys
    from shared.dispatch import RECONCILE, make_celery
    from shared.settings import load_settings

    expired, kept = (_submit(stack, data.planted_csv(500)) for _ in range(2))
    for job_id in (expired, kept):
        _wait(stack, job_id)
    assert _objects(stack, expired) and _objects(stack, kept)
    client = stack["redis"].client()
    client.delete(*keys.all_job_keys(expired))  # what RESULT_TTL does
    celery = make_celery(load_settings({"REDIS_URL": stack["redis"].url}))
    celery.send_task(RECONCILE)
    wait_for(lambda: _objects(stack, expired) == [], timeout=60, what="the expired job's objects to be swept")
    assert _objects(stack, kept)
    assert len(_jsonl(stack, kept, "results")) == 500 - len(data.planted_csv(500).errors)
    client.close()


def test_an_unwritable_store_fails_the_upload_with_503(stack, models_dir, tmp_path):
    """A store that cannot be written: 503 chunk_store_unavailable naming it, and no job left behind."""
    from api import create_app

    if stack["url"].startswith("s3://"):
        broken = "s3://no-such-bucket/chunks"
    else:
        (tmp_path / "a-file").write_text("not a directory")
        broken = f"file://{tmp_path / 'a-file' / 'chunks'}"
    app = create_app({"REDIS_URL": stack["redis"].url, "MODELS_DIR": models_dir, "CHUNK_STORE_URL": broken})
    client = stack["redis"].client()
    jobs_before = client.zrange("predq:jobs", 0, -1)
    planted = data.planted_csv(500)
    body, content_type = data.multipart({"model": "fussy"}, planted.filename, planted.body)
    response = app.test_client().post("/v1/jobs", data=body, content_type=content_type)
    assert response.status_code == 503, response.json
    assert int(response.headers["Retry-After"]) > 0
    error = response.json["error"]
    assert error["code"] == "chunk_store_unavailable"
    assert broken in error["message"]
    assert client.zrange("predq:jobs", 0, -1) == jobs_before, "the refused upload left a job behind"
    client.close()


def test_a_worker_whose_store_fails_retries_without_using_up_attempts(models_dir, tmp_path_factory):
    """A worker that cannot read the store retries the chunk; the chunk's attempts are given back, so once a worker
    that reaches the store takes over, every row succeeds (none becomes chunk_failed)."""
    from api import create_app
    from shared import keys

    good = f"file://{tmp_path_factory.mktemp('chunks-good')}"
    wrong = f"file://{tmp_path_factory.mktemp('chunks-elsewhere')}"  # a folder the API never wrote to
    with RedisServer(dir=str(tmp_path_factory.mktemp("redis"))) as redis_server:
        app = create_app({"REDIS_URL": redis_server.url, "MODELS_DIR": models_dir, "CHUNK_STORE_URL": good})
        # A killed worker's unacknowledged message comes back after a few seconds, not the default 10 minutes.
        quick = {"VISIBILITY_TIMEOUT": "5", "UNACKED_RESTORE_INTERVAL": "1"}
        broken = CeleryWorker(redis_server.url, models_dir=models_dir, env={**quick, "CHUNK_STORE_URL": wrong},
                              log_dir=str(tmp_path_factory.mktemp("worker-wrong-store")))
        fixed = CeleryWorker(redis_server.url, models_dir=models_dir, env={**quick, "CHUNK_STORE_URL": good},
                             log_dir=str(tmp_path_factory.mktemp("worker-good-store")))
        try:
            broken.start()
            planted = data.planted_csv(400)
            body, content_type = data.multipart({"model": "fussy"}, planted.filename, planted.body)
            http = app.test_client()
            created = http.post("/v1/jobs", data=body, content_type=content_type)
            assert created.status_code == 202, created.json
            job_id = created.json["id"]
            retries = lambda: [line for line in broken.log().splitlines() if "retry: Retry in" in line]  # noqa: E731
            wait_for(lambda: len(retries()) >= 2, timeout=60, what="the worker to retry the chunk twice")
            assert all("has no blob" in line for line in retries())
            client = redis_server.client()
            # Had the failed deliveries counted, the chunk would be at 2 or 3 of its MAX_CHUNK_ATTEMPTS (3).
            assert int(client.hget(keys.attempts(job_id), 0) or 0) <= 1  # only a delivery under way may count
            broken.kill()
            fixed.start()

            def finished():
                job = http.get(f"/v1/jobs/{job_id}").json
                return job if job["status"] in TERMINAL else None

            job = wait_for(finished, timeout=120, what="the job to finish on the worker that reaches the store")
            n_bad = len(planted.errors)
            assert job["counts"] == {"total": 400, "succeeded": 400 - n_bad, "failed": n_bad, "skipped": 0}
            errors = orjson.loads(b"[" + b",".join(http.get(f"/v1/jobs/{job_id}/errors").data.splitlines()) + b"]")
            assert "chunk_failed" not in {e["code"] for e in errors}
            client.close()
        finally:
            for proc in (broken, fixed):
                if proc.running:
                    proc.stop()
