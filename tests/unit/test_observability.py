"""/metrics and the JSON logs: the app in-process on fakeredis, the job store's counters, the log context."""
from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Iterator

import fakeredis
import orjson
import pyarrow as pa
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared import blobs, keys
from shared import metrics as pushed
from shared.chunk import process_chunk
from shared.jobs import JobOptions, JobStore
from shared.logs import JsonFormatter, add_log_context, log_context
from shared.registry import Registry
from tests.support import models as test_models
from tests.support.processes import free_port

FEATURES = {f"f{i}": 0.5 for i in range(5)}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("models")
    test_models.install_test_models(root)
    return str(root)


@pytest.fixture
def app(models_dir) -> Iterator:
    """The app on a fakeredis job store (no Redis server needed)."""
    from api import create_app

    app = create_app({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "MODELS_DIR": models_dir})
    svc = app.extensions["predq"]
    fake = fakeredis.FakeRedis()
    app.extensions["predq"] = dataclasses.replace(svc, redis=fake, store=JobStore(fake, result_ttl=3600))
    yield app
    svc.redis.close()
    svc.celery.close()


def scrape(client) -> dict[str, object]:
    """The /metrics page parsed by prometheus_client's own parser: family name -> family."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}


def value(families: dict, sample_name: str, **labels: str) -> float:
    family = families[sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    found = [s.value for s in family.samples if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, f"{sample_name}{labels} in {family.samples}"
    return found[0]


def _chunk_blob(first_row: int, n: int, sentinel_at: tuple[int, ...] = ()) -> bytes:
    frame = test_models.training_frame(n, first_row)
    for i in sentinel_at:
        frame.loc[i, "f2"] = test_models.SENTINEL
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column(blobs.ROW, pa.array(range(first_row, first_row + n), type=pa.int64()))
    return blobs.encode(table)


def _job(store: JobStore, registry: Registry, sizes: list[int], sentinels: dict[int, tuple[int, ...]]) -> str:
    job_id = store.create(model="fussy", version="v1", sha256=registry.get("fussy").sha256, options=JobOptions(),
                          metadata={}, source_format="csv")
    start = 0
    for i, n in enumerate(sizes):
        store.add_chunk(job_id, i, n, _chunk_blob(start, n, sentinels.get(i, ())))
        start += n
    store.finish_ingest(job_id, sum(sizes), len(sizes))
    return job_id


# -- the page -------------------------------------------------------------------------------------------

def test_every_family_has_help_a_type_and_the_predq_prefix(app):
    """The whole page parses as Prometheus text; each family is predq_*, documented and typed, counters end _total."""
    client = app.test_client()
    client.post("/v1/models/fussy/predict", json=FEATURES)
    text = client.get("/metrics").get_data(as_text=True)
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert {"predq_redis_up", "predq_queue_length", "predq_queue_oldest_age_seconds", "predq_jobs",
            "predq_jobs_finished", "predq_rows_processed", "predq_rows_failed", "predq_chunks_committed",
            "predq_chunk_duration_seconds", "predq_http_request_duration_seconds", "predq_predictions",
            "predq_worker_heartbeat_age_seconds", "predq_predict_batch_size"} <= names
    for family in families:
        assert family.name.startswith("predq_") and family.documentation and family.type != "unknown", family
        if family.type == "counter":
            assert f"# TYPE {family.name}_total counter" in text
    assert "_created" not in text


def test_request_latency_is_labelled_by_route_method_and_status(app):
    """Each request is observed once under its URL rule (not its path), its method and its status."""
    client = app.test_client()
    for _ in range(3):
        assert client.post("/v1/models/fussy/predict", json=FEATURES).status_code == 200
    assert client.get("/v1/models/fussy/predict", query_string=FEATURES).status_code == 200
    assert client.post("/v1/models/nope/predict", json=FEATURES).status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert client.delete("/v1/models").status_code == 405
    for n in range(3):  # made-up methods share one label value
        assert client.open("/v1/models", method=f"BREW{n}").status_code == 405
    families = scrape(client)
    count = "predq_http_request_duration_seconds_count"
    route = "/v1/models/<name>/predict"
    assert value(families, count, route=route, method="POST", status="200") == 3
    assert value(families, count, route=route, method="GET", status="200") == 1
    assert value(families, count, route=route, method="POST", status="404") == 1
    assert value(families, count, route="unmatched", method="GET", status="404") == 1
    assert value(families, count, route="unmatched", method="DELETE", status="405") == 1
    assert value(families, count, route="unmatched", method="other", status="405") == 3
    buckets = [s for s in families["predq_http_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels.get("route") == route and s.labels["status"] == "200"
               and s.labels["method"] == "POST"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 3
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
    assert value(families, "predq_http_request_duration_seconds_sum", route=route, method="POST", status="200") > 0


def test_predictions_are_counted_by_model_and_version(app):
    """Single predictions count one each; an array counts its rows that got a prediction, not its bad rows."""
    client = app.test_client()
    client.post("/v1/models/fussy/predict", json=FEATURES)
    client.get("/v1/models/fussy_reg/predict", query_string=FEATURES)
    bad = dict(FEATURES, f1="x")
    body = client.post("/v1/models/fussy/predict", json=[FEATURES, bad, FEATURES]).json
    assert len(body["errors"]) == 1
    assert client.post("/v1/models/fussy/predict", json=bad).status_code == 422
    families = scrape(client)
    assert value(families, "predq_predictions_total", model="fussy", version="v1") == 3
    assert value(families, "predq_predictions_total", model="fussy_reg", version="v1") == 1


def test_store_state_is_read_at_scrape_time(app, models_dir):
    """Active jobs by status and the oldest queued chunk's age come from Redis; a Redis outage is redis_up 0."""
    client = app.test_client()
    store = app.extensions["predq"].store
    registry = Registry(models_dir)
    job_id = _job(store, registry, [5, 5], {})
    store.r.hset(keys.sent(job_id), mapping={0: 1000.0, 1: 2000.0})  # both messages waiting since then
    before = time.time()
    families = scrape(client)
    assert value(families, "predq_jobs", status="queued") == 1
    assert value(families, "predq_jobs", status="running") == 0
    assert value(families, "predq_jobs_active") == 1
    assert before - 1000 <= value(families, "predq_queue_oldest_age_seconds") <= time.time() - 1000
    store.claim(job_id, 0)  # a worker took the older message: the other one is now the oldest waiting
    before = time.time()
    families = scrape(client)
    assert value(families, "predq_jobs", status="running") == 1
    assert before - 2000 <= value(families, "predq_queue_oldest_age_seconds") <= time.time() - 2000

    # A committed chunk leaves `sent` (what a scrape reads is the chunks on their way, not all of a job's); one the
    # reconciler sent again as it committed is not waiting either.
    store.claim(job_id, 1)
    store.commit(job_id, 1, 5, 0, b"", b"")
    assert store.r.hkeys(keys.sent(job_id)) == [b"0"]
    store.r.hset(keys.sent(job_id), 1, 500.0)  # committed chunk 1, sent again long ago: not waiting
    store.mark_sent(job_id, 0)  # chunk 0's message sent again after its claim: waiting again, from now
    families = scrape(client)
    assert 0 <= value(families, "predq_queue_oldest_age_seconds") < 60

    nobody = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    app.extensions["predq"] = dataclasses.replace(app.extensions["predq"], redis=nobody)
    families = scrape(client)
    assert value(families, "predq_redis_up") == 0 and "predq_jobs" not in families


