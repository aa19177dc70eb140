"""Workers on other hosts: Redis, the API and beat on host a; the Procfile's worker on hosts b and c.

Hosts are network namespaces on one bridge (tests/support/netns.py), each with its own hostname, so each worker is
`celery@<its host>`. A worker host knows only REDIS_URL (host a's address) and its own copy of the models, and in
the `s3_cluster` also CHUNK_STORE_URL: chunk blobs in a bucket of moto's S3-compatible server on host a, which the
workers reach over the network as they reach Redis.
"""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import joblib
import numpy as np
import orjson
import pandas as pd
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared import keys
from shared.demo import record_sha256
from shared.registry import Registry
from shared.workers import forget
from tests.support import data, netns
from tests.support.models import FEATURES, training_frame
from tests.support.processes import wait_for

MODEL = "hosts_clf"
ROWS = 200_000
CHUNK_ROWS = 4_000  # 50 chunks
TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}

#: Every process of the cluster: a worker that vanishes is noticed within seconds, not the production minutes.
SETTINGS = {
    "VISIBILITY_TIMEOUT": "4",
    "UNACKED_RESTORE_INTERVAL": "1",
    "CHUNK_TIME_LIMIT": "20",
    "CHUNK_SOFT_TIME_LIMIT": "15",
    "STALE_CHUNK_SECONDS": "4",
    "RECONCILE_INTERVAL": "1",
    "HEARTBEAT_INTERVAL": "1",
    "WORKER_STALE_SECONDS": "10",
    "WORKER_CONCURRENCY": "1",
    "MODEL_RESCAN_SECONDS": "60",
}

pytestmark = pytest.mark.timeout(300)


def classifier(seed: int):
    """A plain scikit-learn pipeline (nothing from the tests in its pickle: worker hosts have only predq)."""
    X = training_frame(3000, seed)
    y = np.where(X["f0"] - X["f3"] + 0.3 * X["f1"] > 0, "yes", "no")
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)


def install(models_dir: Path, estimator) -> Path:
    """The model as an operator deploys it: the file and a model.json recording its sha256."""
    target = models_dir / MODEL / "v1"
    target.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, target / "model.joblib")
    record_sha256(target / "model.joblib")
    return models_dir


def _cluster(tmp_path_factory: pytest.TempPathFactory, chunk_store: str):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"cannot build separate hosts with network namespaces: {reason}")
    root = tmp_path_factory.mktemp(f"hosts-{chunk_store}")
    models_a = install(root / "models-a", classifier(seed=0))
    (root / "sources").mkdir()
    print(f"process logs under {root}")
    return netns.Cluster(root, str(models_a), {**SETTINGS, "SOURCE_ROOTS": str(root / "sources")},
                         chunk_store=chunk_store)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Chunk blobs in Redis."""
    with _cluster(tmp_path_factory, "redis") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def s3_cluster(tmp_path_factory: pytest.TempPathFactory):
    """Chunk blobs in a bucket of moto's S3 server on host a (CHUNK_STORE_URL for the API, beat and workers)."""
    with _cluster(tmp_path_factory, "s3") as cluster:
        yield cluster


@pytest.fixture(params=["redis", "s3"])
def any_cluster(request) -> netns.Cluster:
    """The cluster whose chunk blobs are in Redis, then the one whose blobs are in S3."""
    return request.getfixturevalue("cluster" if request.param == "redis" else "s3_cluster")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return training_frame(ROWS, seed=8)


@pytest.fixture(scope="module")
def csv_body(frame) -> bytes:
    return frame.to_csv(index=False, float_format="%.17g").encode()


def host_models(cluster: netns.Cluster, host: str) -> str:
    """A host's own copy of host a's models (the same files, so the same sha256)."""
    target = Path(cluster.root) / f"models-{host}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(cluster.models_dir, target)
    return str(target)


@pytest.fixture
def start_workers():
    """Start Procfile workers on a cluster's hosts (name -> models dir); at the end each is SIGKILLed by its process
    group and taken out of the workers' report, as a clean stop would (so the next test's refusals see only its own
    workers)."""
    started: list[tuple[netns.Cluster, netns.ProcfileProcess]] = []

    def start(cluster: netns.Cluster, models: dict[str, str]) -> dict[str, netns.ProcfileProcess]:
        procs = {host: cluster.worker(host, models_dir) for host, models_dir in models.items()}
        started.extend((cluster, proc) for proc in procs.values())
        cluster.wait_consuming(list(procs.values()))
        return procs

    try:
        yield start
    finally:
        for cluster, proc in started:
            cluster.stop_worker(proc)
            r = cluster.redis.client()
            try:
                forget(r, proc.name)
            finally:
                r.close()


