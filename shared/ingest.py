"""Turning an input (a stream of row batches) into stored chunks, sent to workers as each is complete."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from shared import blobs
from shared.chunk import model_copy, no_worker_has_the_model
from shared.errors import (
    ChunkStoreUnavailable,
    EmptyInput,
    InternalError,
    InvalidParameterValue,
    JobNotFound,
    MissingColumns,
    PredqError,
)
from shared.jobs import Job, JobStore
from shared.readers import Batch, CsvPiece, Limits, RowError, detect_format, open_reader, too_many_rows
from shared.registry import ModelVersion, Registry
from shared.sources import check_allowed, open_source

log = logging.getLogger(__name__)


def chunk_rows_for(n_columns: int, requested: int | None, fixed: int, target_cells: int, max_rows: int) -> int:
    """Rows per chunk: as asked, else the setting, else sized by row width so every chunk costs about the same."""
    if requested:
        return min(requested, max_rows)
    if fixed:
        return min(fixed, max_rows)
    return max(1000, min(max_rows, target_cells // max(n_columns, 1)))


def narrow_numeric_text(table: pa.Table, mv: ModelVersion) -> pa.Table:
    """Cast text columns of numeric features to float64 when every cell parses: smaller blobs, less work later.

    Columns with an unparseable cell stay text; the worker's validation reports those rows. JSON-typed text
    (a column of mixed JSON types) is left alone: "1.5" there may have been a string, which is invalid_type.
    """
    json_mixed = blobs.json_mixed_columns(table.schema)
    for f in mv.features:
        if f.dtype not in ("float64", "int64") or f.name not in table.column_names or f.name in json_mixed:
            continue
        col = table.column(f.name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        try:
            cast = pc.cast(col, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        table = table.set_column(table.column_names.index(f.name), pa.field(f.name, pa.float64()), cast)
    return table


@dataclass
class Chunker:
    """Collects row batches into chunks of `chunk_rows` rows and hands each finished chunk to `emit`.

    A chunk also ends once it holds `max_bytes` of rows (MAX_CHUNK_BYTES), and an input with more than
    `max_rows` rows (MAX_JOB_ROWS) raises TooLarge as soon as its rows pass that.
    """

    chunk_rows: int
    emit: Callable[[int, pa.Table | CsvPiece, list[RowError]], None]
    max_rows: int = 1 << 62
    max_bytes: int = 1 << 62
    total_rows: int = 0
    chunks: int = 0
    rows_read: int = 0
    _tables: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _pending_bytes: int = 0
    _errors: list[RowError] = field(default_factory=list)

    def add(self, batch: Batch | CsvPiece) -> None:
        self.rows_read += batch.rows if isinstance(batch, CsvPiece) else batch.table.num_rows + len(batch.errors)
        if self.rows_read > self.max_rows:
            raise too_many_rows(self.max_rows)
        if isinstance(batch, CsvPiece):
            # Already cut to size by the splitter, which hands out pieces before any parsed batch.
            self.emit(self.chunks, batch, [])
            self.chunks += 1
            self.total_rows += batch.rows
            return
        if self._tables and batch.table.num_rows and not batch.table.schema.equals(self._tables[0].schema, check_metadata=True):
            # Batches typed differently (JSON Lines blocks of mixed types) cannot share a chunk.
            self._flush(self._pending_rows)
        size = batch.table.nbytes if batch.table.num_rows else 0
        if self._pending_rows and self._pending_bytes + size > self.max_bytes:
            self._flush(self._pending_rows)  # the rows so far make a chunk: with these it would pass max_bytes
        self._errors.extend(batch.errors)
        if batch.table.num_rows:
            self._tables.append(batch.table)
            self._pending_rows += batch.table.num_rows
            self._pending_bytes += size
        while self._pending_rows >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def close(self) -> None:
        if self._pending_rows or self._errors:
            self._flush(self._pending_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0] if self._tables else None
        if table is not None:
            head, rest = table.slice(0, n), table.slice(n)
            self._tables = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows
            self._pending_bytes = rest.nbytes if rest.num_rows else 0
        else:
            head = None
        if head is not None and head.num_rows and self._tables:
            # Row errors belong to the chunk whose rows surround them; later ones wait for the next chunk.
            last = head.column(blobs.ROW)[-1].as_py()
            errors = [e for e in self._errors if e.row <= last]
            self._errors = [e for e in self._errors if e.row > last]
        else:
            errors, self._errors = self._errors, []
        if head is None:
            head = pa.table({blobs.ROW: pa.array([], type=pa.int64())})
        self.emit(self.chunks, head.combine_chunks(), errors)
        self.chunks += 1
        self.total_rows += head.num_rows + len(errors)


class BackgroundEmitter:
    """Runs `emit` for each chunk on one background thread, in order, while the caller reads the next rows.

    Casting, compressing and storing a chunk release the GIL, so they overlap with parsing. At most `depth`
    chunks wait at once, which bounds the memory an upload holds. The first error is raised to the caller.
    """

    def __init__(self, emit: Callable[[int, pa.Table, list[RowError]], None], depth: int = 2):
        self._emit = emit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predq-ingest")
        self._slots = threading.BoundedSemaphore(depth)
        self._futures: list[Future] = []

    def __call__(self, index: int, table: pa.Table, errors: list[RowError]) -> None:
        self._raise_first_error()
        self._slots.acquire()
        future = self._pool.submit(self._emit, index, table, errors)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _raise_first_error(self) -> None:
        pending = []
        for future in self._futures:
            if not future.done():
                pending.append(future)
            elif future.exception() is not None:
                raise future.exception()
        self._futures = pending

    def close(self) -> None:
        """Wait for every chunk to be emitted; raises the first error."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop: chunks not started are dropped, the one running finishes; errors are not raised."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures = []


