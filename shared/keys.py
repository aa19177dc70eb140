"""Every Redis key predq writes, in one place.

A job's keys share the hash tag `{<job id>}` so a Lua script may touch all of them on a cluster too.
"""
from __future__ import annotations

PREFIX = "predq"

JOBS = f"{PREFIX}:jobs"                  # sorted set, all scores 0, members are job ids (lexically time-ordered)
ACTIVE_JOBS = f"{PREFIX}:jobs:active"    # set of ids of jobs not yet terminal
WORKERS = f"{PREFIX}:workers"            # hash: worker name -> last heartbeat of its main process (epoch seconds)
WORKER_CANARIES = f"{PREFIX}:workers:canary"  # hash: worker name -> when a canary task last ran on it
METRICS = f"{PREFIX}:metrics"            # hash: counters the workers push for /metrics (see shared/metrics.py)


def idempotency(key: str) -> str:
    """String: the state of an Idempotency-Key (in progress, or done with its job id and request digest)."""
    return f"{PREFIX}:idempotency:{key}"


def job(job_id: str) -> str:
    """Hash: the job record (status, counts, options, timestamps)."""
    return f"{PREFIX}:job:{{{job_id}}}"


def chunks(job_id: str) -> str:
    """Hash: chunk index -> number of input rows in it, written as the input is read."""
    return f"{job(job_id)}:chunks"


def inputs(job_id: str) -> str:
    """Hash: chunk index -> input blob (or its name in the chunk store), deleted once the chunk is committed."""
    return f"{job(job_id)}:inputs"


def results(job_id: str) -> str:
    """Hash: chunk index -> result blob (or its name in the chunk store)."""
    return f"{job(job_id)}:results"


def errors(job_id: str) -> str:
    """Hash: chunk index -> row-error blob (or its name in the chunk store)."""
    return f"{job(job_id)}:errors"


def done(job_id: str) -> str:
    """Set: indexes of committed chunks; membership is what makes a commit count once."""
    return f"{job(job_id)}:done"


def running(job_id: str) -> str:
    """Hash: chunk index -> when a worker last claimed it (epoch seconds)."""
    return f"{job(job_id)}:running"


def attempts(job_id: str) -> str:
    """Hash: chunk index -> deliveries so far (Redis cannot count redeliveries for us)."""
    return f"{job(job_id)}:attempts"


def sent(job_id: str) -> str:
    """Hash: chunk index -> when its message was last sent to the broker."""
    return f"{job(job_id)}:sent"


def committers(job_id: str) -> str:
    """Hash: chunk index -> name of the worker that committed it, written with the commit."""
    return f"{job(job_id)}:committers"


def refusals(job_id: str) -> str:
    """Hash: chunk index -> times workers refused it; `by:<worker>` -> the sha256 of that worker's model copy."""
    return f"{job(job_id)}:refusals"


def all_job_keys(job_id: str) -> list[str]:
    return [job(job_id), chunks(job_id), inputs(job_id), results(job_id), errors(job_id),
            done(job_id), running(job_id), attempts(job_id), sent(job_id), committers(job_id), refusals(job_id)]


def schedule_slot(name: str, slot_iso: str) -> str:
    """String: the job id of a schedule's slot once claimed (or a pending lease, or why it was skipped)."""
    return f"{PREFIX}:schedule:{name}:slot:{slot_iso}"


def schedule_runs(name: str) -> str:
    """Sorted set: a schedule's run job ids, scored by slot time."""
    return f"{PREFIX}:schedule:{name}:runs"


def schedule_mark(name: str) -> str:
    """String: the latest slot handled (ISO, UTC); slots after it are due."""
    return f"{PREFIX}:schedule:{name}:mark"


def schedule_skipped(name: str) -> str:
    """List: the latest slots skipped because the previous run still ran, newest first."""
    return f"{PREFIX}:schedule:{name}:skipped"
