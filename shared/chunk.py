"""Processing one chunk: claim it, score its rows, commit results and row errors once."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

import numpy as np
import pyarrow as pa

from shared import blobs, metrics
from shared.errors import ModelNotFound
from shared.jobs import Job, JobStore
from shared.logs import add_log_context
from shared.prediction import predict, validate
from shared.readers import CsvPiece, parse_csv_piece
from shared.registry import ModelVersion, Registry

log = logging.getLogger(__name__)
Send = Callable[[str, int], None]
#: Puts a refused chunk's message back for another worker, given the workers that refused the job so far; returns
#: the worker it was sent to, or None when it went back to the shared queue.
Reroute = Callable[[str, int, Collection[str]], str | None]


def read_input(blob: bytes, parse: bool = True) -> tuple[pa.Table, list]:
    """A chunk's rows (with ``__row``) and the row errors found in reading them.

    CSV pieces are parsed here, in the worker. With parse=False (a chunk that failed every attempt, which may
    be the parse's fault) a piece gives only its row positions.
    """
    if not blobs.is_csv(blob):
        return blobs.decode(blob)
    data, layout = blobs.decode_csv(blob)
    piece = CsvPiece(data, layout["rows"], layout["base"])
    if not parse:
        return pa.table({blobs.ROW: pa.array(range(piece.base, piece.base + piece.rows), type=pa.int64())}), []
    return parse_csv_piece(piece, layout["columns"], layout["wanted"], layout["floats"])


def _id_values(table: pa.Table, id_column: str | None, positions: np.ndarray) -> pa.Array | None:
    if not id_column or id_column not in table.column_names:
        return None
    return table.column(id_column).take(pa.array(positions, type=pa.int64())).combine_chunks()


def _errors_table(rows: list[int], codes: list[str], messages: list[str], id_column: str | None,
                  ids: list | None) -> pa.Table:
    columns: dict[str, pa.Array | list] = {"row": pa.array(rows, type=pa.int64())}
    if id_column:
        columns[id_column] = pa.array(ids if ids is not None else [None] * len(rows), type=pa.string())
    columns["code"] = pa.array(codes, type=pa.string())
    columns["message"] = pa.array(messages, type=pa.string())
    return pa.table(columns)


def score_table(mv: ModelVersion, table: pa.Table, pre_errors: list, job: Job,
                max_predict_calls: int) -> tuple[pa.Table, pa.Table]:
    """Results and row errors of one chunk, both ordered by input row."""
    id_column = job.options.id_column
    columns = {f.name: table.column(f.name) for f in mv.features if f.name in table.column_names}
    validation = validate(mv, columns, table.num_rows, blobs.json_mixed_columns(table.schema))
    scored = predict(mv, validation, job.options.probabilities, max_predict_calls)
    row_numbers = table.column(blobs.ROW).to_numpy()

    results: dict[str, pa.Array] = {"row": pa.array(row_numbers[scored.positions], type=pa.int64())}
    ids = _id_values(table, id_column, scored.positions)
    if ids is not None:
        results[id_column] = ids
    results["prediction"] = pa.array(scored.predictions)
    if scored.probabilities is not None:
        for k, cls in enumerate(mv.classes or []):
            results[f"probability_{cls}"] = pa.array(scored.probabilities[:, k], type=pa.float64())

    err_rows = row_numbers[scored.error_positions].tolist()
    err_ids = _id_values(table, id_column, scored.error_positions)
    err_ids = [None if v is None else str(v) for v in err_ids.to_pylist()] if err_ids is not None else None
    rows, codes, messages = err_rows, list(scored.error_codes), list(scored.error_messages)
    ids_list = err_ids if err_ids is not None else [None] * len(rows)
    for row, code, message in pre_errors:
        rows.append(row)
        codes.append(code)
        messages.append(message)
        ids_list.append(None)
    order = np.argsort(rows, kind="stable")
    errors = _errors_table([rows[i] for i in order], [codes[i] for i in order], [messages[i] for i in order],
                           id_column, [ids_list[i] for i in order] if id_column else None)
    return pa.table(results), errors


def failed_chunk_errors(table: pa.Table, pre_errors: list, job: Job, message: str) -> pa.Table:
    """Every row of a chunk that could not be processed becomes a chunk_failed error."""
    row_numbers = table.column(blobs.ROW).to_pylist()
    ids = None
    if job.options.id_column and job.options.id_column in table.column_names:
        ids = [None if v is None else str(v) for v in table.column(job.options.id_column).to_pylist()]
    rows = row_numbers + [e[0] for e in pre_errors]
    codes = ["chunk_failed"] * len(row_numbers) + [e[1] for e in pre_errors]
    messages = [message] * len(row_numbers) + [e[2] for e in pre_errors]
    all_ids = (ids or [None] * len(row_numbers)) + [None] * len(pre_errors)
    order = np.argsort(rows, kind="stable")
    return _errors_table([rows[i] for i in order], [codes[i] for i in order], [messages[i] for i in order],
                         job.options.id_column, [all_ids[i] for i in order] if job.options.id_column else None)


def fail_chunk(store: JobStore, job_id: str, index: int, message: str, send: Send, compression: str = "zstd",
               worker: str = "", started: float | None = None) -> str:
    """Commit every row of a chunk as chunk_failed (after an unexpected error in processing it).

    `started` is when the attempt that failed began (time.perf_counter()), for the chunk duration metric.
    """
    job = store.get(job_id)
    blob = store.input_blob(job_id, index)
    if job is None or blob is None:
        return "gone"
    add_log_context(model=job.model, version=job.version)
    table, pre_errors = read_input(blob, parse=False)
    errors = failed_chunk_errors(table, pre_errors, job, message)
    started = time.perf_counter() if started is None else started
    return _commit(store, send, job, index, started, 0, errors.num_rows, b"", blobs.encode(errors, compression),
                   worker=worker)


def _commit(store: JobStore, send: Send, job: Job, index: int, started: float, succeeded: int, failed: int,
            result_blob: bytes, error_blob: bytes, *, worker: str) -> str:
    """Commit a chunk, send the chunks its commit let into the job's window, and count it if it was the first."""
    status, to_send = store.commit(job.id, index, succeeded, failed, result_blob, error_blob, worker=worker)
    for next_index in to_send:
        send(job.id, next_index)
    if status not in ("duplicate", "gone"):
        metrics.record_chunk(store.r, job.model, succeeded, failed, time.perf_counter() - started, worker)
    return status


def model_copy(registry: Registry, job: Job) -> ModelVersion | None:
    """This worker's copy of the job's model version, or None when it has none."""
    try:
        return registry.get(job.model, job.version)
    except ModelNotFound:
        return None


def _short(sha256: str) -> str:
    return f"{sha256[:12]}..." if sha256 else "none"


def no_worker_has_the_model(store: JobStore, job: Job, what: str) -> str:
    """The failure message of a job that only workers with other copies of its model were offered."""
    copies = ", ".join(f"{name} has {_short(sha)}" for name, sha in sorted(store.refusers(job.id).items()))
    return (f"No worker has model {job.model!r} version {job.version!r} with the sha256 {_short(job.sha256)} this "
            f"job was created with: {what} ({copies}). Deploy the same model file to every worker.")


def _refuse(store: JobStore, job: Job, index: int, found: str, worker: str, send: Send,
            reroute: Reroute | None) -> str:
    """Leave a chunk to workers whose copy of the model is the job's; fail the job once it was refused too often."""
    outcome, refusals = store.refuse(job.id, index, worker, found)
    if outcome == "stop":
        return store.skip(job.id, index)
    if outcome in ("gone", "done"):
        return outcome
    context = {"job_id": job.id, "chunk": index, "worker": worker, "model": job.model, "version": job.version,
               "worker_sha256": found or None, "job_sha256": job.sha256, "refusals": refusals}
    if outcome == "exhausted":
        log.error("job failed: no worker has its model", extra=context)
        return store.stop(job.id, "fail", "model_not_found",
                          no_worker_has_the_model(store, job, f"chunk {index} was refused {refusals} times"))
    if reroute is None:
        send(job.id, index)
        target = None
    else:
        target = reroute(job.id, index, store.refusers(job.id))
    log.warning("chunk refused: this worker's copy of the model differs from the job's; left to another worker",
                extra={**context, "sent_to": target})
    return "refused"


def process_chunk(store: JobStore, registry: Registry, job_id: str, index: int, send: Send, *,
                  compression: str = "zstd", max_predict_calls: int = 200, worker: str = "",
                  reroute: Reroute | None = None) -> str:
    """Run one chunk of a job end to end; returns what became of it (for logs and tests).

    `worker` names this worker (recorded with the commit). A worker whose copy of the model differs from the one the
    job pinned (its sha256) refuses the chunk before claiming it, so that refusals never count as attempts, and puts
    it back with `reroute` (or `send`, to the shared queue) for a worker that has the right copy.
    """
    started = time.perf_counter()
    job = store.get(job_id)
    if job is None:
        return "gone"
    add_log_context(model=job.model, version=job.version)
    mv = model_copy(registry, job)
    if mv is None or mv.sha256 != job.sha256:
        return _refuse(store, job, index, mv.sha256 if mv else "", worker, send, reroute)
    outcome, attempt, blob = store.claim(job_id, index)
    if outcome in ("gone", "done"):
        return outcome
    if outcome == "stop":
        return store.skip(job_id, index)
    if outcome == "poison":
        message = f"the chunk could not be processed after {attempt - 1} attempts"
        log.error("job %s chunk %d: %s; its rows fail", job_id, index, message)
        table, pre_errors = read_input(blob, parse=False)
        errors = failed_chunk_errors(table, pre_errors, job, message)
        return _commit(store, send, job, index, started, 0, errors.num_rows, b"", blobs.encode(errors, compression),
                       worker=worker)
    table, pre_errors = read_input(blob)
    results, errors = score_table(mv, table, pre_errors, job, max_predict_calls)
    return _commit(
        store, send, job, index, started, results.num_rows, errors.num_rows,
        blobs.encode(results, compression) if results.num_rows else b"",
        blobs.encode(errors, compression) if errors.num_rows else b"",
        worker=worker,
    )
