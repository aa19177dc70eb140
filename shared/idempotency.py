"""Idempotency keys: the same key with the same request returns the first job instead of making another."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import redis

from shared import keys
from shared.errors import PredqError


class IdempotencyConflict(PredqError):
    status, code = 409, "idempotency_conflict"


class IdempotencyInProgress(PredqError):
    status, code = 409, "idempotency_in_progress"


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Fingerprint:
    """A digest of what makes two requests the same: their options and their input bytes."""

    def __init__(self, options: dict) -> None:
        self._hash = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _redis_key(key: str, owner: str | None) -> str:
    """Each API key has its own Idempotency-Keys, so two clients choosing the same value never meet.

    Without API keys the plain form is used. An owner's form joins its name and the key with a tab, which
    neither a key name nor an Idempotency-Key (printable characters only) can hold, so no two forms collide.
    """
    return keys.idempotency(key if owner is None else f"{owner}\t{key}")


@dataclass
class Claim:
    """The outcome of claiming a key: ours to fill (`acquired`), or the job an earlier request made."""

    redis_key: str      # the Idempotency-Key, scoped to its owner
    lease: str          # the value we wrote while in progress; release deletes only that
    acquired: bool
    job_id: str | None = None
    fingerprint: str | None = None


class IdempotencyKeys:
    """Keys live in Redis: in progress (short lease, renewed while the input is read), then done (result TTL)."""

    def __init__(self, client: redis.Redis, *, lease_seconds: int, ttl: int):
        self.r = client
        self.lease_seconds = lease_seconds
        self.ttl = ttl
        self._release = client.register_script(_RELEASE)

    def claim(self, key: str, owner: str | None = None) -> Claim:
        """Take `owner`'s key for this request, or say which job it already made; 409 while another request holds it."""
        redis_key = _redis_key(key, owner)
        value = json.dumps({"state": "in_progress", "token": os.urandom(12).hex()})
        if self.r.set(redis_key, value, nx=True, ex=self.lease_seconds):
            return Claim(redis_key, value, acquired=True)
        raw = self.r.get(redis_key)
        if raw is None:  # it expired between the two calls: try once more
            return self.claim(key, owner)
        record = json.loads(raw)
        if record["state"] == "in_progress":
            raise IdempotencyInProgress(
                "A request with this Idempotency-Key is still being processed; retry when it has finished.",
                headers={"Retry-After": "5"})
        return Claim(redis_key, "", acquired=False, job_id=record["job_id"], fingerprint=record["fingerprint"])

    def renew(self, claim: Claim) -> None:
        """Keep the lease while a long upload is read (an API process that dies lets it lapse)."""
        self.r.expire(claim.redis_key, self.lease_seconds)

    def complete(self, claim: Claim, fingerprint: str, job_id: str) -> None:
        record = {"state": "done", "fingerprint": fingerprint, "job_id": job_id}
        self.r.set(claim.redis_key, json.dumps(record), ex=self.ttl)

    def release(self, claim: Claim) -> None:
        """Give the key up after a failed request, so that a corrected retry can use it."""
        self._release(keys=[claim.redis_key], args=[claim.lease])

    @staticmethod
    def check_same(claim: Claim, fingerprint: str) -> None:
        if fingerprint != claim.fingerprint:
            raise IdempotencyConflict(
                "This Idempotency-Key was used for a different request; use a new key for a new job.")
