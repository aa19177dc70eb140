"""Counters the workers push through Redis, so that any web process can serve them on /metrics.

Workers are Celery pool processes, possibly on other machines: what they count goes into one Redis hash
(`keys.METRICS`), one field per series, incremented with HINCRBY. A field is the JSON list
`[metric, label values...]`. Counting never fails the work it counts: a Redis error here is logged and dropped.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator

import orjson
import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from shared import keys

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the chunk duration histogram; chunks are sized to take seconds, and are stopped
#: at CHUNK_SOFT_TIME_LIMIT (120 s by default).
CHUNK_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_LE = [floatToGoString(b) for b in CHUNK_SECONDS_BUCKETS] + ["+Inf"]

# Marks a terminal job counted, so that a status reached once is counted once (the Lua scripts that end jobs
# return a terminal status again when asked twice). Touches only the job's own hash.
# KEYS: job hash -> the status the first time, nil after
_FINISHED_ONCE = r"""
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'partially_succeeded' and status ~= 'failed' and status ~= 'cancelled' then
  return false
end
if redis.call('HSETNX', KEYS[1], 'finish_counted', '1') == 0 then return false end
return status
"""


def _field(*parts: str) -> str:
    return orjson.dumps(parts).decode()


def record_chunk(client: redis.Redis, model: str, succeeded: int, failed: int, seconds: float,
                 worker: str = "") -> None:
    """Count a chunk's first commit: its rows and how long it took by model, and the chunk by model and worker."""
    le = _LE[bisect.bisect_left(CHUNK_SECONDS_BUCKETS, seconds)]
    try:
        with client.pipeline(transaction=True) as p:
            p.hincrby(keys.METRICS, _field("rows_processed", model), succeeded + failed)
            p.hincrby(keys.METRICS, _field("rows_failed", model), failed)
            p.hincrby(keys.METRICS, _field("chunks", model, worker), 1)
            p.hincrby(keys.METRICS, _field("chunk_seconds_bucket", model, le), 1)
            p.hincrbyfloat(keys.METRICS, _field("chunk_seconds_sum", model), seconds)
            p.execute()
    except redis.RedisError as e:
        log.warning("chunk not counted in the metrics: %s", type(e).__name__)


def record_job_finished(client: redis.Redis, job_id: str) -> None:
    """Count a job that has just reached a terminal status, once however often this is called for it."""
    try:
        status = client.eval(_FINISHED_ONCE, 1, keys.job(job_id))
        if status:
            client.hincrby(keys.METRICS, _field("jobs_finished", status.decode()), 1)
    except redis.RedisError as e:
        log.warning("finished job not counted in the metrics: %s", type(e).__name__, extra={"job_id": job_id})


def families(client: redis.Redis) -> Iterator[Metric]:
    """The pushed counters as Prometheus metric families (raises RedisError when Redis does not answer)."""
    processed = CounterMetricFamily("predq_rows_processed", "Rows of batch jobs that workers predicted or failed, "
                                    "by model (each row counted once, however often its chunk ran).",
                                    labels=["model"])
    failed = CounterMetricFamily("predq_rows_failed", "Rows of batch jobs that ended with a row error, by model.",
                                 labels=["model"])
    chunks = CounterMetricFamily("predq_chunks_committed", "Chunks whose results workers committed, by model and "
                                 "by the worker that committed them (a chunk that ran twice is counted once).",
                                 labels=["model", "worker"])
    finished = CounterMetricFamily("predq_jobs_finished", "Jobs that reached a terminal status, by that status.",
                                   labels=["status"])
    duration = HistogramMetricFamily("predq_chunk_duration_seconds", "Seconds from a worker's claim of a chunk to "
                                     "its commit, for the commits that counted, by model.", labels=["model"])
    counters: dict[tuple, float] = {}
    for raw, value in client.hgetall(keys.METRICS).items():
        counters[tuple(orjson.loads(raw))] = float(value)
    models = sorted({k[1] for k in counters if k[0] == "chunks"})
    for key, value in sorted(counters.items()):
        if key[0] == "chunks":
            chunks.add_metric([key[1], key[2] if len(key) > 2 else ""], value)
    for model in models:
        processed.add_metric([model], counters.get(("rows_processed", model), 0))
        failed.add_metric([model], counters.get(("rows_failed", model), 0))
        buckets, total = [], 0.0
        for le in _LE:
            total += counters.get(("chunk_seconds_bucket", model, le), 0)
            buckets.append((le, total))
        duration.add_metric([model], buckets, counters.get(("chunk_seconds_sum", model), 0))
    for key, value in sorted(counters.items()):
        if key[0] == "jobs_finished":
            finished.add_metric([key[1]], value)
    return iter((processed, failed, chunks, duration, finished))
