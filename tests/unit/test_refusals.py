"""Workers whose copy of a job's model differs refuse its chunks without using up their attempts; commits name
their worker."""
from __future__ import annotations

import logging
import time

import fakeredis
import orjson
import pytest

from shared import keys
from shared.chunk import process_chunk
from shared.jobs import JobOptions, JobStore, Status
from shared.logs import JsonFormatter
from shared.registry import Registry
from shared.workers import pick_peer, record_canary, record_heartbeat
from tests.support import models as test_models
from tests.unit.test_jobs import _fill

GOOD, BAD = "celery@host-b", "celery@host-c"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """The copy of the models the jobs were created with."""
    root = tmp_path_factory.mktemp("models")
    test_models.install_test_models(root)
    return Registry(root)


@pytest.fixture(scope="module")
def other_registry(tmp_path_factory) -> Registry:
    """Another host's copy: `fussy` v1 is a different file (another training), so its sha256 differs."""
    root = tmp_path_factory.mktemp("other-models")
    test_models.install(root, "fussy", test_models.fussy_regressor())
    return Registry(root)


@pytest.fixture
def store() -> JobStore:
    return JobStore(fakeredis.FakeRedis(), result_ttl=3600, max_attempts=3, stale_after=300, max_refusals=4)


@pytest.fixture
def job_id(store, registry) -> str:
    """A job of two chunks of 5 rows, pinned to the sha256 of `registry`'s copy of `fussy`."""
    job_id = store.create(model="fussy", version="v1", sha256=registry.get("fussy").sha256, options=JobOptions(),
                          metadata={}, source_format="csv")
    _fill(store, job_id, [5, 5])
    return job_id


class Broker:
    """Records where chunks were sent: `None` for the shared queue, else a worker's own queue."""

    def __init__(self, peer: str | None = None):
        self.peer = peer
        self.sent: list[tuple[str, int, str | None]] = []
        self.refusers: list[set[str]] = []

    def send(self, job_id: str, index: int) -> None:
        self.sent.append((job_id, index, None))

    def reroute(self, job_id: str, index: int, refusers) -> str | None:
        self.refusers.append(set(refusers))
        self.sent.append((job_id, index, self.peer))
        return self.peer


def work(store, registry, job_id, index, worker, broker: Broker) -> str:
    return process_chunk(store, registry, job_id, index, broker.send, worker=worker, reroute=broker.reroute)


def test_a_worker_with_another_copy_refuses_and_leaves_the_chunk_to_another(store, registry, other_registry, job_id,
                                                                            caplog):
    """The refusing worker claims nothing, puts the chunk back for a peer, and logs why; the peer commits it."""
    broker = Broker(peer=GOOD)
    with caplog.at_level(logging.WARNING, logger="shared.chunk"):
        assert work(store, other_registry, job_id, 0, BAD, broker) == "refused"
    assert broker.sent == [(job_id, 0, GOOD)] and broker.refusers == [{BAD}]
    job = store.get(job_id)
    assert job.status is Status.QUEUED and job.error_code is None
    assert store.r.hget(keys.attempts(job_id), 0) is None and store.r.hget(keys.running(job_id), 0) is None
    assert float(store.r.hget(keys.sent(job_id), 0)) == pytest.approx(time.time(), abs=5)

    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    logged = orjson.loads(JsonFormatter().format(record))
    assert logged["level"] == "warning"
    assert logged["job_id"] == job_id and logged["chunk"] == 0 and logged["worker"] == BAD
    assert logged["worker_sha256"] == other_registry.get("fussy").sha256
    assert logged["job_sha256"] == registry.get("fussy").sha256 != logged["worker_sha256"]
    assert logged["sent_to"] == GOOD

    assert work(store, registry, job_id, 0, GOOD, broker) == "open"
    assert work(store, registry, job_id, 1, GOOD, broker) == "succeeded"
    assert store.committers(job_id) == {0: GOOD, 1: GOOD}
    assert store.get(job_id).succeeded == 10


def test_a_worker_without_the_model_refuses_too(store, registry, tmp_path, job_id):
    """A host that lacks the model version altogether hands the chunk back instead of failing the job."""
    broker = Broker()
    assert work(store, Registry(tmp_path), job_id, 0, BAD, broker) == "refused"
    assert broker.sent == [(job_id, 0, None)]
    assert store.refusers(job_id) == {BAD: ""}
    assert store.get(job_id).status is Status.QUEUED


