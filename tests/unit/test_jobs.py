"""The job store's atomic steps, on fakeredis: chunks count once, jobs finalise once into the right status."""
from __future__ import annotations

import fakeredis
import pyarrow as pa
import pytest

from shared import blobs, keys
from shared.chunk import fail_chunk, process_chunk
from shared.jobs import JobOptions, JobStore, Status, new_job_id
from shared.reconcile import reconcile
from shared.registry import Registry
from tests.support import models as test_models


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("models")
    test_models.install_test_models(root)
    return Registry(root)


@pytest.fixture
def store() -> JobStore:
    return JobStore(fakeredis.FakeRedis(), result_ttl=3600, max_attempts=3, stale_after=300)


@pytest.fixture
def new_job(store, registry):
    """Creates a job of the `fussy` test model, pinned to its real sha256."""
    sha256 = registry.get("fussy").sha256

    def create(window: int = 16, **options) -> str:
        return store.create(model="fussy", version="v1", sha256=sha256, options=JobOptions(**options),
                            metadata={"k": "v"}, source_format="csv", window=window)

    return create


def _chunk_blob(first_row: int, n: int, sentinel_at: tuple[int, ...] = ()) -> bytes:
    frame = test_models.training_frame(n, first_row)
    for i in sentinel_at:
        frame.loc[i, "f2"] = test_models.SENTINEL
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column(blobs.ROW, pa.array(range(first_row, first_row + n), type=pa.int64()))
    return blobs.encode(table)


def run(store: JobStore, registry: Registry, job_id: str, index: int) -> str:
    """Process a chunk as a worker would, dropping the messages it would send."""
    return process_chunk(store, registry, job_id, index, lambda j, i: None)


def _fill(store: JobStore, job_id: str, sizes: list[int], **kw) -> None:
    start = 0
    for i, n in enumerate(sizes):
        assert store.add_chunk(job_id, i, n, _chunk_blob(start, n, **kw))[0] == "stored"
        start += n
    store.finish_ingest(job_id, sum(sizes), len(sizes))


def test_ids_sort_by_creation_time():
    """Job ids are URL-safe and their lexical order is their creation order."""
    a, b = new_job_id(1_700_000_000.0), new_job_id(1_700_000_000.5)
    assert a < b and len(a) == 30 and a.startswith("job_")


def test_job_runs_to_success(store, registry, new_job):
    """Every chunk committed once: the job ends succeeded with exact counts and keys expire."""
    job_id = new_job()
    _fill(store, job_id, [100, 100, 50])
    assert store.get(job_id).status == Status.QUEUED
    outcomes = [run(store, registry, job_id, i) for i in range(3)]
    assert outcomes == ["open", "open", "succeeded"]
    job = store.get(job_id)
    assert (job.total, job.succeeded, job.failed, job.skipped) == (250, 250, 0, 0)
    assert job.finished_at is not None and job.started_at is not None
    assert 0 < store.r.ttl(keys.job(job_id)) <= 3600
    assert not store.r.exists(keys.inputs(job_id))
    assert job.to_public()["progress"] == 1.0


def test_duplicate_commit_changes_nothing(store, registry, new_job):
    """A chunk delivered twice is counted once."""
    job_id = new_job()
    _fill(store, job_id, [10, 10])
    assert run(store, registry, job_id, 0) == "open"
    assert store.commit(job_id, 0, 10, 0, b"x", b"")[0] == "duplicate"
    assert run(store, registry, job_id, 0) == "done"
    assert run(store, registry, job_id, 1) == "succeeded"
    assert run(store, registry, job_id, 1) == "done"
    job = store.get(job_id)
    assert (job.succeeded, job.failed) == (20, 0)


def test_failing_rows_make_a_partial_success(store, registry, new_job):
    """Rows the model raises on become prediction_failed errors; the job is partially_succeeded."""
    job_id = new_job()
    _fill(store, job_id, [64], sentinel_at=(5, 40))
    assert run(store, registry, job_id, 0) == "partially_succeeded"
    errors, _ = blobs.decode(store.r.hget(keys.errors(job_id), 0))
    assert errors.column("row").to_pylist() == [5, 40]
    assert set(errors.column("code").to_pylist()) == {"prediction_failed"}


