"""Chunk blobs in object storage (a tmp file:// store) with the job state in fakeredis."""
from __future__ import annotations

import os

import fakeredis
import pytest

from shared import blobs, keys
from shared.chunkstore import FsspecBlobs, RedisBlobs
from shared.errors import ChunkStoreUnavailable
from shared.jobs import JobOptions, JobStore, Status
from shared.reconcile import sweep
from shared.registry import Registry
from tests.support import models as test_models
from tests.unit.test_jobs import _chunk_blob, _fill, run


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("models")
    test_models.install_test_models(root)
    return Registry(root)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "chunks"


@pytest.fixture
def store(root) -> JobStore:
    return JobStore(fakeredis.FakeRedis(), result_ttl=3600, max_attempts=3, stale_after=300,
                    blobs=FsspecBlobs(f"file://{root}"))


@pytest.fixture
def new_job(store, registry):
    sha256 = registry.get("fussy").sha256

    def create(s: JobStore = store, **options) -> str:
        return s.create(model="fussy", version="v1", sha256=sha256, options=JobOptions(**options), metadata={},
                        source_format="csv")

    return create


def _files(root, job_id: str) -> list[str]:
    base = root / job_id
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.exists() else []


def _results(store: JobStore, job_id: str) -> list[tuple[int, object]]:
    job = store.get(job_id)
    rows = []
    for blob in store.iter_blobs(job_id, "results", job.chunks_total):
        table, _ = blobs.decode(blob)
        rows.extend(zip(table.column("row").to_pylist(), table.column("prediction").to_pylist()))
    return rows


def test_put_get_delete_on_a_file_store(root):
    """A blob written under a name reads back whole, leaves no temporary file, and deletes."""
    store = FsspecBlobs(f"file://{root}")
    ref = store.put("job_0123456789abcdefghjkmnpqrs/results/0.ab", b"x" * 1000)
    assert ref == b"job_0123456789abcdefghjkmnpqrs/results/0.ab"
    assert store.get(ref) == b"x" * 1000
    assert store.get_many([ref, ref]) == [b"x" * 1000] * 2
    assert os.listdir(root / "job_0123456789abcdefghjkmnpqrs/results") == ["0.ab"]
    assert store.job_ids() == ["job_0123456789abcdefghjkmnpqrs"]
    store.delete([ref])
    with pytest.raises(ChunkStoreUnavailable, match="no blob"):
        store.get(ref)


def test_a_job_runs_with_only_names_in_redis(store, registry, new_job, root):
    """Results equal the Redis mode's; Redis keeps names only; inputs are gone once the job is terminal."""
    job_id = new_job()
    _fill(store, job_id, [100, 100, 50])
    assert _files(root, job_id) == ["inputs/0", "inputs/1", "inputs/2"]
    assert all(len(v) < 60 for v in store.r.hvals(keys.inputs(job_id)))
    assert [run(store, registry, job_id, i) for i in range(3)] == ["open", "open", "succeeded"]
    job = store.get(job_id)
    assert (job.total, job.succeeded, job.failed) == (250, 250, 0)
    names = store.r.hvals(keys.results(job_id))
    assert len(names) == 3 and all(n.startswith(f"{job_id}/results/".encode()) and len(n) < 60 for n in names)
    assert [f.split(".")[0] for f in _files(root, job_id)] == ["results/0", "results/1", "results/2"]

    reference = JobStore(fakeredis.FakeRedis(), result_ttl=3600)
    ref_id = new_job(reference)
    _fill(reference, ref_id, [100, 100, 50])
    for i in range(3):
        run(reference, registry, ref_id, i)
    assert _results(store, job_id) == _results(reference, ref_id)
    assert len(_results(store, job_id)) == 250


def test_a_duplicate_run_keeps_the_first_commit(store, registry, new_job, root):
    """Two runs of one chunk both write a blob; the first commit is served and the loser's blob is deleted."""
    job_id = new_job()
    _fill(store, job_id, [10, 10])
    outcome, _, _ = store.claim(job_id, 0)
    assert outcome == "run"
    first = blobs.encode(blobs.decode(_chunk_blob(0, 10))[0].select([blobs.ROW]).rename_columns(["row"]))
    assert store.commit(job_id, 0, 10, 0, first, b"")[0] == "open"
    committed = store.r.hget(keys.results(job_id), 0)
    assert store.commit(job_id, 0, 10, 0, b"second run", b"")[0] == "duplicate"
    assert store.r.hget(keys.results(job_id), 0) == committed
    assert _files(root, job_id) == ["inputs/1", committed.decode().split("/", 1)[1]]
    assert list(store.iter_blobs(job_id, "results", 2)) == [first]


def test_delete_removes_the_jobs_blobs(store, registry, new_job, root):
    """DELETE (JobStore.discard) removes the job's Redis keys and every blob under its name."""
    job_id = new_job()
    _fill(store, job_id, [10, 10])
    run(store, registry, job_id, 0)
    assert _files(root, job_id)
    store.discard(job_id)
    assert not (root / job_id).exists()
    assert not store.r.exists(keys.job(job_id))


def test_the_sweep_removes_blobs_of_expired_jobs_only(store, registry, new_job, root):
    """Once a job's Redis state has expired, the reconciler removes its blobs; live jobs keep theirs."""
    done, live = new_job(), new_job()
    _fill(store, done, [10])
    run(store, registry, done, 0)
    _fill(store, live, [10])
    store.r.delete(*keys.all_job_keys(done))  # what the result TTL does
    assert sweep(store) == 1
    assert not (root / done).exists()
    assert _files(root, live) == ["inputs/0"]
    assert run(store, registry, live, 0) == "succeeded"


def test_a_failing_store_is_retryable_and_costs_no_attempt(registry, tmp_path):
    """A store that cannot be written raises ChunkStoreUnavailable, and the chunk's attempt is given back."""
    good = FsspecBlobs(f"file://{tmp_path / 'chunks'}")
    client = fakeredis.FakeRedis()
    store = JobStore(client, result_ttl=3600, blobs=good)
    sha256 = registry.get("fussy").sha256
    job_id = store.create(model="fussy", version="v1", sha256=sha256, options=JobOptions(), metadata={},
                          source_format="csv")
    _fill(store, job_id, [10])
    (tmp_path / "blocker").write_text("a file where the store wants a directory")
    broken = JobStore(client, result_ttl=3600, blobs=FsspecBlobs(f"file://{tmp_path / 'blocker' / 'chunks'}"))
    with pytest.raises(ChunkStoreUnavailable, match="failed while writing"):
        broken.add_chunk(job_id, 1, 5, b"blob")
    with pytest.raises(ChunkStoreUnavailable, match="failed while reading"):
        broken.claim(job_id, 0)
    assert client.hget(keys.attempts(job_id), 0) == b"0"
    store.claim(job_id, 0)
    with pytest.raises(ChunkStoreUnavailable):
        broken.commit(job_id, 0, 10, 0, b"results", b"")
    assert client.hget(keys.attempts(job_id), 0) == b"0"
    assert run(store, registry, job_id, 0) == "succeeded"
    assert store.get(job_id).status == Status.SUCCEEDED


def test_redis_blobs_are_the_values_themselves():
    """The default store keeps blobs in the job's hashes: put and get are the identity."""
    store = RedisBlobs()
    assert store.put("job/results/0.t", b"data") == b"data" and store.get(b"data") == b"data"
    assert store.job_ids() == []