@pytest.fixture
def workers(cluster, start_workers):
    """start_workers on the cluster whose chunk blobs are in Redis."""
    return lambda models: start_workers(cluster, models)


def submit(cluster: netns.Cluster, body, content_type: str) -> dict:
    response = requests.post(f"{cluster.api.url}/v1/jobs", data=body, timeout=180,
                             headers={**cluster.headers(), "Content-Type": content_type})
    assert response.status_code == 202, response.text
    return response.json()


def submit_source(cluster: netns.Cluster, csv_body: bytes) -> dict:
    """A job whose input a worker reads from a file every host sees (one file system, separate networks)."""
    source = Path(cluster.root) / "sources" / "rows.csv"
    source.write_bytes(csv_body)
    response = requests.post(f"{cluster.api.url}/v1/jobs", timeout=60, headers=cluster.headers(),
                             json={"model": MODEL, "source": f"file://{source}", "chunk_size": CHUNK_ROWS})
    assert response.status_code == 202, response.text
    return response.json()


def upload(csv_body: bytes) -> tuple[bytes, str]:
    return data.multipart({"model": MODEL, "chunk_size": str(CHUNK_ROWS)}, "rows.csv", csv_body)


def wait_done(cluster: netns.Cluster, job_id: str, timeout: float = 120) -> dict:
    def finished():
        job = requests.get(f"{cluster.api.url}/v1/jobs/{job_id}", headers=cluster.headers("admin"), timeout=10).json()
        return job if job["status"] in TERMINAL else None

    return wait_for(finished, timeout=timeout, interval=0.2, what=f"job {job_id} to finish")


def committers(cluster: netns.Cluster, job_id: str) -> dict[int, str]:
    r = cluster.redis.client()
    try:
        return {int(k): v.decode() for k, v in r.hgetall(keys.committers(job_id)).items()}
    finally:
        r.close()


def assert_exact(cluster: netns.Cluster, job: dict, frame: pd.DataFrame) -> None:
    """Every row predicted exactly once, as the model predicts it in this process."""
    assert job["status"] == "succeeded", job
    assert job["counts"] == {"total": len(frame), "succeeded": len(frame), "failed": 0, "skipped": 0}, job
    response = requests.get(f"{cluster.api.url}/v1/jobs/{job['id']}/results", headers=cluster.headers(), timeout=120)
    assert response.status_code == 200, response.text[:300]
    results = [orjson.loads(line) for line in response.content.splitlines()]
    rows = [r["row"] for r in results]
    assert not [row for row, n in Counter(rows).items() if n > 1], "rows in the results more than once"
    assert rows == list(range(len(frame)))
    expected = Registry(cluster.models_dir).get(MODEL).estimator.predict(frame[FEATURES])
    assert [r["prediction"] for r in results] == expected.tolist()


