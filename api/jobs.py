"""Batch jobs: create from JSON rows or a streamed upload, then status, listing, results, errors, cancel, delete."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from functools import partial

import pyarrow as pa
from flask import Blueprint, Response, request, stream_with_context

from api import schemas
from api.auth import current_principal
from api.openapi import operation, path, query
from api.parsing import (
    HashingStream,
    MultipartUpload,
    is_json,
    json_body_and_bytes,
    option_fields,
    parse_bool,
    validated,
)
from api.responses import json_response
from api.services import Services, services
from shared import blobs, writers
from shared.dispatch import send_chunk, send_output
from shared.errors import (
    EmptyInput,
    InvalidParameter,
    InvalidParameterValue,
    JobFinished,
    JobModelNotFound,
    JobNotFinished,
    JobNotFound,
    JobRunning,
    ModelNotFound,
    UnsupportedMediaType,
)
from shared.idempotency import Claim, Fingerprint, IdempotencyKeys
from shared.ingest import check_columns, chunk_rows_for, nonempty, store_chunks
from shared.jobs import TERMINAL, Job, JobOptions, Status
from shared.memory import release_freed_memory
from shared.readers import Batch, CsvPiece, Limits, detect_format, open_reader, records_batches
from shared.registry import ModelVersion
from shared.runs import create_source_job

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)

_RESERVED_ID_COLUMNS = ("row", "prediction", "code", "message")



def _resolve_model(req: schemas.JobRequest) -> ModelVersion:
    try:
        return services().registry.get(req.model, req.version)
    except ModelNotFound as e:
        raise JobModelNotFound(e.message) from e


def _check_options(req: schemas.JobRequest) -> None:
    if req.id_column in _RESERVED_ID_COLUMNS:
        raise InvalidParameterValue(
            f"id_column may not be named {req.id_column!r}: results already have a column of that name.",
            details={"fields": [{"name": "id_column", "code": "invalid_parameter", "message": "reserved name"}]})


def _chunk_rows(svc: Services, req: schemas.JobRequest, n_columns: int) -> int:
    s = svc.settings
    return chunk_rows_for(n_columns, req.chunk_size, s.CHUNK_SIZE, s.CHUNK_TARGET_CELLS, s.MAX_CHUNK_ROWS)


def _wanted(mv: ModelVersion, req: schemas.JobRequest) -> list[str]:
    return [f.name for f in mv.features] + ([req.id_column] if req.id_column else [])


def _ingest(svc: Services, mv: ModelVersion, req: schemas.JobRequest, source_format: str,
            batches: Iterable[Batch | CsvPiece], chunk_rows: int, claim: Claim | None,
            columns: list[str] | None = None) -> Job:
    """Create the job at the first batch, store and send each chunk as it fills, and close the input.

    `columns` are the file's own (CSV pieces are stored unparsed, with them). Any error before the input is
    complete removes the job and everything it wrote.
    """
    s = svc.settings
    wanted = _wanted(mv, req)
    batches = nonempty(batches)
    options = JobOptions(id_column=req.id_column, probabilities=req.probabilities, chunk_size=req.chunk_size,
                         max_error_rate=req.max_error_rate)
    job_id = svc.store.create(model=mv.name, version=mv.version, sha256=mv.sha256, options=options,
                              metadata=req.metadata or {}, source_format=source_format, window=s.JOB_QUEUE_WINDOW,
                              owner=current_principal().name)

    def before_chunk() -> None:
        svc.capacity.check()
        if claim is not None:
            svc.idempotency.renew(claim)

    try:
        chunker = store_chunks(svc.store, job_id, mv, batches, columns=columns or wanted, wanted=wanted,
                               chunk_rows=chunk_rows, compression=s.CHUNK_COMPRESSION,
                               send=partial(send_chunk, svc.celery), before_chunk=before_chunk,
                               limits=Limits.from_settings(svc.settings))
        svc.store.finish_ingest(job_id, chunker.total_rows, chunker.chunks)
        svc.durability.wait()
    except BaseException:
        svc.store.discard(job_id)
        raise
    job = svc.store.get(job_id)
    assert job is not None
    return job


def _from_json(svc: Services, claim: Claim | None) -> tuple[Job, str, bool]:
    raw, data = json_body_and_bytes(request, svc.settings.MAX_JSON_BYTES)
    fingerprint = Fingerprint({"query": sorted(request.args.items(multi=True))})
    fingerprint.update(raw)
    if claim is not None and not claim.acquired:
        return _earlier_job(claim, fingerprint.hexdigest())
    if isinstance(data, dict):
        merged = option_fields({k: v for k, v in request.args.items()})
        merged.update(data)
        data = merged
    req = validated(schemas.JobRequest, data)
    _check_options(req)
    if req.source is not None and req.rows is not None:
        raise InvalidParameter("Send either 'rows' or 'source', not both.",
                               details={"fields": [{"name": "source", "code": "invalid_parameter",
                                                    "message": "not with rows"}]})
    if req.source is not None:
        return _from_source(svc, req), fingerprint.hexdigest(), True
    mv = _resolve_model(req)
    if req.rows is None:
        raise InvalidParameter("The body needs 'rows' (an array of objects) or 'source'.",
                               details={"fields": [{"name": "rows", "code": "missing", "message": "Field required"}]})
    if not req.rows:
        raise EmptyInput("'rows' is empty; send at least one object.")
    wanted = _wanted(mv, req)
    if req.id_column and not any(isinstance(r, dict) and req.id_column in r for r in req.rows):
        check_columns(mv, [f.name for f in mv.features], req.id_column)
    size = _chunk_rows(svc, req, len(wanted))
    job = _ingest(svc, mv, req, "json", records_batches(req.rows, wanted, size, Limits.from_settings(svc.settings)),
                  size, claim)
    return job, fingerprint.hexdigest(), True


def _from_source(svc: Services, req: schemas.JobRequest) -> Job:
    """A job whose input a worker reads from an allowed URI; problems there end the job failed."""
    options = JobOptions(id_column=req.id_column, probabilities=req.probabilities, chunk_size=req.chunk_size,
                         max_error_rate=req.max_error_rate)
    try:
        return create_source_job(svc.run_context(), model=req.model, version=req.version, source=req.source,
                                 options=options, metadata=req.metadata or {}, owner=current_principal().name)
    except ModelNotFound as e:
        raise JobModelNotFound(e.message) from e


def _from_upload(svc: Services, claim: Claim | None) -> tuple[Job, str, bool]:
    upload = MultipartUpload(request)
    if not upload.read_until_file():
        raise InvalidParameter("The multipart body has no part named 'file'.",
                               details={"fields": [{"name": "file", "code": "missing", "message": "Field required"}]})
    fingerprint = Fingerprint({"query": sorted(request.args.items(multi=True)), "fields": upload.fields,
                               "filename": upload.filename})
    # Only a request with an Idempotency-Key is compared with an earlier one, so only then is the file hashed.
    stream = HashingStream(upload.file(), fingerprint if claim is not None else None)
    if claim is not None and not claim.acquired:
        stream.drain()
        return _earlier_job(claim, fingerprint.hexdigest())
    raw = option_fields({k: v for k, v in request.args.items()})
    raw.update(option_fields(upload.fields))
    req = validated(schemas.JobRequest, raw)
    _check_options(req)
    mv = _resolve_model(req)
    fmt = detect_format(upload.filename, upload.content_type)
    wanted = _wanted(mv, req)
    size = _chunk_rows(svc, req, len(wanted))
    # Batches no bigger than a chunk, so each chunk is sent as soon as its rows have arrived; CSV is cut into
    # pieces that workers parse.
    reader = open_reader(fmt, stream, wanted=wanted, batch_rows=size, spool_dir=svc.settings.SPOOL_DIR,
                         split_csv=True, limits=Limits.from_settings(svc.settings))
    with reader:
        check_columns(mv, reader.columns, req.id_column)
        job = _ingest(svc, mv, req, fmt, reader, size, claim, columns=reader.columns)
    stream.drain()
    return job, fingerprint.hexdigest(), True


def _earlier_job(claim: Claim, fingerprint: str) -> tuple[Job, str, bool]:
    """The job the first request with this key made, if this request is the same one."""
    IdempotencyKeys.check_same(claim, fingerprint)
    job = services().store.get(claim.job_id or "")
    if job is None:
        raise JobNotFound(f"The job {claim.job_id} made with this Idempotency-Key has been deleted or has expired.")
    return job, fingerprint, False


def _idempotency_claim(svc: Services) -> Claim | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidParameter("Idempotency-Key must be 1 to 255 printable characters.",
                               details={"fields": [{"name": "Idempotency-Key", "code": "invalid_parameter",
                                                    "message": "1 to 255 printable characters"}]})
    return svc.idempotency.claim(key, current_principal().name)


@bp.post("/v1/jobs")
@operation("post", "/v1/jobs", summary="Create a batch job",
           params=[query(n, {"type": "string"}, "An option, as in the JSON body.") for n in
                   ("model", "version", "id_column", "probabilities", "chunk_size", "max_error_rate", "metadata")]
           + [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"},
               "description": "The same key with the same request returns the first job (200) instead of a new one."}],
           body={"application/json": {"model": schemas.JobRequest},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                     "model": {"type": "string"}, "version": {"type": "string"}, "id_column": {"type": "string"},
                     "probabilities": {"type": "boolean"}, "chunk_size": {"type": "integer"},
                     "max_error_rate": {"type": "number"}, "metadata": {"type": "string"},
                     "file": {"type": "string", "format": "binary",
                              "description": "CSV with a header row, JSON Lines or Parquet; options go before it."}}}}},
           responses={200: schemas.Job, 202: schemas.Job, 400: None, 403: None, 409: None, 413: None, 415: None,
                      422: None, 503: None})
def create_job() -> Response:
    """Rows are split into chunks as they arrive; workers start on the first chunks before the upload ends.

    With an Idempotency-Key, the same request again answers 200 with the job the first one made.
    """
    svc = services()
    if is_json(request):
        read = _from_json
    elif request.mimetype == "multipart/form-data":
        read = _from_upload
    else:
        raise UnsupportedMediaType(f"Content type {request.mimetype or 'none'} is not accepted; send application/json "
                                   "with 'rows', or multipart/form-data with a 'file' part.")
    svc.capacity.check()
    claim = _idempotency_claim(svc)
    try:
        job, fingerprint, created = read(svc, claim)
    except BaseException:
        if claim is not None and claim.acquired:
            svc.idempotency.release(claim)
        raise
    finally:
        release_freed_memory()  # the upload's buffers, so that they are not kept resident until the next one
    if claim is not None and claim.acquired:
        svc.idempotency.complete(claim, fingerprint, job.id)
    if created:
        log.info("job created", extra={"job_id": job.id, "model": job.model, "version": job.version,
                                       "rows": job.total})
    return json_response(job.to_public(), 202 if created else 200, {"Location": f"/v1/jobs/{job.id}"})


def _job(job_id: str) -> Job:
    """The job, if the request's API key may see it: another key's job is as unknown as one that never existed."""
    job = services().store.get(job_id)
    if job is None or not current_principal().sees(job.owner):
        raise JobNotFound(f"No job {job_id!r}; it never existed or its results have expired.")
    return job


@bp.get("/v1/jobs")
@operation("get", "/v1/jobs", summary="List jobs, newest first",
           params=[query("status", {"type": "string", "enum": [s.value for s in Status]}),
                   query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                   query("cursor", {"type": "string"}, "next_cursor of the previous page.")],
           responses={200: schemas.JobList, 400: None})
def list_jobs() -> Response:
    """A page of jobs; pass `next_cursor` back as `cursor` for the next one."""
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in Status}:
        raise InvalidParameter(f"Unknown status {status!r}; use one of {', '.join(s.value for s in Status)}.",
                               details={"fields": [{"name": "status", "code": "invalid_parameter", "message": "unknown status"}]})
    raw_limit = request.args.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidParameter(f"limit must be a whole number from 1 to 100, not {raw_limit!r}.",
                               details={"fields": [{"name": "limit", "code": "invalid_parameter", "message": "1 to 100"}]})
    cursor = request.args.get("cursor") or None
    if cursor is not None and (not cursor.startswith("job_") or len(cursor) != 30):
        raise InvalidParameter("cursor is not one this service gave out; pass next_cursor from the previous page.",
                               details={"fields": [{"name": "cursor", "code": "invalid_parameter", "message": "unknown cursor"}]})
    principal = current_principal()
    owner = None if principal.sees_every_job else principal.name
    jobs, next_cursor = services().store.list(status=status, limit=int(raw_limit), cursor=cursor, owner=owner)
    return json_response({"data": [j.to_public() for j in jobs], "next_cursor": next_cursor})


@bp.get("/v1/jobs/<job_id>")
@operation("get", "/v1/jobs/{job_id}", summary="A job's status", params=[path("job_id")],
           responses={200: schemas.Job, 404: None})
def get_job(job_id: str) -> Response:
    """Status, counts, progress and speed of one job; for admin keys also the chunks each worker committed."""
    body = _job(job_id).to_public()
    if current_principal().sees_every_job:
        body["workers"] = services().store.committed_by(job_id)
    return json_response(body)


def _tables(job: Job, kind: str) -> Iterator[pa.Table]:
    chunk_count = job.chunks_total if job.chunks_total is not None else job.chunks_seen
    for blob in services().store.iter_blobs(job.id, kind, chunk_count):
        table, _ = blobs.decode(blob)
        yield table


def _then_release(body: Iterator[bytes]) -> Iterator[bytes]:
    """The body's pieces; once it is sent (or the client left), the memory its buffers took goes back."""
    try:
        yield from body
    finally:
        release_freed_memory()


