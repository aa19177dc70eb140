"""The job store: a job is a thin view over a Redis hash; every change of state is one Lua script."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from shared import keys, lua, metrics
from shared.chunkstore import ChunkStore, RedisBlobs
from shared.errors import ChunkStoreUnavailable

log = logging.getLogger(__name__)


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.PARTIALLY_SUCCEEDED, Status.FAILED, Status.CANCELLED})

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


_id_lock = threading.Lock()
_last_id = [0, 0]  # (ms, random part) of the last id made by this process


def new_job_id(now: float | None = None) -> str:
    """A URL-safe id whose lexical order is its creation order (48-bit ms time + 80 random bits).

    Within one process, ids made in the same millisecond still sort in creation order.
    """
    ms = int((now or time.time()) * 1000)
    with _id_lock:
        if ms <= _last_id[0]:
            ms, rand = _last_id[0], _last_id[1] + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        _last_id[0], _last_id[1] = ms, rand
    value = (ms << 80) | rand
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "job_" + "".join(reversed(chars))


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class JobOptions:
    id_column: str | None = None
    probabilities: bool = False
    chunk_size: int | None = None
    max_error_rate: float | None = None


@dataclass
class Job:
    """A read-only view of one job's hash."""

    id: str
    status: Status
    model: str
    version: str
    sha256: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    total: int | None
    rows_read: int
    succeeded: int
    failed: int
    skipped: int
    chunks_total: int | None
    chunks_seen: int
    options: JobOptions
    metadata: dict
    error_code: str | None
    error_message: str | None
    stop: str | None
    source: str | None = None       # a URI the workers read the input from
    run: dict | None = None         # a schedule's run: schedule, slot, date, output, output_format
    owner: str | None = None        # name of the API key that created it; None: no key (a scheduled run)

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> Job:
        g = {k.decode(): v.decode() for k, v in h.items()}
        opt = lambda k: g.get(k) or None  # noqa: E731
        num = lambda k: float(g[k]) if g.get(k) else None  # noqa: E731
        return cls(
            id=g["id"], status=Status(g["status"]), model=g["model"], version=g["version"], sha256=g["sha256"],
            created_at=float(g["created_at"]), started_at=num("started_at"), finished_at=num("finished_at"),
            total=int(g["total"]) if g.get("total") else None, rows_read=int(g.get("rows_read", 0)),
            succeeded=int(g.get("succeeded", 0)), failed=int(g.get("failed", 0)), skipped=int(g.get("skipped", 0)),
            chunks_total=int(g["chunks_total"]) if g.get("chunks_total") else None,
            chunks_seen=int(g.get("chunks_seen", 0)),
            options=JobOptions(
                id_column=opt("id_column"), probabilities=g.get("probabilities") == "1",
                chunk_size=int(g["chunk_size"]) if g.get("chunk_size") else None,
                max_error_rate=num("max_error_rate"),
            ),
            metadata=json.loads(g.get("metadata") or "{}"),
            error_code=opt("error_code"), error_message=opt("error_message"), stop=opt("stop"),
            source=opt("source"), run=json.loads(g["run"]) if g.get("run") else None, owner=opt("owner"),
        )

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed

    def rows_per_second(self, now: float | None = None) -> float | None:
        if self.started_at is None or self.processed == 0:
            return None
        end = self.finished_at or now or time.time()
        return round(self.processed / max(end - self.started_at, 1e-3), 1)

    def to_public(self, now: float | None = None) -> dict[str, Any]:
        """The contract's Job object."""
        now = now or time.time()
        accounted = self.processed + self.skipped
        progress = None if self.total is None else (1.0 if self.total == 0 else round(accounted / self.total, 4))
        rps = self.rows_per_second(now)
        eta = None
        if self.status.terminal:
            eta = 0.0
        elif self.total is not None and rps:
            eta = round(max(self.total - accounted, 0) / rps, 1)
        error = {"code": self.error_code, "message": self.error_message} if self.error_code else None
        base = f"/v1/jobs/{self.id}"
        return {
            "id": self.id,
            "status": self.status.value,
            "model": {"name": self.model, "version": self.version, "sha256": self.sha256},
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "counts": {"total": self.total, "succeeded": self.succeeded, "failed": self.failed, "skipped": self.skipped},
            "progress": progress,
            "rows_per_second": rps,
            "eta_seconds": eta,
            "metadata": self.metadata,
            "schedule": ({k: self.run[k] for k in ("name", "slot", "date")} if self.run else None),
            "error": error,
            "links": {"self": base, "results": f"{base}/results", "errors": f"{base}/errors"},
        }