def nonempty(batches: Iterable[Batch | CsvPiece]) -> Iterator[Batch | CsvPiece]:
    """The batches from the first that holds a row (or a row error) on; EmptyInput when there is none.

    That first batch is read now, so that an empty input is refused before a job exists; once handed out, nothing
    here keeps it (a CSV piece is megabytes).
    """
    iterator = iter(batches)
    for batch in iterator:
        if batch.rows if isinstance(batch, CsvPiece) else (batch.table.num_rows or batch.errors):
            return _handed_out([batch], iterator)
    raise EmptyInput("The input has no rows.")


def _handed_out(first: list[Batch | CsvPiece], rest: Iterator[Batch | CsvPiece]) -> Iterator[Batch | CsvPiece]:
    yield first.pop()  # popped, not kept by this generator (itertools.chain would keep it to the end)
    yield from rest


def store_chunks(store: JobStore, job_id: str, mv: ModelVersion, batches: Iterator[Batch | CsvPiece], *, columns: list[str], wanted: list[str], chunk_rows: int,
                 compression: str, send: Callable[[str, int], None],
                 before_chunk: Callable[[], None] = lambda: None, limits: Limits | None = None) -> Chunker:
    """Store the input as chunks of a job, sending each chunk's message as the job's window allows.

    Reading goes on in the caller's thread while casting, compressing and storing run on another. CSV pieces
    are stored as they came, with what a worker needs to parse them: the file's `columns`, the `wanted` ones,
    and which of those to read as numbers. Returns the chunker, which knows the totals; the caller closes the
    input with JobStore.finish_ingest. An input of more rows than MAX_JOB_ROWS raises TooLarge (413) as soon
    as they are read; the caller then discards the job (`limits`: the process's settings when None).
    """
    limits = limits or Limits.from_settings()
    layout = {"columns": columns, "wanted": wanted,
              "floats": [f.name for f in mv.features if f.dtype in ("float64", "int64")]}

    codec = blobs.Compression(compression)  # off for the rest of the job if the first chunk barely shrinks

    def emit(index: int, item: pa.Table | CsvPiece, row_errors: list) -> None:
        before_chunk()
        if isinstance(item, CsvPiece):
            blob, rows = blobs.encode_csv(item.data, {**layout, "base": item.base, "rows": item.rows},
                                          codec.codec), item.rows
            codec.observe(len(item.data), len(blob))
        else:
            table = narrow_numeric_text(item, mv)
            blob, rows = blobs.encode(table, codec.codec, row_errors), table.num_rows + len(row_errors)
            codec.observe(table.nbytes, len(blob))
        outcome, to_send = store.add_chunk(job_id, index, rows, blob)
        for next_index in to_send:
            send(job_id, next_index)
        if outcome == "gone":
            raise JobNotFound("The job was deleted while its input was being read.")

    emitter = BackgroundEmitter(emit, depth=1)  # one chunk stored while the next is read: each is megabytes
    chunker = Chunker(chunk_rows, emitter, max_rows=limits.max_rows, max_bytes=limits.max_batch_bytes)
    try:
        for batch in batches:
            chunker.add(batch)
        chunker.close()
        emitter.close()
    except BaseException:
        emitter.abandon()
        raise
    return chunker