def _download(job_id: str, kind: str, formats: tuple[str, ...]) -> Response:
    fmt = request.args.get("format", "jsonl")
    if fmt not in formats:
        raise InvalidParameter(f"format must be one of {', '.join(formats)}, not {fmt!r}.",
                               details={"fields": [{"name": "format", "code": "invalid_parameter", "message": "unknown format"}]})
    partial = parse_bool("partial", request.args.get("partial"))
    job = _job(job_id)
    if not job.status.terminal and not partial:
        raise JobNotFinished(f"Job {job_id} is {job.status.value}; wait for a terminal status or pass partial=true.")
    id_fields = [pa.field(job.options.id_column, pa.string())] if job.options.id_column else []
    if kind == "results":
        empty = pa.schema([pa.field("row", pa.int64()), *id_fields, pa.field("prediction", pa.string())])
    else:
        empty = pa.schema([pa.field("row", pa.int64()), *id_fields, pa.field("code", pa.string()),
                           pa.field("message", pa.string())])
    tables = _tables(job, kind)
    first = next(tables, None)  # a failing chunk store answers 503 here, before the response has begun
    body = writers.stream(fmt, itertools.chain([first] if first is not None else [], tables), empty)
    return Response(stream_with_context(_then_release(body)), mimetype=writers.MEDIA_TYPES[fmt], headers={
        "Content-Disposition": f'attachment; filename="{job_id}-{kind}.{fmt}"'})