def test_cancel_skips_idle_chunks_and_keeps_finished_ones(store, registry, new_job):
    """Cancel: processed rows stay, the rest are skipped, and the counts add up."""
    job_id = new_job()
    _fill(store, job_id, [10, 20, 30])
    run(store, registry, job_id, 0)
    assert store.stop(job_id, "cancel") == "cancelled"
    job = store.get(job_id)
    assert job.status == Status.CANCELLED
    assert (job.succeeded, job.failed, job.skipped, job.total) == (10, 0, 50, 60)
    assert store.stop(job_id, "cancel") == "finished"
    assert run(store, registry, job_id, 1) == "done"


def test_cancel_waits_for_a_running_chunk(store, registry, new_job):
    """A chunk claimed before the cancel may still commit; the job ends when it does."""
    job_id = new_job()
    _fill(store, job_id, [10, 10])
    outcome, attempt, blob = store.claim(job_id, 0)
    assert (outcome, attempt) == ("run", 1)
    assert store.stop(job_id, "cancel") == "open"
    assert store.commit(job_id, 0, 10, 0, b"r", b"")[0] == "cancelled"
    job = store.get(job_id)
    assert (job.succeeded, job.skipped) == (10, 10)


def test_error_budget_fails_the_job(store, registry, new_job):
    """More failed rows than max_error_rate allows: the job fails and the rest is skipped."""
    job_id = new_job(max_error_rate=0.01)
    _fill(store, job_id, [100, 100, 100], sentinel_at=(1, 2))
    assert run(store, registry, job_id, 0) == "failed"
    job = store.get(job_id)
    assert job.error_code == "error_budget_exceeded"
    assert (job.succeeded, job.failed, job.skipped, job.total) == (98, 2, 200, 300)


def test_every_row_failing_fails_the_job(store, registry, new_job):
    job_id = new_job()
    _fill(store, job_id, [1], sentinel_at=(0,))
    assert run(store, registry, job_id, 0) == "failed"


def test_poison_chunk_fails_its_rows_after_the_allowed_attempts(store, registry, new_job):
    """A chunk claimed more times than allowed is not run again: its rows become chunk_failed."""
    job_id = new_job()
    _fill(store, job_id, [7])
    for attempt in (1, 2, 3):
        assert store.claim(job_id, 0)[:2] == ("run", attempt)
    assert run(store, registry, job_id, 0) == "failed"
    errors, _ = blobs.decode(store.r.hget(keys.errors(job_id), 0))
    assert errors.column("code").to_pylist() == ["chunk_failed"] * 7


def test_an_unexpected_error_fails_the_chunk_rows(store, registry, new_job):
    """A chunk whose processing hits a bug ends as chunk_failed rows instead of leaving the job running."""
    job_id = new_job()
    _fill(store, job_id, [4, 4])
    assert fail_chunk(store, job_id, 0, "an internal error stopped this chunk (KeyError)", lambda j, i: None) == "open"
    errors, _ = blobs.decode(store.r.hget(keys.errors(job_id), 0))
    assert errors.column("code").to_pylist() == ["chunk_failed"] * 4
    assert run(store, registry, job_id, 1) == "partially_succeeded"


def test_commit_to_a_deleted_job_is_dropped(store, registry, new_job):
    """A worker finishing a chunk of a job deleted meanwhile writes nothing."""
    job_id = new_job()
    _fill(store, job_id, [5])
    store.discard(job_id)
    assert run(store, registry, job_id, 0) == "gone"
    assert store.commit(job_id, 0, 5, 0, b"r", b"")[0] == "gone"
    assert not store.r.keys(f"*{job_id}*")


def test_reconciler_resends_stale_chunks_only(store, registry, new_job):
    """Chunks neither done nor claimed for too long are sent again; fresh and done ones are left alone."""
    job_id = new_job()
    _fill(store, job_id, [5, 5, 5])
    run(store, registry, job_id, 0)
    sent = []
    assert reconcile(store, lambda j, i: sent.append((j, i)), stale_after=300) == {"resent": 0, "fed": 0, "abandoned": 0}
    store.r.hset(keys.sent(job_id), mapping={1: 1.0, 2: 1.0})
    store.claim(job_id, 2)  # claimed just now: a worker has it
    assert reconcile(store, lambda j, i: sent.append((j, i)), stale_after=300) == {"resent": 1, "fed": 0, "abandoned": 0}
    assert sent == [(job_id, 1)]