class JobStore:
    """Creates, reads and changes jobs in Redis; the only module that knows their keys' layout.

    Chunk blobs go through `blobs`: kept in the job's hashes (RedisBlobs, the default) or in object storage
    with only their names in the hashes (FsspecBlobs). Either way a commit counts once, in Lua.
    """

    def __init__(self, client: redis.Redis, *, result_ttl: int, max_attempts: int = 3, stale_after: float = 900,
                 max_refusals: int = 10, blobs: ChunkStore | None = None):
        self.r = client
        self.blobs: ChunkStore = blobs or RedisBlobs()
        self.result_ttl = result_ttl
        self.max_attempts = max_attempts
        self.stale_after = stale_after
        self.max_refusals = max_refusals
        self._add_chunk = client.register_script(lua.ADD_CHUNK)
        self._feed = client.register_script(lua.FEED)
        self._finish_ingest = client.register_script(lua.FINISH_INGEST)
        self._claim = client.register_script(lua.CLAIM_CHUNK)
        self._commit = client.register_script(lua.COMMIT_CHUNK)
        self._skip = client.register_script(lua.SKIP_CHUNK)
        self._refuse = client.register_script(lua.REFUSE_CHUNK)
        self._refuse_source = client.register_script(lua.REFUSE_SOURCE)
        self._stop = client.register_script(lua.STOP_JOB)
        self._release = client.register_script(lua.RELEASE_CHUNK)

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        return [keys.job(job_id), keys.chunks(job_id), keys.inputs(job_id), keys.results(job_id),
                keys.errors(job_id), keys.done(job_id), keys.running(job_id), keys.attempts(job_id),
                keys.sent(job_id), keys.ACTIVE_JOBS, keys.committers(job_id), keys.refusals(job_id)]

    # -- creation, while the input is read ----------------------------------------------------------
    def create(self, *, model: str, version: str, sha256: str, options: JobOptions, metadata: dict,
               source_format: str, window: int = 16, source: str | None = None, run: dict | None = None,
               owner: str | None = None) -> str:
        """A new job in `queued` state that is still reading its input; at most `window` chunks in the broker.

        `owner` is the name of the API key that asked for it: only that key and admin keys see the job.
        """
        now = time.time()
        job_id = new_job_id(now)
        fields = {
            "id": job_id, "status": Status.QUEUED.value, "model": model, "version": version, "sha256": sha256,
            "created_at": repr(now), "ingesting": "1", "format": source_format,
            "rows_read": 0, "succeeded": 0, "failed": 0, "skipped": 0, "chunks_done": 0, "chunks_seen": 0,
            "window": window, "sent_upto": 0, "queued": 0,
            "probabilities": "1" if options.probabilities else "0",
            "metadata": json.dumps(metadata),
        }
        if options.id_column:
            fields["id_column"] = options.id_column
        if options.chunk_size:
            fields["chunk_size"] = options.chunk_size
        if options.max_error_rate is not None:
            fields["max_error_rate"] = repr(options.max_error_rate)
        if source:
            fields["source"] = source
        if run:
            fields["run"] = json.dumps(run)
        if owner:
            fields["owner"] = owner
        with self.r.pipeline(transaction=True) as p:
            p.hset(keys.job(job_id), mapping=fields)
            p.zadd(keys.JOBS, {job_id: 0})
            p.sadd(keys.ACTIVE_JOBS, job_id)
            p.execute()
        return job_id

    def add_chunk(self, job_id: str, index: int, n_rows: int, blob: bytes) -> tuple[str, list[int]]:
        """Store one chunk's input: ('stored', chunks whose messages to send now), ('skipped', []) or ('gone', [])."""
        ref = self.blobs.put(f"{job_id}/inputs/{index}", blob)
        outcome, sends = self._with_sends(self._add_chunk(self._keys(job_id), [index, n_rows, ref, time.time()]))
        if outcome != "stored":
            self._forget_blobs([ref])
        return outcome, sends

    def feed(self, job_id: str) -> list[int]:
        """Chunks to send now to fill the job's window in the broker (after messages went missing)."""
        return [int(i) for i in self._feed(self._keys(job_id), [time.time()])]

    def finish_ingest(self, job_id: str, total: int, chunks_total: int) -> str:
        return self._settled(job_id, self._decode(
            self._finish_ingest(self._keys(job_id), [total, chunks_total, time.time(), self.result_ttl])))

    def discard(self, job_id: str) -> None:
        """Remove every trace of a job (a request that failed before its 202, or DELETE)."""
        with self.r.pipeline(transaction=True) as p:
            p.delete(*keys.all_job_keys(job_id))
            p.zrem(keys.JOBS, job_id)
            p.srem(keys.ACTIVE_JOBS, job_id)
            p.execute()
        try:
            self.blobs.delete_job(job_id)
        except ChunkStoreUnavailable as e:
            log.warning("blobs of a removed job left for the sweep: %s", e.message, extra={"job_id": job_id})

    def sweep_blobs(self) -> list[str]:
        """Remove the blobs of jobs whose Redis state is gone (expired, or deleted while the store failed)."""
        ids = self.blobs.job_ids()
        if not ids:
            return []
        with self.r.pipeline(transaction=False) as p:
            for job_id in ids:
                p.exists(keys.job(job_id))
            alive = p.execute()
        # A job's hash is written before any of its blobs, so a blob without one belongs to no live job.
        gone = [job_id for job_id, exists in zip(ids, alive) if not exists]
        for job_id in gone:
            self.blobs.delete_job(job_id)
        return gone

    def _forget_blobs(self, refs: list[bytes]) -> None:
        """Best-effort removal of blobs no commit refers to; the sweep removes what this misses."""
        try:
            self.blobs.delete([r for r in refs if r])
        except ChunkStoreUnavailable as e:
            log.warning("unreferenced chunk blobs left for the sweep: %s", e.message)

    def _settled(self, job_id: str, status: str) -> str:
        """After a step that may end the job: a terminal job is counted in the metrics (once), and its inputs are no
        longer needed."""
        if status in TERMINAL:
            metrics.record_job_finished(self.r, job_id)
            try:
                self.blobs.delete_job(job_id, "inputs")
            except ChunkStoreUnavailable as e:
                log.warning("inputs of a finished job left for the sweep: %s", e.message, extra={"job_id": job_id})
        return status

    def _release_attempt(self, job_id: str, index: int) -> None:
        """The chunk store failed, not the chunk: that delivery does not count against its attempts."""
        self._release(self._keys(job_id), [index])

    # -- the worker's side --------------------------------------------------------------------------
    def claim(self, job_id: str, index: int) -> tuple[str, int, bytes | None]:
        """Claim a chunk for processing: ('run', attempt, blob), ('poison', attempt, None) or (outcome, 0, None)."""
        reply = self._claim(self._keys(job_id), [index, time.time(), self.max_attempts])
        outcome = self._decode(reply[0])
        attempt = int(reply[1]) if len(reply) > 1 else 0
        blob = None
        if len(reply) > 2:
            try:
                blob = self.blobs.get(reply[2])
            except ChunkStoreUnavailable:
                self._release_attempt(job_id, index)
                raise
        return outcome, attempt, blob

    def commit(self, job_id: str, index: int, succeeded: int, failed: int, result_blob: bytes,
               error_blob: bytes, worker: str = "") -> tuple[str, list[int]]:
        """Commit a processed chunk once: ('duplicate', []) when it already was, else (the job's state, chunks to send).

        Blobs are stored first under names unique to this run; only the commit that counts keeps its names in
        Redis, and a refused one deletes its own blobs. `worker` (the committing worker's name) is recorded with
        the chunk.
        """
        token = os.urandom(6).hex()
        refs: list[bytes] = []
        try:
            for kind, blob in (("results", result_blob), ("errors", error_blob)):
                refs.append(self.blobs.put(f"{job_id}/{kind}/{index}.{token}", blob) if blob else b"")
        except ChunkStoreUnavailable:
            self._forget_blobs(refs)
            self._release_attempt(job_id, index)
            raise
        status, sends = self._with_sends(self._commit(
            self._keys(job_id),
            [index, succeeded, failed, refs[0], refs[1], time.time(), self.result_ttl, self.stale_after, worker],
        ))
        if status in ("duplicate", "gone"):
            self._forget_blobs(refs)
        else:
            self._forget_blobs([f"{job_id}/inputs/{index}".encode()])  # the committed chunk's input is done with
        return self._settled(job_id, status), sends

    def refuse(self, job_id: str, index: int, worker: str, worker_sha256: str) -> tuple[str, int]:
        """Hand a chunk back unclaimed (this worker's model copy differs): ('refused' or 'exhausted', refusals so far)
        or (like claim: 'gone', 'done', 'stop', 0). 'exhausted': it was refused more than max_refusals times."""
        reply = self._refuse(self._keys(job_id), [index, time.time(), worker, worker_sha256, self.max_refusals])
        return self._decode(reply[0]), (int(reply[1]) if len(reply) > 1 else 0)

    def refuse_source(self, job_id: str, worker: str, worker_sha256: str) -> tuple[str, int]:
        """Hand a source job's read back before it began (this worker's model copy differs): as `refuse`, with
        'done' also when another worker has begun the read."""
        reply = self._refuse_source(self._keys(job_id), [worker, worker_sha256, self.max_refusals])
        return self._decode(reply[0]), (int(reply[1]) if len(reply) > 1 else 0)

    def refusers(self, job_id: str) -> dict[str, str]:
        """Workers that refused chunks of the job: name -> the sha256 of their copy of its model ('' for none)."""
        found = self.r.hgetall(keys.refusals(job_id))
        return {k.decode()[3:]: v.decode() for k, v in found.items() if k.startswith(b"by:")}

    def committed_by(self, job_id: str) -> dict[str, int]:
        """Chunks of the job each worker committed (name -> count), skipped chunks aside."""
        counts: dict[str, int] = {}
        for name in self.r.hvals(keys.committers(job_id)):
            counts[name.decode()] = counts.get(name.decode(), 0) + 1
        return counts

    def committers(self, job_id: str) -> dict[int, str]:
        """The worker that committed each committed chunk (chunk index -> worker name)."""
        return {int(k): v.decode() for k, v in self.r.hgetall(keys.committers(job_id)).items()}

    def skip(self, job_id: str, index: int) -> str:
        reply = self._skip(self._keys(job_id), [index, time.time(), self.result_ttl])
        return self._settled(job_id, self._decode(reply[0]))

    def _with_sends(self, reply: list) -> tuple[str, list[int]]:
        return self._decode(reply[0]), [int(i) for i in reply[1:]]

    def stop(self, job_id: str, how: str, error_code: str = "", error_message: str = "") -> str:
        """Cancel ('cancel') or fail ('fail') a job: idle chunks are skipped now, running ones may finish."""
        return self._settled(job_id, self._decode(self._stop(
            self._keys(job_id), [how, time.time(), self.result_ttl, self.stale_after, error_code, error_message])))

    # -- reading ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        h = self.r.hgetall(keys.job(job_id))
        return Job.from_hash(h) if h and b"id" in h else None

    def list(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None,
             owner: str | None = None, max_scan: int = 5000) -> tuple[list[Job], str | None]:
        """Jobs newest first, only `owner`'s when given; the cursor is the last id of the previous page.

        A filtered page looks at no more than about `max_scan` jobs: it may then come back short, with a cursor to
        go on from, so that a key with few jobs among many cannot make one request read them all.
        """
        found: list[Job] = []
        upper = f"({cursor}" if cursor else "+"
        scanned = 0
        while len(found) < limit:
            if scanned >= max_scan:
                return found, upper[1:]
            ids = [i.decode() for i in self.r.zrevrangebylex(keys.JOBS, upper, "-", start=0, num=max(limit * 2, 50))]
            if not ids:
                return found, None
            scanned += len(ids)
            with self.r.pipeline(transaction=False) as p:
                for job_id in ids:
                    p.hgetall(keys.job(job_id))
                hashes = p.execute()
            expired = []
            for job_id, h in zip(ids, hashes):
                if not h:
                    expired.append(job_id)
                    continue
                job = Job.from_hash(h)
                if (status is None or job.status.value == status) and (owner is None or job.owner == owner):
                    found.append(job)
                    if len(found) == limit:
                        return found, job.id if self._has_older(job.id) else None
            if expired:
                self.r.zrem(keys.JOBS, *expired)
            upper = f"({ids[-1]}"
        return found, None

    def _has_older(self, job_id: str) -> bool:
        # A cheap hint: any older id at all. With a status filter the next page may come back empty.
        return bool(self.r.zrevrangebylex(keys.JOBS, f"({job_id}", "-", start=0, num=1))

    def iter_blobs(self, job_id: str, kind: str, chunk_count: int, batch: int = 8) -> Iterator[bytes]:
        """Result or error blobs of committed chunks, in input order, a few at a time."""
        key = keys.results(job_id) if kind == "results" else keys.errors(job_id)
        for start in range(0, chunk_count, batch):
            fields = list(range(start, min(start + batch, chunk_count)))
            refs = [ref for ref in self.r.hmget(key, fields) if ref is not None]
            yield from self.blobs.get_many(refs)

    def active_ids(self) -> list[str]:
        return [i.decode() for i in self.r.smembers(keys.ACTIVE_JOBS)]

    def forget_active(self, job_id: str) -> None:
        self.r.srem(keys.ACTIVE_JOBS, job_id)

    def last_read_at(self, job_id: str) -> float | None:
        """When the job's input last delivered a chunk (or the job was created), while it is being read."""
        read_at, created, ingesting = self.r.hmget(keys.job(job_id), ["read_at", "created_at", "ingesting"])
        if ingesting != b"1":
            return None
        return float(read_at or created or 0)

    def stale_chunks(self, job_id: str, now: float, stale_after: float) -> list[int]:
        """Chunks not committed whose last message or claim is older than `stale_after` seconds."""
        with self.r.pipeline(transaction=False) as p:
            p.hkeys(keys.inputs(job_id))
            p.smembers(keys.done(job_id))
            p.hgetall(keys.sent(job_id))
            p.hgetall(keys.running(job_id))
            pending, done, sent, running = p.execute()
        stale = []
        for raw in pending:
            if raw in done or raw not in sent:  # not sent yet: held back by the job's window, not lost
                continue
            last = max(float(sent.get(raw, 0)), float(running.get(raw, 0)))
            if now - last > stale_after:
                stale.append(int(raw))
        return sorted(stale)

    def active_overview(self) -> tuple[dict[str, int], float | None]:
        """Active jobs by status, and when the oldest chunk message still waiting in the broker was sent.

        A chunk waits from its last send until a worker claims it (a claim older than the send is a lost
        message the reconciler sent again). A committed chunk's send time is removed as it commits, so this
        reads each job's chunks on their way, not all of its chunks: two round trips for all active jobs.
        """
        ids = self.active_ids()
        with self.r.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hget(keys.job(job_id), "status")
                p.hgetall(keys.sent(job_id))
            replies = p.execute()
        by_status: dict[str, int] = {}
        waiting: list[tuple[str, dict]] = []
        for job_id, status, sent in zip(ids, replies[0::2], replies[1::2]):
            if status is None or Status(status.decode()).terminal:
                continue
            by_status[status.decode()] = by_status.get(status.decode(), 0) + 1
            if sent:
                waiting.append((job_id, sent))
        if not waiting:
            return by_status, None
        with self.r.pipeline(transaction=False) as p:
            for job_id, sent in waiting:
                idxs = list(sent)
                p.hmget(keys.running(job_id), idxs)
                p.smismember(keys.done(job_id), idxs)  # a chunk sent again by the reconciler as it committed
            replies = p.execute()
        oldest: float | None = None
        for (_, sent), claimed, done in zip(waiting, replies[0::2], replies[1::2]):
            for (idx, at), claimed_at, is_done in zip(sent.items(), claimed, done):
                at = float(at)
                if not is_done and float(claimed_at or 0) < at and (oldest is None or at < oldest):
                    oldest = at
        return by_status, oldest

    def input_blob(self, job_id: str, index: int) -> bytes | None:
        ref = self.r.hget(keys.inputs(job_id), index)
        return None if ref is None else self.blobs.get(ref)

    def begin_source_read(self, job_id: str) -> bool:
        """Mark a source job's input as being read; False when a reader already began (a redelivered task)."""
        now = repr(time.time())
        with self.r.pipeline(transaction=True) as p:
            p.hsetnx(keys.job(job_id), "read_started", now)
            p.hsetnx(keys.job(job_id), "read_at", now)
            first, _ = p.execute()
        return bool(first)

    def mark_sent(self, job_id: str, index: int) -> None:
        self.r.hset(keys.sent(job_id), index, repr(time.time()))

    @staticmethod
    def _decode(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)