@bp.get("/v1/jobs/<job_id>/results")
@operation("get", "/v1/jobs/{job_id}/results", summary="Download results",
           params=[path("job_id"), query("format", {"type": "string", "enum": ["jsonl", "csv", "parquet"], "default": "jsonl"}),
                   query("partial", {"type": "boolean"}, "Stream the rows finished so far of an unfinished job.")],
           responses={200: "application/x-ndjson", 400: None, 404: None, 409: None})
def results(job_id: str) -> Response:
    """One record per succeeded row, in input order."""
    return _download(job_id, "results", ("jsonl", "csv", "parquet"))


@bp.get("/v1/jobs/<job_id>/errors")
@operation("get", "/v1/jobs/{job_id}/errors", summary="Download row errors",
           params=[path("job_id"), query("format", {"type": "string", "enum": ["jsonl", "csv"], "default": "jsonl"}),
                   query("partial", {"type": "boolean"})],
           responses={200: "application/x-ndjson", 400: None, 404: None, 409: None})
def errors(job_id: str) -> Response:
    """One record per failed row, in input order: row, the id column, code, message."""
    return _download(job_id, "errors", ("jsonl", "csv"))


@bp.post("/v1/jobs/<job_id>/cancel")
@operation("post", "/v1/jobs/{job_id}/cancel", summary="Cancel a job", params=[path("job_id")],
           responses={202: schemas.Job, 404: None, 409: None})
def cancel(job_id: str) -> Response:
    """Chunks not yet started are skipped; finished ones stay downloadable."""
    svc = services()
    _job(job_id)
    outcome = svc.store.stop(job_id, "cancel")
    if outcome in TERMINAL:
        svc.durability.wait()
        if (job := svc.store.get(job_id)) is not None and job.run is not None:
            send_output(svc.celery, job_id)
    if outcome == "gone":
        raise JobNotFound(f"No job {job_id!r}; it never existed or its results have expired.")
    if outcome == "finished":
        raise JobFinished(f"Job {job_id} has already finished; there is nothing to cancel.")
    return json_response(_job(job_id).to_public(), 202)


@bp.delete("/v1/jobs/<job_id>")
@operation("delete", "/v1/jobs/{job_id}", summary="Delete a finished job and its results", params=[path("job_id")],
           responses={204: None, 404: None, 409: None})
def delete(job_id: str) -> Response:
    """A terminal job and its results are removed now; cancel a running job first."""
    job = _job(job_id)
    if not job.status.terminal:
        raise JobRunning(f"Job {job_id} is {job.status.value}; cancel it first, then delete it.")
    services().store.discard(job_id)
    return Response(status=204)