def check_columns(mv: ModelVersion, columns: list[str], id_column: str | None) -> None:
    """A header or schema must carry every feature, and the id column when one is named."""
    present = set(columns)
    missing = [f.name for f in mv.features if f.name not in present]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise MissingColumns(f"The input lacks {len(missing)} of the model's features: {shown}.",
                             details={"missing": missing})
    if id_column and id_column not in present:
        raise InvalidParameterValue(f"id_column {id_column!r} is not a column of the input.",
                                    details={"fields": [{"name": "id_column", "code": "invalid_parameter",
                                                         "message": "not a column of the input"}]})


#: Sends a refused source read to a worker that has not refused its job (given those that did); returns the
#: worker it was sent to, or None when it went back to the shared queue.
RerouteRead = Callable[[str, Collection[str]], str | None]


def read_source(store: JobStore, registry: Registry, job_id: str, *, send: Callable[[str, int], None],
                reroute: RerouteRead, chunk_rows: Callable[[int, int | None], int], compression: str,
                roots: list[str], stale_after: float, spool_dir: str | None = None, worker: str = "") -> str:
    """Read a source job's input into chunks (in a worker); a problem ends the job `failed` with its code.

    A worker whose copy of the job's model differs from the one the job pinned (or that has none) hands the read
    back before it begins, with `reroute`, as a chunk is refused: the job fails only once MAX_CHUNK_REFUSALS
    refusals found no worker with the right copy. The message may be delivered twice: a second reader leaves a
    read that is progressing alone, and fails the job when the first reader has gone silent (its chunks so far
    cannot be told from a fresh start).
    """
    job = store.get(job_id)
    if job is None or job.source is None:
        return "gone"
    mv = model_copy(registry, job)
    if mv is None or mv.sha256 != job.sha256:
        return _refuse_read(store, job, mv.sha256 if mv else "", worker, reroute)
    try:
        if not store.begin_source_read(job_id):
            read_at = store.last_read_at(job_id)
            if read_at is None or time.time() - read_at < stale_after:
                return "duplicate"
            raise InternalError("Reading the source was interrupted (its worker stopped); start the job again.")
        check_allowed(job.source, roots)
        fmt = detect_format(job.source.split("?")[0], None)
        wanted = [f.name for f in mv.features] + ([job.options.id_column] if job.options.id_column else [])
        size = chunk_rows(len(wanted), job.options.chunk_size)
        limits = Limits.from_settings()
        with open_source(job.source, limits.max_bytes) as stream, \
                open_reader(fmt, stream, wanted=wanted, batch_rows=size, spool_dir=spool_dir, split_csv=True,
                            limits=limits) as reader:
            check_columns(mv, reader.columns, job.options.id_column)
            chunker = store_chunks(store, job_id, mv, nonempty(reader), columns=reader.columns, wanted=wanted,
                                   chunk_rows=size, compression=compression, send=send, limits=limits)
        return store.finish_ingest(job_id, chunker.total_rows, chunker.chunks)
    except PredqError as e:
        # The job's error codes are the contract's: a failing chunk store is an internal error of the service.
        store.stop(job_id, "fail", "internal_error" if isinstance(e, ChunkStoreUnavailable) else e.code, e.message)
        return _close_input(store, job_id)


def _close_input(store: JobStore, job_id: str) -> str:
    """End the input of a job whose read stopped early, so that it settles with what it has."""
    current = store.get(job_id)
    if current is None:
        return "gone"
    return store.finish_ingest(job_id, current.rows_read, current.chunks_seen)


def _refuse_read(store: JobStore, job: Job, found: str, worker: str, reroute: RerouteRead) -> str:
    """Leave a source read to a worker whose copy of the model is the job's; fail the job once refused too often."""
    outcome, refusals = store.refuse_source(job.id, worker, found)
    if outcome in ("gone", "done"):
        return outcome
    if outcome == "stop":  # cancelled before any read: nothing will come, so the job settles now
        return _close_input(store, job.id)
    context = {"job_id": job.id, "worker": worker, "model": job.model, "version": job.version,
               "worker_sha256": found or None, "job_sha256": job.sha256, "refusals": refusals}
    if outcome == "exhausted":
        log.error("job failed: no worker has its model", extra=context)
        store.stop(job.id, "fail", "model_not_found",
                   no_worker_has_the_model(store, job, f"its input's read was refused {refusals} times"))
        return _close_input(store, job.id)
    target = reroute(job.id, store.refusers(job.id))
    log.warning("source read refused: this worker's copy of the model differs from the job's; left to another "
                "worker", extra={**context, "sent_to": target})
    return "refused"
