"""A source job's read offered to a worker whose copy of the model differs: handed back, never failed at once."""
from __future__ import annotations

import fakeredis
import pytest

from shared.ingest import read_source
from shared.jobs import JobOptions, JobStore, Status
from shared.registry import Registry
from tests.support import models as test_models

MAX_REFUSALS = 3


@pytest.fixture
def roots(tmp_path):
    source = tmp_path / "in" / "rows.csv"
    source.parent.mkdir()
    frame = test_models.training_frame(250, seed=3)
    frame.to_csv(source, index=False)
    return source, len(frame)


@pytest.fixture
def registries(tmp_path):
    """The job's copy of `fussy`, and another file of the same name and version (its own sha256)."""
    right, other = tmp_path / "models-right", tmp_path / "models-other"
    test_models.install_test_models(right)
    test_models.install(other, "fussy", test_models.fussy_regressor())
    return Registry(right), Registry(other)


@pytest.fixture
def store():
    return JobStore(fakeredis.FakeRedis(), result_ttl=3600, max_attempts=3, stale_after=300,
                    max_refusals=MAX_REFUSALS)


def _source_job(store: JobStore, registry: Registry, source) -> str:
    mv = registry.get("fussy")
    return store.create(model="fussy", version="v1", sha256=mv.sha256, options=JobOptions(chunk_size=100),
                        metadata={}, source_format="csv", source=f"file://{source}")


def _read(store, registry, job_id, worker, source, rerouted, sent=None):
    return read_source(store, registry, job_id, send=lambda j, i: (sent if sent is not None else []).append(i),
                       reroute=lambda j, refusers: rerouted.append(dict(refusers)) or None,
                       chunk_rows=lambda n, requested: requested or 100, compression="zstd",
                       roots=[str(source.parent)], stale_after=300, worker=worker)


def test_a_worker_with_another_copy_hands_the_read_back_and_the_right_one_reads_it(store, registries, roots):
    right, other = registries
    source, rows = roots
    job_id = _source_job(store, right, source)
    rerouted: list[dict] = []
    assert _read(store, other, job_id, "celery@c", source, rerouted) == "refused"
    job = store.get(job_id)
    assert job.status is Status.QUEUED and job.rows_read == 0  # not failed, nothing read
    assert rerouted == [{"celery@c": other.get("fussy").sha256}]

    sent: list[int] = []
    assert _read(store, right, job_id, "celery@b", source, rerouted, sent) in ("open", "running", "queued")
    job = store.get(job_id)
    assert job.total == rows and sent  # read in full by the worker with the job's copy
    assert _read(store, other, job_id, "celery@c", source, rerouted) == "done"  # once begun, no more refusals


def test_a_worker_without_the_model_refuses_too(store, registries, roots, tmp_path):
    right, _ = registries
    source, _ = roots
    job_id = _source_job(store, right, source)
    empty = Registry(tmp_path / "no-models")
    rerouted: list[dict] = []
    assert _read(store, empty, job_id, "celery@d", source, rerouted) == "refused"
    assert rerouted == [{"celery@d": ""}]


def test_a_read_refused_past_the_limit_fails_the_job_naming_each_copy(store, registries, roots):
    right, other = registries
    source, _ = roots
    job_id = _source_job(store, right, source)
    rerouted: list[dict] = []
    outcomes = [_read(store, other, job_id, "celery@c", source, rerouted) for _ in range(MAX_REFUSALS + 1)]
    assert outcomes == ["refused"] * MAX_REFUSALS + ["failed"]
    job = store.get(job_id)
    assert job.status is Status.FAILED and job.error_code == "model_not_found"
    assert f"celery@c has {other.get('fussy').sha256[:12]}" in job.error_message
    assert f"its input's read was refused {MAX_REFUSALS + 1} times" in job.error_message
    assert len(rerouted) == MAX_REFUSALS


def test_a_job_cancelled_before_its_read_settles_when_the_read_is_refused(store, registries, roots):
    right, other = registries
    source, _ = roots
    job_id = _source_job(store, right, source)
    store.stop(job_id, "cancel")
    assert _read(store, other, job_id, "celery@c", source, []) == "cancelled"
    assert store.get(job_id).status is Status.CANCELLED