def test_refusals_do_not_use_up_the_attempts_meant_for_crashes(store, registry, other_registry, job_id):
    """After two crashed attempts and several refusals, a worker with the right copy still gets its third attempt."""
    assert store.claim(job_id, 0)[:2] == ("run", 1)
    assert store.claim(job_id, 0)[:2] == ("run", 2)
    for _ in range(4):
        assert work(store, other_registry, job_id, 0, BAD, Broker()) == "refused"
    assert int(store.r.hget(keys.attempts(job_id), 0)) == 2
    assert work(store, registry, job_id, 0, GOOD, Broker()) == "open"
    assert store.r.hget(keys.errors(job_id), 0) is None  # predicted, not failed as a poison chunk
    assert store.get(job_id).succeeded == 5


def test_a_chunk_every_worker_refuses_fails_the_job_after_a_bounded_number_of_refusals(store, registry,
                                                                                        other_registry, job_id):
    """Refused more than max_refusals times, the job ends failed with model_not_found naming the copies found."""
    broker = Broker()
    outcomes = [work(store, other_registry, job_id, 0, BAD, broker) for _ in range(5)]
    assert outcomes == ["refused"] * 4 + ["failed"]
    assert len(broker.sent) == 4
    job = store.get(job_id)
    assert job.status is Status.FAILED and job.error_code == "model_not_found"
    assert "refused 5 times" in job.error_message
    assert f"{BAD} has {other_registry.get('fussy').sha256[:12]}" in job.error_message
    assert registry.get("fussy").sha256[:12] in job.error_message
    assert (job.succeeded, job.failed, job.skipped, job.total) == (0, 0, 10, 10)
    assert not store.r.exists(keys.refusals(job_id))  # cleaned up with the job's other working keys
    assert work(store, other_registry, job_id, 1, BAD, broker) == "done"  # a late message changes nothing


def test_refusals_of_a_stopping_or_finished_job_change_nothing(store, registry, other_registry, job_id):
    """A refused chunk of a cancelled job is skipped like any idle one; of a committed chunk, dropped."""
    assert work(store, registry, job_id, 0, GOOD, Broker()) == "open"
    assert work(store, other_registry, job_id, 0, BAD, Broker()) == "done"
    store.r.hset(keys.job(job_id), "stop", "cancel")
    assert work(store, other_registry, job_id, 1, BAD, Broker()) == "cancelled"
    assert store.refusers(job_id) == {}


def test_commits_record_their_worker_once(store, registry, job_id):
    """Each chunk names the worker that committed it; a duplicate commit is counted for nobody."""
    assert work(store, registry, job_id, 0, GOOD, Broker()) == "open"
    assert store.commit(job_id, 0, 5, 0, b"x", b"", worker=BAD)[0] == "duplicate"
    assert work(store, registry, job_id, 1, BAD, Broker()) == "succeeded"
    assert store.committers(job_id) == {0: GOOD, 1: BAD}
    assert store.committed_by(job_id) == {GOOD: 1, BAD: 1}
    pushed = {tuple(orjson.loads(k)): float(v) for k, v in store.r.hgetall(keys.METRICS).items()}
    assert {k[2]: v for k, v in pushed.items() if k[0] == "chunks"} == {GOOD: 1, BAD: 1}  # the per-worker metric
    assert store.r.ttl(keys.committers(job_id)) > 0  # kept as long as the job's results


def test_a_refused_chunk_goes_to_a_live_worker_that_has_not_refused_the_job():
    """Peers are workers that did not refuse: consuming ones first, then ones with a fresh heartbeat; else none."""
    busy, gone = "celery@host-d", "celery@host-e"
    r = fakeredis.FakeRedis()
    for name in (GOOD, BAD, busy):
        record_heartbeat(r, name)
    record_canary(r, GOOD)
    record_canary(r, BAD)
    r.hset(keys.WORKER_CANARIES, busy, repr(time.time() - 600))  # alive, its canary waiting behind long chunks
    r.hset(keys.WORKERS, gone, repr(time.time() - 600))
    assert {pick_peer(r, {BAD}, stale_after=60, heartbeat_interval=5) for _ in range(20)} == {GOOD}
    assert pick_peer(r, {BAD, GOOD}, stale_after=60, heartbeat_interval=5) == busy
    assert pick_peer(r, {BAD, GOOD, busy}, stale_after=60, heartbeat_interval=5) is None