def test_a_job_runs_on_workers_of_two_hosts(cluster, workers, frame, csv_body):
    """Both worker hosts commit chunks of one job; the results are exact; admin keys see who committed what."""
    procs = workers({"b": host_models(cluster, "b"), "c": host_models(cluster, "c")})
    job = submit(cluster, *upload(csv_body))
    done = wait_done(cluster, job["id"])
    assert_exact(cluster, done, frame)

    names = {host: proc.name for host, proc in procs.items()}
    by_worker = Counter(committers(cluster, job["id"]).values())
    assert set(by_worker) == {names["b"], names["c"]}, by_worker
    assert sum(by_worker.values()) == -(-ROWS // CHUNK_ROWS)
    assert done["workers"] == dict(by_worker)
    team_view = requests.get(f"{cluster.api.url}/v1/jobs/{job['id']}", headers=cluster.headers(), timeout=10).json()
    assert "workers" not in team_view

    metrics = requests.get(f"{cluster.api.url}/metrics", headers=cluster.headers("admin"), timeout=10).text
    committed = {sample.labels["worker"]: sample.value
                 for family in text_string_to_metric_families(metrics) for sample in family.samples
                 if sample.name == "predq_chunks_committed_total"}
    for name in names.values():
        assert committed[name] >= by_worker[name]


def test_a_job_runs_on_two_hosts_with_its_chunk_blobs_in_s3(s3_cluster, start_workers, frame, csv_body):
    """Worker hosts told REDIS_URL, CHUNK_STORE_URL (a bucket on host a's S3 server) and their MODELS_DIR: both
    commit chunks, the results are exact, Redis holds only names of blobs, and the objects last until DELETE."""
    cluster = s3_cluster
    procs = start_workers(cluster, {"b": host_models(cluster, "b"), "c": host_models(cluster, "c")})
    job = submit(cluster, *upload(csv_body))
    done = wait_done(cluster, job["id"])
    assert_exact(cluster, done, frame)
    chunks = -(-ROWS // CHUNK_ROWS)
    by_worker = Counter(committers(cluster, job["id"]).values())
    assert set(by_worker) == {procs["b"].name, procs["c"].name}, by_worker
    assert sum(by_worker.values()) == chunks

    # Every chunk's results are an object in the bucket; the inputs went as their chunks committed.
    objects = cluster.objects(job["id"])
    assert sorted(int(name.split("/")[1].split(".")[0]) for name in objects if name.startswith("results/")) \
        == list(range(chunks)), sorted(objects)
    assert not [name for name in objects if name.startswith("inputs/")]
    blob_bytes = sum(size for name, size in objects.items() if name.startswith("results/"))
    assert blob_bytes > ROWS  # compressed, still a few bytes a row: 15 KB or so a chunk

    # Redis holds the names, not the bytes: each of the job's keys is small, all of them a sliver of the blobs.
    r = cluster.redis.client()
    try:
        names = r.hvals(keys.results(job["id"]))
        assert len(names) == chunks and all(n.decode().startswith(f"{job['id']}/results/") for n in names)
        sizes = {k: r.memory_usage(k) or 0 for k in keys.all_job_keys(job["id"]) if r.exists(k)}
        assert sizes[keys.results(job["id"])] < 100 * chunks, sizes  # a name per chunk, no chunk's bytes
        assert sum(sizes.values()) < blob_bytes / 20, (sizes, blob_bytes)

        response = requests.delete(f"{cluster.api.url}/v1/jobs/{job['id']}", headers=cluster.headers(), timeout=60)
        assert response.status_code == 204, response.text
        assert cluster.objects(job["id"]) == {}
        assert not [k for k in keys.all_job_keys(job["id"]) if r.exists(k)]
    finally:
        r.close()


def test_a_worker_host_cut_off_mid_job_leaves_the_job_to_the_other(any_cluster, start_workers, frame, csv_body):
    """Host b's link goes down after it committed chunks; host c finishes the job exactly, every later chunk its own.
    With blobs in S3 as well: b is cut from the bucket too, and c reads and writes every blob left."""
    cluster = any_cluster
    procs = start_workers(cluster, {"b": host_models(cluster, "b"), "c": host_models(cluster, "c")})
    b, c = procs["b"].name, procs["c"].name
    r = cluster.redis.client()
    known = set(r.zrange(keys.JOBS, 0, -1))
    at_cut: dict[str, set[int]] = {}

    def cut_host_b() -> None:
        """While the upload is paused: once b has committed chunks, cut it off, and note what was done or in flight."""
        def job_with_commits_of_b():
            new = [i.decode() for i in r.zrange(keys.JOBS, 0, -1) if i not in known]
            if new and sum(1 for w in committers(cluster, new[0]).values() if w == b) >= 2:
                return new[0]
            return None

        job_id = wait_for(job_with_commits_of_b, timeout=90, what="host b to commit two chunks")
        cluster.network.cut(cluster.network.hosts["b"])
        with r.pipeline(transaction=True) as p:
            p.smembers(keys.done(job_id))
            p.hkeys(keys.running(job_id))
            done, running = p.execute()
        at_cut["done"] = {int(i) for i in done}
        at_cut["in_flight"] = {int(i) for i in running} - at_cut["done"]

    try:
        pause_at = csv_body.index(b"\n", len(csv_body) * 2 // 5) + 1  # 40%: about 20 of the 50 chunks
        body, content_type = data.paused_multipart({"model": MODEL, "chunk_size": str(CHUNK_ROWS)}, "rows.csv",
                                                   csv_body, pause_at, cut_host_b)
        job = submit(cluster, body, content_type)
        done = wait_done(cluster, job["id"])
        assert_exact(cluster, done, frame)

        final = committers(cluster, job["id"])
        after_cut = set(final) - at_cut["done"] - at_cut["in_flight"]
        assert after_cut and {final[i] for i in after_cut} == {c}, "a chunk after the cut was not committed by c"
        assert len(final) == -(-ROWS // CHUNK_ROWS)
        assert sum(1 for w in final.values() if w == b) >= 2
        assert done["workers"] == dict(Counter(final.values()))
    finally:
        cluster.stop_worker(procs["b"])  # by its process group, while it is still cut off
        cluster.network.mend(cluster.network.hosts["b"])
        r.close()


def test_a_worker_host_with_another_model_copy_never_commits_its_chunks(cluster, workers, frame, csv_body):
    """Host c's model file differs (its own sha256): c refuses every chunk it gets, logging why; b does the job."""
    other = install(Path(cluster.root) / "models-c-other", classifier(seed=99))
    procs = workers({"b": host_models(cluster, "b"), "c": str(other)})
    job = submit(cluster, *upload(csv_body))
    done = wait_done(cluster, job["id"])
    assert_exact(cluster, done, frame)
    assert set(committers(cluster, job["id"]).values()) == {procs["b"].name}
    assert done["workers"] == {procs["b"].name: -(-ROWS // CHUNK_ROWS)}

    job_sha = Registry(cluster.models_dir).get(MODEL).sha256
    other_sha = Registry(str(other)).get(MODEL).sha256
    assert job["model"]["sha256"] == job_sha != other_sha
    refusals = [rec for rec in procs["c"].records()
                if rec.get("job_id") == job["id"] and rec.get("message", "").startswith("chunk refused")]
    assert refusals, "host c logged no refusal"
    for rec in refusals:
        assert rec["worker"] == procs["c"].name and rec["worker_sha256"] == other_sha and rec["job_sha256"] == job_sha
        assert rec["sent_to"] == procs["b"].name and isinstance(rec["chunk"], int)


def test_a_job_no_worker_has_the_model_for_fails_after_a_bounded_number_of_refusals(cluster, workers, frame):
    """The only worker has another copy: it refuses each chunk up to MAX_CHUNK_REFUSALS times, then the job fails."""
    other = install(Path(cluster.root) / "models-c-other", classifier(seed=99))
    procs = workers({"c": str(other)})
    small = frame.head(5 * CHUNK_ROWS).to_csv(index=False, float_format="%.17g").encode()
    job = submit(cluster, *upload(small))
    done = wait_done(cluster, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found", done
    other_sha = Registry(str(other)).get(MODEL).sha256
    assert f"{procs['c'].name} has {other_sha[:12]}" in done["error"]["message"]
    assert "refused 11 times" in done["error"]["message"]  # MAX_CHUNK_REFUSALS (10) + 1
    assert done["counts"] == {"total": 5 * CHUNK_ROWS, "succeeded": 0, "failed": 0, "skipped": 5 * CHUNK_ROWS}
    assert done["workers"] == {}
    refusals = [rec for rec in procs["c"].records()
                if rec.get("job_id") == job["id"] and rec.get("message", "").startswith("chunk refused")]
    assert refusals and all(rec["sent_to"] is None for rec in refusals)


def test_a_source_job_is_read_by_a_host_with_the_model_copy_it_was_created_with(cluster, workers, frame, csv_body):
    """Hosts b and c take source reads from one queue; c's copy of the model differs. Whichever gets the read, the
    job is read and predicted exactly by b: a read that reaches c is handed to b, and c says so in its log."""
    other = install(Path(cluster.root) / "models-c-other", classifier(seed=99))
    procs = workers({"b": host_models(cluster, "b"), "c": str(other)})
    job = submit_source(cluster, csv_body)
    done = wait_done(cluster, job["id"])
    assert_exact(cluster, done, frame)
    assert set(committers(cluster, job["id"]).values()) == {procs["b"].name}
    refusals = [rec for rec in procs["c"].records()
                if rec.get("job_id") == job["id"] and rec.get("message", "").startswith("source read refused")]
    assert all(rec["sent_to"] == procs["b"].name for rec in refusals), refusals


def test_a_source_job_no_worker_has_the_model_for_fails_after_a_bounded_number_of_refusals(cluster, workers, frame):
    """The only worker has another copy of the model: it hands the read back up to MAX_CHUNK_REFUSALS times, then
    the job fails, naming the copy it found."""
    other = install(Path(cluster.root) / "models-c-other", classifier(seed=99))
    procs = workers({"c": str(other)})
    job = submit_source(cluster, frame.head(5 * CHUNK_ROWS).to_csv(index=False, float_format="%.17g").encode())
    done = wait_done(cluster, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found", done
    other_sha = Registry(str(other)).get(MODEL).sha256
    assert f"{procs['c'].name} has {other_sha[:12]}" in done["error"]["message"]
    assert "its input's read was refused 11 times" in done["error"]["message"]  # MAX_CHUNK_REFUSALS (10) + 1
    assert done["counts"]["total"] == 0 and done["workers"] == {}
