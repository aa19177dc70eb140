"""A finished run's files: results, errors and a manifest, written where its schedule says.

Each file is written under a temporary name and then renamed, and the manifest goes last, so a reader that
waits for `manifest.json` never sees half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import fsspec
import pyarrow as pa

from shared import blobs, writers
from shared.jobs import Job, JobStore, rfc3339


def _tables(store: JobStore, job: Job, kind: str):
    for blob in store.iter_blobs(job.id, kind, job.chunks_total if job.chunks_total is not None else job.chunks_seen):
        yield blobs.decode(blob)[0]


def _write(fs, path: str, pieces) -> dict:
    """Write pieces to `path` atomically; its size and sha256."""
    tmp = f"{path}.tmp-{os.urandom(6).hex()}"
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open(tmp, "wb") as f:
            for piece in pieces:
                digest.update(piece)
                size += len(piece)
                f.write(piece)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_run_output(store: JobStore, job: Job) -> dict:
    """Write a terminal run's results, errors and manifest to its output folder; returns the manifest."""
    assert job.run is not None and job.status.terminal
    fmt = job.run.get("format", "parquet")
    fs, root = fsspec.core.url_to_fs(job.run["output"])
    fs.makedirs(root, exist_ok=True)
    id_fields = [pa.field(job.options.id_column, pa.string())] if job.options.id_column else []
    results_schema = pa.schema([pa.field("row", pa.int64()), *id_fields, pa.field("prediction", pa.string())])
    errors_schema = pa.schema([pa.field("row", pa.int64()), *id_fields, pa.field("code", pa.string()),
                               pa.field("message", pa.string())])
    files = {
        f"results.{fmt}": _write(fs, f"{root}/results.{fmt}",
                                 writers.stream(fmt, _tables(store, job, "results"), results_schema)),
        f"errors.{fmt}": _write(fs, f"{root}/errors.{fmt}",
                                writers.stream(fmt, _tables(store, job, "errors"), errors_schema)),
    }
    manifest = {
        "job_id": job.id, "status": job.status.value, "schedule": job.run["name"], "slot": job.run["slot"],
        "date": job.run["date"], "source": job.source,
        "model": {"name": job.model, "version": job.version, "sha256": job.sha256},
        "counts": {"total": job.total, "succeeded": job.succeeded, "failed": job.failed, "skipped": job.skipped},
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "finished_at": rfc3339(job.finished_at), "written_at": rfc3339(time.time()), "files": files,
    }
    _write(fs, f"{root}/manifest.json", [json.dumps(manifest, indent=2).encode()])
    return manifest
