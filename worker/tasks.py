"""Thin Celery tasks: each unpacks its message and calls a plain function in shared/."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from functools import lru_cache

import redis
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from threadpoolctl import threadpool_limits

from shared.broker import delete_queue, own_queue
from shared.chunk import fail_chunk
from shared.chunk import process_chunk as run_chunk
from shared.chunkstore import open_chunk_store
from shared.dispatch import (
    CANARY,
    PROCESS_CHUNK,
    READ_SOURCE,
    RECONCILE,
    TICK_SCHEDULES,
    WRITE_OUTPUT,
    send_chunk,
    send_output,
    send_read,
)
from shared.durability import Durability
from shared.errors import ChunkStoreUnavailable
from shared.ingest import chunk_rows_for
from shared.ingest import read_source as run_read_source
from shared.jobs import TERMINAL, JobStore
from shared.logs import log_context
from shared.memory import release_freed_memory
from shared.outputs import write_run_output
from shared.reconcile import reconcile as run_reconcile
from shared.reconcile import sweep
from shared.redisio import connect
from shared.registry import Registry
from shared.runs import RunContext, tick
from shared.schedules import Schedule, load_schedules
from shared.settings import get_settings
from shared.workers import forget, pick_peer, record_canary, record_heartbeat, worker_queue
from worker.app import app

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return connect(get_settings().REDIS_URL)


@lru_cache(maxsize=1)
def _store() -> JobStore:
    s = get_settings()
    return JobStore(_redis(), result_ttl=s.RESULT_TTL, max_attempts=s.MAX_CHUNK_ATTEMPTS, stale_after=s.CHUNK_TIME_LIMIT * 2,
                    max_refusals=s.MAX_CHUNK_REFUSALS, blobs=open_chunk_store(s.CHUNK_STORE_URL))


@lru_cache(maxsize=1)
def _durability() -> Durability:
    return Durability(_redis(), get_settings().WAITAOF_TIMEOUT_MS)


@lru_cache(maxsize=1)
def _registry() -> Registry:
    s = get_settings()
    return Registry(s.MODELS_DIR, s.MODEL_RESCAN_SECONDS)


def _send(job_id: str, index: int) -> None:
    send_chunk(app, job_id, index)


def _reroute(job_id: str, index: int, refusers: Collection[str]) -> str | None:
    """Send a refused chunk to a worker that has not refused its job (its own queue), or back to the shared queue."""
    s = get_settings()
    target = pick_peer(_redis(), refusers, stale_after=s.WORKER_STALE_SECONDS, heartbeat_interval=s.HEARTBEAT_INTERVAL)
    send_chunk(app, job_id, index, worker_queue(target) if target else None)
    return target


def _reroute_read(job_id: str, refusers: Collection[str]) -> str | None:
    """Send a refused source read to a worker that has not refused its job, or back to the shared queue."""
    s = get_settings()
    target = pick_peer(_redis(), refusers, stale_after=s.WORKER_STALE_SECONDS, heartbeat_interval=s.HEARTBEAT_INTERVAL)
    send_read(app, job_id, worker_queue(target) if target else None)
    return target


def _finished(job_id: str) -> None:
    """A job just became terminal here: make that durable, and have a run's files written."""
    _durability().wait()
    job = _store().get(job_id)
    if job is not None and job.run is not None:
        send_output(app, job_id)


@lru_cache(maxsize=1)
def _schedules() -> dict[str, Schedule]:
    return load_schedules(get_settings().SCHEDULES_FILE)


def _run_context() -> RunContext:
    s = get_settings()
    return RunContext(store=_store(), registry=_registry(), source_roots=s.source_roots, window=s.JOB_QUEUE_WINDOW,
                      send_read=lambda job_id: send_read(app, job_id), result_ttl=s.RESULT_TTL)


@signals.worker_init.connect
def _load_models(**_: object) -> None:
    """Load every model's newest version before the pool forks: each pool process starts with them all, and a
    job's first chunks do not wait for a model file to be read (and its code imported) in every process."""
    _registry().load_all()


@signals.worker_process_init.connect
def _one_thread_per_process(**_: object) -> None:
    # Pool processes share the cores; native thread pools in each would oversubscribe them.
    threadpool_limits(1)
    _redis.cache_clear()
    _store.cache_clear()
    _durability.cache_clear()


@signals.celeryd_after_setup.connect
def _consume_own_queue(sender: str, instance, **_: object) -> None:
    instance.app.amqp.queues.select_add(own_queue(worker_queue(sender)))


