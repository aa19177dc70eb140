"""Worker liveness: a heartbeat says a worker process exists; a canary task that ran says it consumes."""
from __future__ import annotations

import random
import time
from collections.abc import Collection
from dataclasses import dataclass

import redis

from shared import keys

QUEUE_PREFIX = "predq.worker."
FORGET_AFTER = 24 * 3600  # a worker silent this long is dropped from the report


def worker_queue(name: str) -> str:
    """The queue only this worker consumes: canaries sent there prove that its consumer loop and pool work."""
    return QUEUE_PREFIX + name


def record_heartbeat(client: redis.Redis, name: str) -> None:
    client.hset(keys.WORKERS, name, repr(time.time()))


def record_canary(client: redis.Redis, name: str) -> None:
    client.hset(keys.WORKER_CANARIES, name, repr(time.time()))


def forget(client: redis.Redis, name: str) -> None:
    """A worker that stops cleanly leaves the report."""
    client.hdel(keys.WORKERS, name)
    client.hdel(keys.WORKER_CANARIES, name)


@dataclass
class WorkerState:
    name: str
    heartbeat_age: float | None
    canary_age: float | None
    status: str  # "consuming", "stalled" (alive, not consuming) or "gone"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "heartbeat_age_seconds": self.heartbeat_age,
                "canary_age_seconds": self.canary_age}


def worker_states(client: redis.Redis, *, stale_after: float, heartbeat_interval: float) -> list[WorkerState]:
    """Every known worker and whether it is consuming its queues now."""
    now = time.time()
    with client.pipeline(transaction=False) as p:
        p.hgetall(keys.WORKERS)
        p.hgetall(keys.WORKER_CANARIES)
        beats, canaries = p.execute()
    states = []
    for raw in sorted(set(beats) | set(canaries)):
        beat = now - float(beats[raw]) if raw in beats else None
        canary = now - float(canaries[raw]) if raw in canaries else None
        if min(a for a in (beat, canary, float("inf")) if a is not None) > FORGET_AFTER:
            forget(client, raw.decode())
            continue
        if canary is not None and canary <= stale_after:
            status = "consuming"
        elif beat is not None and beat <= 3 * heartbeat_interval:
            status = "stalled"
        else:
            status = "gone"
        states.append(WorkerState(raw.decode(), None if beat is None else round(beat, 1),
                                  None if canary is None else round(canary, 1), status))
    return states


def pick_peer(client: redis.Redis, refusers: Collection[str], *, stale_after: float,
              heartbeat_interval: float) -> str | None:
    """A worker that has not refused the job, chosen at random: one consuming its queues now, else one whose heartbeat
    is fresh (its canary may wait behind long chunks); None when there is neither."""
    states = [w for w in worker_states(client, stale_after=stale_after, heartbeat_interval=heartbeat_interval)
              if w.name not in refusers]
    for status in ("consuming", "stalled"):
        candidates = [w.name for w in states if w.status == status]
        if candidates:
            return random.choice(candidates)
    return None
