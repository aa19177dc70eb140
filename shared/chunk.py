"""Processing one chunk: claim it, score its rows, commit results and row errors once."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

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
               started: float | None = None) -> str:
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
    return _commit(store, send, job, index, started, 0, errors.num_rows, b"", blobs.encode(errors, compression))


def _commit(store: JobStore, send: Send, job: Job, index: int, started: float, succeeded: int, failed: int,
            result_blob: bytes, error_blob: bytes) -> str:
    """Commit a chunk, send the chunks its commit let into the job's window, and count it if it was the first."""
    status, to_send = store.commit(job.id, index, succeeded, failed, result_blob, error_blob)
    for next_index in to_send:
        send(job.id, next_index)
    if status not in ("duplicate", "gone"):
        metrics.record_chunk(store.r, job.model, succeeded, failed, time.perf_counter() - started)
    return status


def _fail_job(store: JobStore, job_id: str, index: int, code: str, message: str) -> str:
    """Fail the whole job; this worker's own claimed chunk is skipped like every other idle one."""
    store.stop(job_id, "fail", code, message)
    return store.skip(job_id, index)


def process_chunk(store: JobStore, registry: Registry, job_id: str, index: int, send: Send, *,
                  compression: str = "zstd", max_predict_calls: int = 200) -> str:
    """Run one chunk of a job end to end; returns what became of it (for logs and tests)."""
    started = time.perf_counter()
    outcome, attempt, blob = store.claim(job_id, index)
    if outcome in ("gone", "done"):
        return outcome
    if outcome == "stop":
        return store.skip(job_id, index)
    job = store.get(job_id)
    if job is None:
        return "gone"
    add_log_context(model=job.model, version=job.version)
    if outcome == "poison":
        message = f"the chunk could not be processed after {attempt - 1} attempts"
        log.error("job %s chunk %d: %s; its rows fail", job_id, index, message)
        table, pre_errors = read_input(blob, parse=False)
        errors = failed_chunk_errors(table, pre_errors, job, message)
        return _commit(store, send, job, index, started, 0, errors.num_rows, b"", blobs.encode(errors, compression))
    try:
        mv = registry.get(job.model, job.version)
    except ModelNotFound as e:
        return _fail_job(store, job_id, index, "model_not_found", e.message)
    if mv.sha256 != job.sha256:
        message = (f"Model {job.model!r} version {job.version!r} on this worker has sha256 {mv.sha256[:12]}..., "
                   f"not the {job.sha256[:12]}... the job was created with.")
        log.error("job %s chunk %d refused: %s", job_id, index, message)
        return _fail_job(store, job_id, index, "model_not_found", message)
    table, pre_errors = read_input(blob)
    results, errors = score_table(mv, table, pre_errors, job, max_predict_calls)
    return _commit(
        store, send, job, index, started, results.num_rows, errors.num_rows,
        blobs.encode(results, compression) if results.num_rows else b"",
        blobs.encode(errors, compression) if errors.num_rows else b"",
    )