def test_reconciler_fails_a_job_whose_input_stopped_arriving(store, registry, new_job):
    """An upload that died mid-way (API process gone) ends failed with every row accounted for."""
    job_id = new_job()
    store.add_chunk(job_id, 0, 5, _chunk_blob(0, 5))
    run(store, registry, job_id, 0)
    store.r.hset(keys.job(job_id), "read_at", 1.0)
    assert reconcile(store, lambda j, i: None, stale_after=300)["abandoned"] == 1
    job = store.get(job_id)
    assert job.status == Status.FAILED and job.error_code == "internal_error"
    assert (job.total, job.succeeded + job.failed + job.skipped) == (5, 5)
    assert reconcile(store, lambda j, i: None, stale_after=300) == {"resent": 0, "fed": 0, "abandoned": 0}


def test_job_stays_open_while_its_input_is_read(store, registry, new_job):
    """All chunks done but the input not finished: the job is not terminal yet."""
    job_id = new_job()
    store.add_chunk(job_id, 0, 5, _chunk_blob(0, 5))
    assert run(store, registry, job_id, 0) == "open"
    assert store.get(job_id).total is None
    assert store.finish_ingest(job_id, 5, 1) == "succeeded"


def test_a_job_keeps_only_its_window_of_chunks_in_the_broker(store, registry, new_job):
    """Chunks are sent in input order, at most `window` at a time; each commit lets the next one in."""
    job_id = new_job(window=2)
    sends = [store.add_chunk(job_id, i, 5, _chunk_blob(5 * i, 5))[1] for i in range(5)]
    assert sends == [[0], [1], [], [], []]
    store.finish_ingest(job_id, 25, 5)
    sent = []
    assert process_chunk(store, registry, job_id, 1, lambda j, i: sent.append(i)) == "open"
    assert sent == [2]
    assert process_chunk(store, registry, job_id, 1, lambda j, i: sent.append(i)) == "done"
    assert sent == [2]  # a duplicate frees nothing
    for i in (0, 2, 3):
        process_chunk(store, registry, job_id, i, lambda j, i: sent.append(i))
    assert sent == [2, 3, 4]
    assert process_chunk(store, registry, job_id, 4, lambda j, i: sent.append(i)) == "succeeded"
    assert store.stale_chunks(job_id, 1e12, 1) == []


def test_held_chunks_are_not_stale_and_the_reconciler_tops_up_the_window(store, registry, new_job):
    """Chunks held back by the window are not re-sent as lost; a window left short is filled again."""
    job_id = new_job(window=1)
    for i in range(3):
        store.add_chunk(job_id, i, 5, _chunk_blob(5 * i, 5))
    store.finish_ingest(job_id, 15, 3)
    assert store.stale_chunks(job_id, 1e12, 1) == [0]
    store.commit(job_id, 0, 5, 0, b"r", b"")  # committed, but the worker died before sending chunk 1
    sent = []
    assert reconcile(store, lambda j, i: sent.append(i), stale_after=300)["resent"] == 0
    assert sent == []  # chunk 1 was marked sent by the commit: only staleness brings it back
    store.r.hset(keys.sent(job_id), 1, 1.0)
    assert reconcile(store, lambda j, i: sent.append(i), stale_after=300) == {"resent": 1, "fed": 0, "abandoned": 0}
    assert sent == [1]


def test_listing_pages_newest_first(store, new_job):
    """The cursor walks the jobs newest first, filtered by status."""
    ids = [new_job() for _ in range(5)]
    page, cursor = store.list(limit=2)
    assert [j.id for j in page] == ids[::-1][:2]
    page2, cursor2 = store.list(limit=2, cursor=cursor)
    assert [j.id for j in page2] == ids[::-1][2:4]
    page3, cursor3 = store.list(limit=2, cursor=cursor2)
    assert [j.id for j in page3] == ids[:1] and cursor3 is None
    assert store.list(status="succeeded")[0] == []