_leaving = threading.Event()
_heartbeats: list[threading.Thread] = []


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_: object) -> None:
    name = sender.hostname
    s = get_settings()

    def beat() -> None:
        client = connect(s.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
        while not _leaving.is_set():
            try:
                record_heartbeat(client, name)
                app.send_task(CANARY, args=[name], queue=worker_queue(name), expires=s.WORKER_STALE_SECONDS)
            except Exception as e:  # noqa: BLE001 - Redis or broker down: keep trying, the ages tell the story
                log.warning("heartbeat or canary not sent: %s", e)
            _leaving.wait(s.HEARTBEAT_INTERVAL)

    _heartbeats.append(threading.Thread(target=beat, name="predq-heartbeat", daemon=True))
    _heartbeats[-1].start()


@signals.worker_shutdown.connect
def _leave(sender=None, **_: object) -> None:
    _leaving.set()  # a heartbeat or canary sent after this would bring back what is removed below
    for thread in _heartbeats:
        thread.join(timeout=15)
    try:
        forget(_redis(), sender.hostname)
    except redis.RedisError:
        pass
    try:
        delete_queue(app, worker_queue(sender.hostname))  # its canaries; the next start declares it again
    except Exception as e:  # noqa: BLE001 - broker away: the queue expires on its own (x-expires)
        log.warning("own queue not deleted: %s", e)


@app.task(name=CANARY, ignore_result=True)
def canary(name: str) -> None:
    """Runs on the worker it was sent to: proof that the worker takes tasks from its queues."""
    record_canary(_redis(), name)


@app.task(name=PROCESS_CHUNK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          autoretry_for=(redis.RedisError, SoftTimeLimitExceeded, ChunkStoreUnavailable), retry_backoff=2, retry_jitter=True,
          max_retries=get_settings().MAX_CHUNK_ATTEMPTS + 2)
def process_chunk(job_id: str, index: int) -> None:
    """Process one chunk of a job; duplicates and chunks of gone jobs are dropped by the store."""
    with log_context(job_id=job_id, chunk=index):  # on every line about the chunk; model and version join later
        _process_chunk(job_id, index)


def _process_chunk(job_id: str, index: int) -> None:
    s = get_settings()
    started = time.perf_counter()
    worker = process_chunk.request.hostname or ""
    try:
        outcome = run_chunk(_store(), _registry(), job_id, index, _send, compression=s.CHUNK_COMPRESSION,
                            max_predict_calls=s.BISECT_MAX_PREDICT_CALLS, worker=worker, reroute=_reroute)
    except (redis.RedisError, SoftTimeLimitExceeded, ChunkStoreUnavailable):
        raise  # transient or too slow: retried (a chunk store failure does not use up the chunk's attempts)
    except Exception as e:  # noqa: BLE001 - a bug must fail this chunk's rows, not leave the job running forever
        log.exception("chunk failed", extra={"job_id": job_id, "chunk": index})
        outcome = fail_chunk(_store(), job_id, index, f"an internal error stopped this chunk ({type(e).__name__})",
                             _send, s.CHUNK_COMPRESSION, worker=worker, started=started)
    if outcome in TERMINAL:
        _finished(job_id)
    release_freed_memory()  # what the chunk's buffers took; within the chunk, glibc reused them with no page faults
    log.info("chunk committed", extra={"job_id": job_id, "chunk": index, "outcome": outcome,
                                       "seconds": round(time.perf_counter() - started, 3)})


@app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> None:
    """Re-send chunks whose messages were lost, fail jobs whose input stopped arriving, sweep gone jobs' blobs."""
    s = get_settings()
    run_reconcile(_store(), _send, stale_after=s.STALE_CHUNK_SECONDS)
    sweep(_store())


@app.task(name=READ_SOURCE, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          soft_time_limit=get_settings().SOURCE_READ_TIME_LIMIT, time_limit=get_settings().SOURCE_READ_TIME_LIMIT + 30)
def read_source(job_id: str) -> None:
    """Read a source job's input into chunks; problems with the source end the job failed."""
    s = get_settings()
    outcome = run_read_source(
        _store(), _registry(), job_id, send=_send, reroute=_reroute_read, compression=s.CHUNK_COMPRESSION,
        roots=s.source_roots, stale_after=s.STALE_CHUNK_SECONDS, spool_dir=s.SPOOL_DIR,
        worker=read_source.request.hostname or "",
        chunk_rows=lambda n_columns, requested: chunk_rows_for(n_columns, requested, s.CHUNK_SIZE,
                                                               s.CHUNK_TARGET_CELLS, s.MAX_CHUNK_ROWS))
    if outcome in TERMINAL:
        _finished(job_id)
    log.info("source read", extra={"job_id": job_id, "outcome": outcome})


@app.task(name=TICK_SCHEDULES, ignore_result=True)
def tick_schedules() -> None:
    """Start the schedule runs that are due (each slot runs once, however many beats send this)."""
    started = tick(_run_context(), _schedules())
    if started:
        log.info("schedule runs started", extra={"jobs": started})


@app.task(name=WRITE_OUTPUT, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          autoretry_for=(OSError,), retry_backoff=5, max_retries=5)
def write_output(job_id: str) -> None:
    """Write a finished run's results, errors and manifest to its output location."""
    job = _store().get(job_id)
    if job is None or job.run is None or not job.status.terminal:
        return
    manifest = write_run_output(_store(), job)
    log.info("run output written", extra={"job_id": job_id, "output": job.run["output"],
                                          "files": list(manifest["files"])})