# -- what the workers push ------------------------------------------------------------------------------

def test_worker_counters_count_each_chunk_once(models_dir):
    """Rows, chunks and the duration histogram follow first commits only; a finished job is counted once."""
    store = JobStore(fakeredis.FakeRedis(), result_ttl=3600)
    registry = Registry(models_dir)
    job_id = _job(store, registry, [20, 20, 10], {0: (3, 7), 2: (1,)})
    commit = store.commit

    def second_delivery_commits_first(*args, **kwargs):
        store.commit = commit
        assert process_chunk(store, registry, job_id, 1, lambda j, i: None) == "open"
        return commit(*args, **kwargs)

    assert process_chunk(store, registry, job_id, 0, lambda j, i: None) == "open"
    store.commit = second_delivery_commits_first  # chunk 1 runs twice at once; its second commit is a duplicate
    assert process_chunk(store, registry, job_id, 1, lambda j, i: None) == "duplicate"
    assert process_chunk(store, registry, job_id, 2, lambda j, i: None) == "partially_succeeded"
    assert process_chunk(store, registry, job_id, 1, lambda j, i: None) == "done"  # delivered once more
    assert store.stop(job_id, "cancel") == "finished"
    store.skip(job_id, 2)  # answers the terminal status again

    families = {f.name: f for f in pushed.families(store.r)}
    job = store.get(job_id)
    assert (job.succeeded, job.failed) == (47, 3)
    assert value(families, "predq_rows_processed_total", model="fussy") == 50
    assert value(families, "predq_rows_failed_total", model="fussy") == 3
    assert value(families, "predq_chunks_committed_total", model="fussy", worker="") == 3  # no worker name given
    assert value(families, "predq_chunk_duration_seconds_count", model="fussy") == 3
    assert value(families, "predq_chunk_duration_seconds_sum", model="fussy") > 0
    assert value(families, "predq_jobs_finished_total", status="partially_succeeded") == 1
    assert [s.labels["status"] for s in families["predq_jobs_finished"].samples] == ["partially_succeeded"]


def test_chunk_durations_fall_in_their_buckets():
    """Each duration lands in the first bucket whose bound holds it; the page shows cumulative counts."""
    client = fakeredis.FakeRedis()
    for seconds in (0.05, 0.1, 0.7, 45.0, 1000.0):
        pushed.record_chunk(client, "m", 10, 1, seconds)
    (histogram,) = [f for f in pushed.families(client) if f.name == "predq_chunk_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert (buckets["0.1"], buckets["0.5"], buckets["1.0"], buckets["30.0"], buckets["60.0"]) == (2, 2, 3, 3, 4)
    assert (buckets["300.0"], buckets["+Inf"]) == (4, 5)
    assert value({"predq_chunk_duration_seconds": histogram}, "predq_chunk_duration_seconds_sum", model="m") == \
        pytest.approx(1045.85)


def test_counting_never_fails_the_work(caplog):
    """With Redis gone, recording logs a warning and returns: a commit that happened is not undone by its count."""
    server = fakeredis.FakeServer()
    server.connected = False
    dead = fakeredis.FakeRedis(server=server)
    pushed.record_chunk(dead, "m", 1, 0, 0.1)
    pushed.record_job_finished(dead, "job_x")
    assert [r.getMessage() for r in caplog.records] == ["chunk not counted in the metrics: ConnectionError",
                                                        "finished job not counted in the metrics: ConnectionError"]


# -- logs -----------------------------------------------------------------------------------------------

def _json_lines(run) -> list[dict]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("predq.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run(logger)
    finally:
        logger.removeHandler(handler)
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_log_context_fields_join_every_line_in_the_block():
    """Fields of the block and those added later in it are on each line; a line's own extras win; none leak out."""
    def run(logger):
        with log_context(job_id="job_1", chunk=4):
            logger.info("claimed")
            add_log_context(model="fussy", version="v1")
            logger.info("committed", extra={"outcome": "open", "chunk": 5})
        logger.info("after")

    claimed, committed, after = _json_lines(run)
    assert claimed["job_id"] == "job_1" and claimed["chunk"] == 4 and "model" not in claimed
    assert committed == dict(committed, job_id="job_1", chunk=5, model="fussy", version="v1", outcome="open")
    assert not {"job_id", "chunk", "model", "version"} & set(after)


def test_chunk_lines_logged_while_processing_carry_model_and_version(models_dir):
    """A line shared/chunk.py logs about a chunk (here a poison chunk) has its job id, index, model and version."""
    store = JobStore(fakeredis.FakeRedis(), result_ttl=3600, max_attempts=1)
    registry = Registry(models_dir)
    job_id = _job(store, registry, [4], {})
    store.claim(job_id, 0)  # its one allowed attempt was spent by a worker that died

    def run(logger):
        chunk_log = logging.getLogger("shared.chunk")
        chunk_log.addHandler(logger.handlers[0])
        try:
            with log_context(job_id=job_id, chunk=0):
                assert process_chunk(store, registry, job_id, 0, lambda j, i: None) == "failed"
        finally:
            chunk_log.removeHandler(logger.handlers[0])

    (line,) = _json_lines(run)
    assert line["level"] == "error" and "could not be processed" in line["message"]
    assert (line["job_id"], line["chunk"], line["model"], line["version"]) == (job_id, 0, "fussy", "v1")


def test_request_error_lines_name_the_route_and_the_job(app, caplog):
    """The API's line about a request that failed on Redis names the method, the route, the path and the job id."""
    nobody = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    app.extensions["predq"] = dataclasses.replace(app.extensions["predq"], redis=nobody,
                                                  store=JobStore(nobody, result_ttl=3600))
    assert app.test_client().get("/v1/jobs/job_abc").status_code == 503
    (record,) = [r for r in caplog.records if r.getMessage().startswith("Redis unavailable")]
    line = orjson.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in ("method", "route", "path", "job_id")} == {
        "method": "GET", "route": "/v1/jobs/<job_id>", "path": "/v1/jobs/job_abc", "job_id": "job_abc"}
