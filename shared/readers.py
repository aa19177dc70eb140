"""Streaming readers for uploaded batch files (CSV, JSON Lines, Parquet) as Arrow tables of bounded size.

Every table carries an int64 ``__row`` column: each row's 0-based position among all the input's records,
malformed ones included, so that results and errors can be reported against the caller's own numbering.

Inputs are untrusted: every reader keeps to `Limits` (the MAX_* settings). A file's type is checked by its
content as well as its name, a file wider than MAX_COLUMNS is refused before any row is read, a text value
longer than MAX_CELL_BYTES fails its row, and no batch holds more than MAX_CHUNK_BYTES of rows.
"""
from __future__ import annotations

import codecs
import csv
import io
import os
import re
import tempfile
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from shared.blobs import JSON_MIXED_KEY, ROW, json_mixed_columns
from shared.errors import InvalidFile, TooLarge, UnsupportedFormat
from shared.settings import Settings, get_settings

FORMATS = ("csv", "jsonl", "parquet")

_EXTENSIONS = {
    "csv": "csv",
    "jsonl": "jsonl", "ndjson": "jsonl", "json-lines": "jsonl",
    "parquet": "parquet", "pq": "parquet",
}
_CONTENT_TYPES = {
    "text/csv": "csv",
    "application/x-ndjson": "jsonl", "application/jsonl": "jsonl",
    "application/json-lines": "jsonl", "application/x-jsonlines": "jsonl",
    "application/vnd.apache.parquet": "parquet", "application/x-parquet": "parquet", "application/parquet": "parquet",
}
_ACCEPTED = "CSV (.csv), JSON Lines (.jsonl, .ndjson, .json-lines) or Parquet (.parquet, .pq)"

_PEEK = 64 << 10            # bytes read at a time while looking for the CSV header
_MAX_HEADER = 1 << 20       # a header longer than this is taken for a file that is not CSV
_CSV_BLOCK = 2 << 20        # pyarrow's CSV block; a single record must fit in one
_CSV_AHEAD = 8              # blocks read but not yet parsed, at most (bounds an upload's memory)
_SPLIT_BLOCK = 1 << 20      # bytes the splitter reads at a time
_CSV_NULLS = ["", "NA", "N/A", "null", "NULL", "None"]
_JSON_BLOCK = 4 << 20       # bytes of whole lines parsed at once
_JSON_ARROW_BLOCK = 1 << 20  # pyarrow's unit of parallel parsing within a block
_MAX_LINE = 4 << 20         # a JSON line still unended at this length is a malformed row, skipped unread
_LONG_LINE = b"\x00\n"      # what stands in a block for such a line
_MAX_DEPTH = 255            # JSON values nested deeper cannot be written back as JSON text (orjson's limit)
_SPOOL_PIECE = 1 << 20
# Parquet column chunks are read through a buffer of this size each; every kept column has one open at once.
_PARQUET_BUFFER = 64 << 10
# Rows decoded per Parquet read: each column reader holds about a page per column, and the batch comes on top.
_PARQUET_BATCH_ROWS = 8192
_SNIFF = 16                 # bytes looked at to tell a file's type by its content
_MAX_FOOTER = 64 << 20      # a larger Parquet footer is refused before it is parsed
_TEXT = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)

_LINE_BREAK = re.compile(rb"[\r\n]")
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")
_EMPTY_LINE = re.compile(rb"\n\n")          # (a regular expression finds it faster than bytes.find)
_EMPTY_LINE_CR = re.compile(rb"\n\r?\n")
_BLANK_FIRST_LINE = re.compile(rb"[ \t\r]*\n")
_UNHANDLED_ROW = re.compile(r"Expected \d+ columns, got \d+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*")


class Limits(NamedTuple):
    """What one input may hold; each field is the setting named in its comment."""

    max_bytes: int        # MAX_UPLOAD_BYTES: the file's size
    max_columns: int      # MAX_COLUMNS: columns of the file
    max_cell_bytes: int   # MAX_CELL_BYTES: bytes of one text value in a kept column
    max_rows: int         # MAX_JOB_ROWS: rows, where the file says how many before they are read (Parquet)
    max_batch_bytes: int  # MAX_CHUNK_BYTES: bytes of rows in one batch

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Limits:
        """The limits the settings give (the process's own when None)."""
        s = settings or get_settings()
        return cls(s.MAX_UPLOAD_BYTES, s.MAX_COLUMNS, s.MAX_CELL_BYTES, s.MAX_JOB_ROWS, s.MAX_CHUNK_BYTES)


class RowError(NamedTuple):
    """A record that could not be read, at its 0-based input position."""

    row: int
    code: str
    message: str


class Batch(NamedTuple):
    """Rows (wanted columns plus ``__row``) and the malformed records up to the last of them not reported before."""

    table: pa.Table
    errors: list[RowError]


def detect_format(filename: str | None, content_type: str | None) -> str:
    """The format named by the file's extension or, failing that, by its content type."""
    base = re.split(r"[\\/]", filename or "")[-1].lower()
    if "." in base:
        fmt = _EXTENSIONS.get(base.rsplit(".", 1)[1])
        if fmt:
            return fmt
    fmt = _CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
    if fmt:
        return fmt
    raise UnsupportedFormat(f"Unsupported file format: send {_ACCEPTED}.",
                            details={"accepted": list(FORMATS), "filename": filename, "content_type": content_type})


class Reader:
    """The batches of one uploaded file: iterate once, then close (or use as a context manager)."""

    columns: list[str]

    def __init__(self, columns: list[str], wanted: list[str] | None, batch_rows: int, limits: Limits):
        if len(columns) > limits.max_columns:
            raise too_wide(len(columns), limits)
        _check_names(columns)
        self.columns = columns
        self._keep = _keep(columns, wanted)
        self._batch_rows = batch_rows
        self._limits = limits
        self._pending: deque[RowError] = deque()
        self._batches: Generator[Batch, None, None] | None = None

    def __iter__(self) -> Iterator[Batch]:
        if self._batches is not None:
            raise RuntimeError("a reader can only be iterated once")
        self._batches = _rebatch(self._pieces(), self._pending, self._batch_rows, self._schema(),
                                 self._limits.max_batch_bytes)
        return self._batches

    def close(self) -> None:
        """Stop reading and release what the reader holds (the input stream stays open)."""
        if self._batches is not None:
            self._batches.close()
        self._release()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _pieces(self) -> Iterator[pa.Table]:
        """Tables of any size with ``__row`` last; malformed records are queued on self._pending."""
        raise NotImplementedError

    def _schema(self) -> pa.Schema:
        """The schema of a batch that has no rows, only errors."""
        return pa.schema([(c, pa.null()) for c in self._keep] + [(ROW, pa.int64())])

    def _release(self) -> None:
        """Free the reader's resources."""


def open_reader(fmt: str, stream: BinaryIO, *, wanted: list[str] | None = None,
                batch_rows: int = 65536, spool_dir: str | None = None, split_csv: bool = False,
                limits: Limits | None = None) -> Reader:
    """A reader over the stream, having read just enough of it to know the file's columns.

    With split_csv, CSV comes as CsvPiece items of batch_rows records for workers to parse (parse_csv_piece),
    as far as the file allows, and as Batch items after that. `limits` default to the process's settings.
    The file's first bytes must fit its format: a compressed file, an image or Parquet bytes named .csv are
    refused (InvalidFile) before anything else is read.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if fmt not in FORMATS:
        raise UnsupportedFormat(f"Unsupported file format {fmt!r}: send {_ACCEPTED}.",
                                details={"accepted": list(FORMATS)})
    limits = limits or Limits.from_settings()
    guarded = _Guarded(stream, limits.max_bytes)
    _check_content(fmt, guarded.head)
    if fmt == "csv":
        if split_csv:
            return _CsvSplitter(guarded, wanted, batch_rows, limits)
        return _CsvReader(guarded, wanted, batch_rows, limits=limits)
    if fmt == "jsonl":
        return _JsonlReader(guarded, wanted, batch_rows, limits)
    return _ParquetReader(guarded, wanted, batch_rows, spool_dir, limits)


# -- limits and content checks ------------------------------------------------------------------------

def too_wide(columns: int | str, limits: Limits) -> InvalidFile:
    """The error for a file with more columns than MAX_COLUMNS."""
    return InvalidFile(f"The file has {columns} columns, more than the {limits.max_columns} accepted (MAX_COLUMNS).",
                       details={"limit": "MAX_COLUMNS", "max": limits.max_columns})


def too_many_rows(max_rows: int, rows: int | None = None) -> TooLarge:
    """The error for an input with more rows than MAX_JOB_ROWS (`rows`: how many, when known)."""
    has = f"has {rows} rows, more" if rows is not None else "has more rows"
    return TooLarge(f"The input {has} than the {max_rows} one job accepts (MAX_JOB_ROWS); split it into several "
                    "jobs.", details={"limit": "MAX_JOB_ROWS", "max": max_rows})


class _Guarded(io.RawIOBase):
    """A stream's bytes, counted: more than max_bytes raise TooLarge. Its first bytes are read at once (`head`)."""

    def __init__(self, stream: BinaryIO, max_bytes: int):
        super().__init__()
        self._stream = stream
        self._max = max_bytes
        self._count = 0
        self.head = self._counted(_read_full(stream, _SNIFF))
        self._pending = self.head

    def readable(self) -> bool:
        return True

    def _counted(self, data: bytes) -> bytes:
        self._count += len(data)
        if self._count > self._max:
            raise TooLarge(f"The file is larger than the {self._max} bytes accepted (MAX_UPLOAD_BYTES).",
                           details={"limit": "MAX_UPLOAD_BYTES", "max": self._max})
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:  # to the end, counted a piece at a time
            return b"".join(iter(lambda: self.read(_SPOOL_PIECE), b""))
        if self._pending:
            out, self._pending = self._pending[:size], self._pending[size:]
            return out
        return self._counted(self._stream.read(size))

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


# Magic numbers of files that are sometimes sent by mistake, or on purpose, under a text format's name. Only
# ones that text cannot start with: each has a byte that is not printable ASCII.
_MAGIC = (
    (b"PK\x03\x04", "a zip archive (an Excel workbook is one)"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF-", "a PDF document"),
    (b"\x7fELF", "an executable"),
    (b"ARROW1\x00\x00", "an Arrow IPC file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xff\xfe", "UTF-16 text (send UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (send UTF-8)"),
    (b"\xd0\xcf\x11\xe0", "an old Office document"),
)


def _looks_like(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when they say it is not CSV or JSON Lines text."""
    # "PAR1" alone could begin a CSV header; Parquet's first page header after it starts with a control byte.
    if head.startswith(b"PAR1") and len(head) > 4 and head[4] < 0x20 and head[4] not in b"\t\n\r":
        return "a Parquet file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return None


def _check_content(fmt: str, head: bytes) -> None:
    """Refuse a file whose first bytes belong to another type than its name or content type says."""
    if fmt == "parquet":
        if not head:
            raise InvalidFile("The file is empty.")
        if head.startswith(b"PAR1"):
            return
        what = _looks_like(head)
        if what is None:
            what = "text (CSV or JSON Lines?)" if _is_text(head) else "binary data of another kind"
        raise InvalidFile(f"The file is not Parquet (which starts with PAR1): it looks like {what}.",
                          details={"detected": what})
    what = _looks_like(head)
    if what is not None:
        name = "CSV" if fmt == "csv" else "JSON Lines"
        hint = " Send Parquet as a .parquet file." if what == "a Parquet file" else (
            " Decompress it first." if "compressed" in what or "archive" in what else "")
        raise InvalidFile(f"The file was sent as {name}, but it looks like {what}.{hint}", details={"detected": what})


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut off at the end of what was looked at
    return "\x00" not in head.decode("utf-8", "replace")


def _drop_long_cells(table: pa.Table, max_bytes: int) -> tuple[pa.Table, list[RowError]]:
    """The table without rows that have a text value longer than max_bytes, and an error for each of those."""
    over = None
    first_column: list[str] = []
    for name, column in zip(table.column_names, table.columns):
        lengths = _value_lengths(column)
        if lengths is None:
            continue
        long = pc.fill_null(pc.greater(lengths, max_bytes), False)
        if not pc.any(long).as_py():
            continue
        if over is None:
            over = long
            first_column = [name] * len(table)
        else:
            fresh = pc.and_(long, pc.invert(over)).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(fresh):
                first_column[i] = name
            over = pc.or_(over, long)
    if over is None:
        return table, []
    rows = table.column(ROW).to_numpy()
    errors = [RowError(int(rows[i]), "invalid_value",
                       f"the value of {first_column[i]!r} is longer than the {max_bytes} bytes accepted "
                       "(MAX_CELL_BYTES)") for i in np.flatnonzero(over.to_numpy(zero_copy_only=False))]
    return table.filter(pc.invert(over)), errors


def _value_lengths(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Bytes of each text value (None for a column that holds no text); a dictionary's values are not decoded."""
    t = column.type
    if pa.types.is_dictionary(t):
        if not any(check(t.value_type) for check in _TEXT):
            return None
        return pa.chunked_array([pc.take(pc.binary_length(c.dictionary), c.indices) for c in column.chunks],
                                type=pa.int64() if "large" in str(t.value_type) else pa.int32())
    if any(check(t) for check in _TEXT):
        return pc.binary_length(column)
    return None


def _queue(pending: deque[RowError], errors: list[RowError]) -> None:
    """Add errors to the queue, which stays in input order."""
    if not errors:
        return
    if pending and pending[-1].row > errors[0].row:
        merged = sorted([*pending, *errors], key=lambda e: e.row)
        pending.clear()
        pending.extend(merged)
    else:
        pending.extend(errors)


# -- shared helpers -------------------------------------------------------------------------------------

def _keep(columns: list[str], wanted: list[str] | None) -> list[str]:
    """The wanted columns (all if None) that the file has, in the caller's order, without repeats."""
    if wanted is None:
        return list(columns)
    present = set(columns)
    return [c for c in dict.fromkeys(wanted) if c in present]


def _check_names(columns: list[str]) -> None:
    """Refuse column names that would make a column ambiguous."""
    seen: set[str] = set()
    duplicates = list(dict.fromkeys(c for c in columns if c in seen or seen.add(c)))
    if duplicates:
        raise InvalidFile(f"Duplicate column names: {', '.join(map(repr, duplicates))}.",
                          details={"columns": duplicates})
    if ROW in seen:
        raise InvalidFile(f"The column name {ROW!r} is reserved.", details={"columns": [ROW]})


def _rebatch(pieces: Iterable[pa.Table], pending: deque[RowError], batch_rows: int,
             schema: pa.Schema, max_bytes: int) -> Generator[Batch, None, None]:
    """Batches of at most batch_rows rows from pieces of any size; pieces typed differently are never merged.

    A batch also ends before a piece that would take it past max_bytes.
    """
    held: list[pa.Table] = []
    held_rows = held_bytes = 0
    for piece in pieces:
        if not piece.num_rows:
            continue
        if held and (not piece.schema.equals(schema, check_metadata=True) or held_bytes + piece.nbytes > max_bytes):
            yield _batch(pa.concat_tables(held), pending)
            held, held_rows, held_bytes = [], 0, 0
        schema = piece.schema
        held.append(piece)
        held_rows += piece.num_rows
        held_bytes += piece.nbytes
        while held_rows >= batch_rows:
            table = pa.concat_tables(held)  # zero-copy: the chunks are only referenced
            yield _batch(table.slice(0, batch_rows), pending)
            rest = table.slice(batch_rows)
            held, held_rows = ([rest] if rest.num_rows else []), rest.num_rows
            held_bytes = rest.nbytes if rest.num_rows else 0
    if held:
        yield _batch(pa.concat_tables(held), pending)
    if pending:
        yield Batch(schema.empty_table(), list(pending))
        pending.clear()


def _batch(table: pa.Table, pending: deque[RowError]) -> Batch:
    """The table with the queued errors positioned at or before its last row."""
    last = table.column(ROW)[-1].as_py()
    errors = []
    while pending and pending[0].row <= last:
        errors.append(pending.popleft())
    return Batch(table, errors)


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to size bytes, fewer only at the end of the stream, however short the stream's own reads are."""
    parts = []
    got = 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _detail(exc: BaseException) -> str:
    """The first line of an Arrow error, without any file system path it may name."""
    return _ABSOLUTE_PATH.sub("<file>", str(exc).strip().split("\n")[0])


# -- CSV ---------------------------------------------------------------------------------------------

class _Replay(io.RawIOBase):
    """The bytes already peeked, then the rest of the stream, in reads filled to the size asked for."""

    def __init__(self, head: bytes, stream: BinaryIO):
        super().__init__()
        self._head = head
        self._stream = stream
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0
        # pyarrow reads on its own thread, as far ahead as the input allows (a whole upload, if it arrives
        # faster than it is parsed); reads wait while more than _CSV_AHEAD blocks are unparsed.
        self._turn = threading.Condition()
        self._reads = 0
        self._parsed = 0
        self._released = False

    def readable(self) -> bool:
        return True

    def parsed_one(self) -> None:
        """The parser handed out one more block's rows: one more block may be read."""
        with self._turn:
            self._parsed += 1
            self._turn.notify_all()

    def release(self) -> None:
        """Let a waiting read go on (the reader is stopping)."""
        with self._turn:
            self._released = True
            self._turn.notify_all()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ValueError("the size to read must be given")  # an unbounded read would hold the whole file
        with self._turn:
            while self._reads - self._parsed >= _CSV_AHEAD and not self._released:
                self._turn.wait(1.0)
            self._reads += 1
        out, self._head = self._head[:size], self._head[size:]
        # Short reads would make pyarrow parse tiny blocks, so fill every read.
        if len(out) < size:
            out += _read_full(self._stream, size - len(out))
        _check_utf8(self._utf8, out, self._offset)
        self._offset += len(out)
        return out

    def at_end(self) -> bool:
        """Whether nothing at all is left to read."""
        if not self._head:
            self._head = self._stream.read(_PEEK)
        return not self._head


class _CsvReader(Reader):
    """CSV with a header row, parsed by pyarrow's streaming reader with every kept column as text."""

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int, *,
                 columns: list[str] | None = None, base: int = 0, floats: Sequence[str] = (),
                 limits: Limits | None = None):
        """With `columns`, the stream starts after the header, its first record at input position `base`.

        Columns named in `floats` are parsed as float64 directly; a cell that is not a number raises
        _NotNumbers (the caller reads them as text instead, for validation to name the bad cells).
        """
        limits = limits or Limits.from_settings()
        if columns is None:
            columns, rest = _read_header(stream, limits.max_columns)
        else:
            rest = b""
        super().__init__(columns, wanted, batch_rows, limits)
        self._source = _Replay(rest, stream)
        self._floats = set(floats)
        self._base = base
        self._good = 0                 # good rows positioned so far
        self._skipped = base           # malformed rows before every good row still to come, plus base
        self._bad: list[int] = []      # positions of the other malformed rows seen so far, in order

    def _pieces(self) -> Iterator[pa.Table]:
        if self._source.at_end():
            return
        # pyarrow reads every included column when include_columns is empty, so keep one and drop it later.
        include = self._keep or self.columns[:1]
        try:
            reader = pacsv.open_csv(
                self._source,
                # Threads would leave InvalidRow.number unset, and with it the position of malformed rows.
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False, column_names=self.columns),
                parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=self._on_invalid_row),
                convert_options=pacsv.ConvertOptions(
                    include_columns=include,
                    column_types={c: pa.float64() if c in self._floats else pa.string() for c in include},
                    null_values=_CSV_NULLS, strings_can_be_null=True),
            )
            for batch in reader:
                self._source.parsed_one()
                table = pa.Table.from_batches([batch]).select(self._keep)
                table = table.append_column(ROW, pa.array(self._positions(batch.num_rows)))
                table, long = _drop_long_cells(table, self._limits.max_cell_bytes)
                _queue(self._pending, long)
                yield table
        except pa.ArrowException as exc:
            if self._floats and "CSV conversion error" in str(exc):
                raise _NotNumbers() from exc
            raise _csv_error(exc) from exc
        finally:
            self._source.release()  # before pyarrow's reader goes, in case its thread waits to read

    def _on_invalid_row(self, row: pacsv.InvalidRow) -> str:
        """Skip a record with the wrong number of fields, noting its position."""
        # Single-threaded, row.number is the record's 1-based ordinal after the header: blank lines are not
        # counted and a quoted value spanning lines counts once, so the position is exact in every case.
        position = self._base + row.number - 1
        self._bad.append(position)
        # Header is line 1: this is the physical line unless blank lines or multi-line values come before.
        self._pending.append(RowError(position, "malformed_row",
                                      f"line {position + 2}: expected {row.expected_columns} fields, "
                                      f"found {row.actual_columns}"))
        return "skip"

    def _positions(self, n: int) -> np.ndarray:
        """Input positions of the next n good rows: their ordinal plus the malformed rows before each."""
        ordinals = np.arange(self._good, self._good + n, dtype=np.int64)
        self._good += n
        if not self._bad:
            return ordinals + self._skipped
        bad = np.array(self._bad, dtype=np.int64)
        # How many good rows precede each malformed row; a good row comes after those with at most its ordinal.
        before = bad - (self._skipped + np.arange(len(bad), dtype=np.int64))
        positions = ordinals + self._skipped + np.searchsorted(before, ordinals, side="right")
        passed = int(np.searchsorted(before, self._good, side="right"))
        self._skipped += passed
        del self._bad[:passed]
        return positions

    def _schema(self) -> pa.Schema:
        return pa.schema([(c, pa.float64() if c in self._floats else pa.string()) for c in self._keep]
                         + [(ROW, pa.int64())])


class _NotNumbers(Exception):
    """A column parsed as float64 has a cell that is not a number."""


class CsvPiece(NamedTuple):
    """Whole CSV records exactly as sent, left for a worker to parse: `rows` records, the first at `base`."""

    data: bytes
    rows: int
    base: int


class _CsvSplitter(Reader):
    """A CSV upload cut at record boundaries into pieces of batch_rows records, without parsing it.

    Parsing is the costly part of reading CSV; left to the workers, it runs on every core instead of on the
    request's thread. Records can be counted without a parser while the text has no quote and no lone carriage
    return: then every line feed ends a line, and a line is a record unless it is empty (pyarrow skips those).
    From the first block with either, the rest of the file is parsed here (_CsvReader, positions following on).
    Text that is not UTF-8 is refused here, as by _CsvReader, so that it never reaches a worker.
    """

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int, limits: Limits):
        header, rest = _read_header(stream, limits.max_columns)
        super().__init__(header, wanted, batch_rows, limits)
        self._stream = stream
        self._head = rest
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0
        self._parser: _CsvReader | None = None

    def __iter__(self) -> Iterator[Any]:  # CsvPiece items, then Batch items if the file needs parsing here
        if self._batches is not None:
            raise RuntimeError("a reader can only be iterated once")
        self._batches = self._items()
        return self._batches

    def _release(self) -> None:
        if self._parser is not None:
            self._parser.close()

    def _next_block(self) -> bytes:
        """At most _SPLIT_BLOCK bytes (one more to keep a CRLF together), so that a record that lies inside a
        block is shorter than a parser block."""
        block = self._take(_SPLIT_BLOCK)
        if block.endswith(b"\r"):  # keep a CRLF together, or it would look like a lone CR
            block += self._take(1)
        _check_utf8(self._utf8, block, self._offset)
        self._offset += len(block)
        return block

    def _take(self, size: int) -> bytes:
        block, self._head = self._head[:size], self._head[size:]
        if len(block) < size:
            block += _read_full(self._stream, size - len(block))
        return block

    def _items(self) -> Generator[Any, None, None]:
        base = 0                 # input position of the first record not yet in a piece
        held: list[bytes] = []   # whole lines not yet in a piece (the last may lack its line feed at the end)
        held_rows = held_bytes = 0
        max_bytes = self._limits.max_batch_bytes  # a piece of wide records ends before batch_rows at this size
        last = b"\n"             # the byte before the current block (the header's line feed at first)
        line = 0                 # bytes of the line not yet ended (a record may not outgrow a parser block)
        while block := self._next_block():
            cr = b"\r" in block
            if b'"' in block or (cr and block.count(b"\r") != block.count(b"\r\n")):
                yield from self._parse_rest(b"".join(held) + block, base)
                return
            first_break = block.find(b"\n")
            if line + (len(block) if first_break < 0 else first_break) > _CSV_BLOCK:
                raise InvalidFile(f"A CSV record is longer than {_CSV_BLOCK >> 20} MiB "
                                  f"(near byte {self._offset} after the header).")
            line = line + len(block) if first_break < 0 else len(block) - block.rfind(b"\n") - 1
            plain = not _has_empty_line(block, last, cr)
            count = block.count(b"\n") if plain else -1
            full = held_bytes + len(block) >= max_bytes
            if count < 0 or held_rows + count >= self._batch_rows or full:  # a piece ends in this block
                ends = _record_ends(block, last, plain)
                start = 0
                while held_rows + len(ends) >= self._batch_rows:
                    take = self._batch_rows - held_rows
                    cut = int(ends[take - 1]) + 1
                    held.append(block[start:cut])
                    yield CsvPiece(b"".join(held), self._batch_rows, base)
                    base += self._batch_rows
                    held, held_rows, held_bytes = [], 0, 0
                    ends, start = ends[take:], cut
                if full and len(ends) and held_bytes + len(block) - start >= max_bytes:
                    cut = int(ends[-1]) + 1  # the records so far make a piece of their own
                    held.append(block[start:cut])
                    yield CsvPiece(b"".join(held), held_rows + len(ends), base)
                    base += held_rows + len(ends)
                    held, held_rows, held_bytes = [], 0, 0
                    ends, start = ends[:0], cut
                held.append(block[start:])
                held_rows += len(ends)
                held_bytes += len(block) - start
            else:
                held.append(block)
                held_rows += count
                held_bytes += len(block)
            last = block[-1:]
        tail = b"".join(held)
        if tail and not tail.endswith(b"\n") and tail.rsplit(b"\n", 1)[-1] not in (b"", b"\r"):
            held_rows += 1  # the last record has no line feed
        if held_rows:
            yield CsvPiece(tail, held_rows, base)

    def _parse_rest(self, head: bytes, base: int) -> Generator[Batch, None, None]:
        # With what the header's read took that no block has had yet (checked first: the decoder goes on from it).
        _check_utf8(self._utf8, self._head, self._offset)
        self._offset += len(self._head)
        head, self._head = head + self._head, b""
        stream = _Joined(head, self._stream, self._utf8, self._offset)
        self._parser = _CsvReader(stream, self._keep, self._batch_rows, columns=self.columns, base=base,
                                  limits=self._limits)
        yield from self._parser


def _has_empty_line(block: bytes, before: bytes, cr: bool) -> bool:
    """Whether a line that ends in block is empty ("" or the CR of a CRLF); `before` is the byte before block.

    `cr`: block has a carriage return (only then can a line be the CR of a CRLF alone).
    """
    if before == b"\n" and block[:1] in (b"\n", b"\r"):
        return True
    return (_EMPTY_LINE_CR if cr else _EMPTY_LINE).search(block) is not None


def _record_ends(block: bytes, before: bytes, plain: bool) -> np.ndarray:
    """Offsets of the line feeds in block that end a non-empty line (block has no quote and no lone CR).

    `plain`: block has no empty line (_has_empty_line), so every line feed ends a record.
    """
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    if plain or not len(ends):
        return ends
    starts = np.concatenate(([0], ends[:-1] + 1))
    length = ends - starts
    empty = (length == 0) | ((length == 1) & (data[starts] == 13))
    if before != b"\n":  # the first line began in the previous block, so it is not empty here
        empty[0] = False
    return ends[~empty]


class _Joined(io.RawIOBase):
    """Bytes already read (and checked), then the rest of a stream, checked as UTF-8 by the splitter's decoder."""

    def __init__(self, head: bytes, stream: BinaryIO, decoder: codecs.IncrementalDecoder, offset: int):
        super().__init__()
        self._head, self._stream, self._decoder, self._offset = head, stream, decoder, offset

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head:
            out, self._head = self._head[:size], self._head[size:]
            return out
        out = self._stream.read(size)
        _check_utf8(self._decoder, out, self._offset)
        self._offset += len(out)
        return out


def _check_utf8(decoder: codecs.IncrementalDecoder, data: bytes, offset: int) -> None:
    """Refuse text that is not UTF-8 (pyarrow cannot even report such a row to the row handler)."""
    if data and data.isascii() and not decoder.getstate()[0]:
        return  # ASCII is UTF-8, and no multi-byte character is open: nothing to decode
    try:
        decoder.decode(data, final=not data)
    except UnicodeDecodeError as exc:
        raise InvalidFile(f"The file is not UTF-8 text (byte {offset + exc.start} after the header).") from exc


def parse_csv_piece(piece: CsvPiece, columns: list[str], wanted: list[str],
                    floats: Sequence[str], limits: Limits | None = None) -> tuple[pa.Table, list[RowError]]:
    """A piece's rows (wanted columns and ``__row``) and malformed records, as _CsvReader reads them.

    Numeric columns are parsed as float64; if one of them has a cell that is not a number, the piece is read
    again with every column as text. A piece whose record count differs from the splitter's (which cannot
    happen for text the splitter leaves unparsed) has every row reported as malformed rather than misplaced.
    A row with a text value longer than MAX_CELL_BYTES is an invalid_value error (`limits`: the settings').
    """
    limits = limits or Limits.from_settings()
    for typed in (floats, ()):
        reader = _CsvReader(io.BytesIO(piece.data), wanted, max(piece.rows, 1), columns=columns, base=piece.base,
                            floats=typed, limits=limits)
        try:
            with reader:
                batches = list(reader)
        except _NotNumbers:
            continue
        except InvalidFile as exc:
            return _unreadable(piece, reader, exc.message)
        tables = [b.table for b in batches if b.table.num_rows]
        table = pa.concat_tables(tables) if tables else reader._schema().empty_table()
        errors = [e for b in batches for e in b.errors]
        if table.num_rows + len(errors) != piece.rows:
            return _unreadable(piece, reader, f"found {table.num_rows + len(errors)} records where "
                                              f"{piece.rows} were counted")
        return table, errors
    raise AssertionError("a piece read as text has no conversion error")


def _unreadable(piece: CsvPiece, reader: _CsvReader, reason: str) -> tuple[pa.Table, list[RowError]]:
    return reader._schema().empty_table(), [RowError(piece.base + i, "malformed_row", f"this part of the file "
                                                     f"cannot be read as CSV: {reason}") for i in range(piece.rows)]


def _read_header(stream: BinaryIO, max_columns: int) -> tuple[list[str], bytes]:
    """The header row's names and the bytes read beyond it; InvalidFile past max_columns names (MAX_COLUMNS)."""
    buf = b""
    while (end := _header_end(buf)) < 0:
        if buf.count(b",") >= max_columns:  # the header is not read to its end to be refused
            raise InvalidFile(f"The header has more than {max_columns} columns, the most accepted (MAX_COLUMNS).",
                              details={"limit": "MAX_COLUMNS", "max": max_columns})
        if len(buf) > _MAX_HEADER:
            raise InvalidFile(f"No header line in the first {_MAX_HEADER >> 20} MiB: this does not look like CSV.")
        chunk = _read_full(stream, _PEEK)
        if not chunk:
            end = len(buf)
            break
        buf += chunk
    if not buf:
        raise InvalidFile("The file is empty.")
    rest = buf[end + 1:]
    if buf[end:end + 2] == b"\r\n":
        rest = rest[1:]
    return _parse_header(buf[:end]), rest


def _header_end(buf: bytes) -> int:
    """Index of the first line break outside quotes, or -1 if buf holds no complete first line."""
    start = 0
    while (brk := _LINE_BREAK.search(buf, start)) is not None:
        if buf.count(b'"', start, brk.start()) % 2 == 0:
            return brk.start()
        close = buf.find(b'"', brk.start())  # the break is inside a quoted name: go past the closing quote
        if close < 0:
            return -1
        start = close + 1
    return -1


def _parse_header(line: bytes) -> list[str]:
    """Column names from the header line's bytes."""
    if line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8):]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidFile("The file is not valid UTF-8 text, so it cannot be read as CSV.") from None
    if "\x00" in text:
        raise InvalidFile("The file holds binary data, not CSV text.")
    if text.lstrip().startswith("{") and text.rstrip().endswith("}"):
        try:
            is_object = isinstance(orjson.loads(text), dict)
        except orjson.JSONDecodeError:
            is_object = False
        if is_object:
            raise InvalidFile("The file was sent as CSV, but its first line is a JSON object: it looks like JSON "
                              "Lines. Send it as a .jsonl file.", details={"detected": "JSON Lines"})
    names = next(csv.reader(io.StringIO(text, newline="")), [])
    if not names:
        raise InvalidFile("The first line must be a header row naming the columns.")
    return names


def _csv_error(exc: pa.ArrowException) -> InvalidFile:
    """The client-facing error for one pyarrow raised while reading CSV."""
    text = str(exc)
    # A malformed row that is not UTF-8 cannot be handed to the row handler, so pyarrow fails on it instead.
    if "UTF8" in text or _UNHANDLED_ROW.search(text):
        return InvalidFile("The file is not valid UTF-8 text, so it cannot be read as CSV.")
    if "straddling" in text:
        return InvalidFile(f"A CSV record is longer than {_CSV_BLOCK >> 20} MiB (or a quoted value is never closed).")
    return InvalidFile("The file cannot be read as CSV.", details={"reason": _detail(exc)})


# -- JSON Lines ---------------------------------------------------------------------------------------

class _JsonlReader(Reader):
    """One JSON object per line, parsed a block of lines at a time; blank lines are skipped and take no position.

    `columns` are the keys of the first block's objects (at most MAX_COLUMNS of them; keys first seen later are
    ignored), found by parsing its lines with orjson, which also tells each kept column's JSON type. Every block
    is then parsed by pyarrow, told the type of each kept column and to ignore every other key (so that no line
    can make it build a column per key, or recurse into a deeply nested value), and line by line when that does
    not give every line its record. A column whose values in a block are of mixed JSON types, or objects/arrays,
    holds each non-null value as JSON text and is named in the table's schema metadata under JSON_MIXED_KEY, so
    that validation can tell the string "1.5" from the number 1.5. A line still unended at _MAX_LINE bytes is a
    malformed row, skipped unread.
    """

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int, limits: Limits):
        self._stream = stream
        self._tail = b""
        self._eof = False
        self._skipping = False              # inside a line too long to hold, reading on to its end
        self._long_lines: set[int] = set()  # physical line numbers (1-based) of such lines
        self._line = 0                      # physical lines consumed
        self._pos = 0                       # records (non-blank lines) consumed
        block = self._next_block()
        if block is None:
            raise InvalidFile("The file is empty.")
        if block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8):]
        columns, self._types = _survey(block, wanted, limits)
        super().__init__(columns, wanted, batch_rows, limits)
        first, errors = self._parse(block, self._keep)
        if not first.num_rows:
            reason = errors[0].message if errors else "it holds only blank lines"
            raise InvalidFile(f"The file cannot be read as JSON Lines: {reason}.")
        mixed = json_mixed_columns(first.schema)
        # What pyarrow is told to expect of each kept column: its first block's type (text for mixed ones).
        self._types = {c: pa.string() if c in mixed else first.schema.field(c).type for c in self._keep}
        self._head = [self._checked(_conform(first, self._keep), errors)]  # parsed to learn the columns

    def _pieces(self) -> Iterator[pa.Table]:
        table, errors = self._head.pop()
        while True:
            _queue(self._pending, errors)
            yield table
            block = self._next_block()
            if block is None:
                return
            table, errors = self._parse(block, self._keep)
            table, errors = self._checked(_conform(table, self._keep), errors)

    def _checked(self, table: pa.Table, errors: list[RowError]) -> tuple[pa.Table, list[RowError]]:
        """The table without rows whose text is too long, and the block's errors with theirs, in input order."""
        table, long = _drop_long_cells(table, self._limits.max_cell_bytes)
        return table, sorted(errors + long, key=lambda e: e.row) if long else errors

    def _next_block(self) -> bytes | None:
        """The next run of whole lines (about _JSON_BLOCK bytes, ending with a newline), or None at the end."""
        buf = self._tail
        while not self._eof:
            chunk = _read_full(self._stream, _JSON_BLOCK)
            self._eof = len(chunk) < _JSON_BLOCK
            if self._skipping:
                end = chunk.find(b"\n")
                if end < 0:
                    continue
                self._skipping = False
                chunk = chunk[end + 1:]
            buf += chunk
            cut = buf.rfind(b"\n") + 1
            if len(buf) - cut > _MAX_LINE:
                # A placeholder stands for the line, whose bytes are dropped as they come, up to its end.
                self._long_lines.add(self._line + buf.count(b"\n", 0, cut) + 1)
                buf = buf[:cut] + _LONG_LINE
                cut = len(buf)
                self._skipping = not self._eof
            if cut:
                self._tail = buf[cut:]
                return buf[:cut]
        self._tail = b""
        if not buf:
            return None
        return buf if buf.endswith(b"\n") else buf + b"\n"

    def _parse(self, block: bytes, names: list[str]) -> tuple[pa.Table, list[RowError]]:
        """The block's records (columns `names`, then __row) and its malformed lines."""
        table = self._parse_fast(block, names)
        if table is None:
            table, errors = self._parse_lines(block, names)
            mixed = json_mixed_columns(table.schema)
            for c in names:  # a column with no value so far takes the type of its first values
                if (self._types.get(c) is None or pa.types.is_null(self._types[c])) and c not in mixed:
                    self._types[c] = table.schema.field(c).type
            return table, errors
        rows = pa.array(np.arange(self._pos, self._pos + table.num_rows, dtype=np.int64))
        self._pos += table.num_rows
        self._line += table.num_rows
        return table.append_column(ROW, rows), []

    def _parse_fast(self, block: bytes, names: list[str]) -> pa.Table | None:
        """The block parsed by pyarrow, or None when only parsing line by line gives every record its place."""
        if _BLANK_LINE.search(block) or _BLANK_FIRST_LINE.match(block):
            return None  # pyarrow skips blank lines too, but then its rows could not be matched to lines
        if any(self._types.get(c) is None for c in names):
            return None  # a column of mixed types: only line parsing keeps each value's JSON type
        if not block.isascii():
            try:
                block.decode("utf-8")
            except UnicodeDecodeError:
                return None  # pyarrow would keep the bytes of a text it is told to expect: lines find the bad one
        schema = pa.schema([(c, self._types[c]) for c in names])
        try:
            table = pajson.read_json(pa.BufferReader(block),
                                     read_options=pajson.ReadOptions(use_threads=True, block_size=_JSON_ARROW_BLOCK),
                                     parse_options=pajson.ParseOptions(explicit_schema=schema,
                                                                       unexpected_field_behavior="ignore"))
        except (pa.ArrowException, ValueError):
            return None  # a value of another type, a line that is not an object, invalid UTF-8...
        # With no blank line, as many rows as lines means exactly one object per line.
        if table.num_rows != block.count(b"\n"):
            return None
        return table.select(names)

    def _parse_lines(self, block: bytes, names: list[str]) -> tuple[pa.Table, list[RowError]]:
        """The block parsed line by line: malformed lines become errors, the objects columns."""
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        errors: list[RowError] = []
        for line in block.split(b"\n")[:-1]:  # the block ends with a newline
            self._line += 1
            if not line.strip():
                continue
            if self._line in self._long_lines:
                errors.append(RowError(self._pos, "malformed_row",
                                       f"line {self._line}: longer than {_MAX_LINE >> 20} MiB, the most accepted"))
                self._pos += 1
                continue
            value = _load_object(line)
            if isinstance(value, str):
                errors.append(RowError(self._pos, "malformed_row", f"line {self._line}: not a JSON object: {value}"))
            else:
                records.append(value)
                rows.append(self._pos)
            self._pos += 1
        table, nested = objects_table(records, rows, names)
        return table, sorted(errors + nested, key=lambda e: e.row) if nested else errors


_JSON_TYPES = {frozenset(): pa.null(), frozenset({int}): pa.int64(), frozenset({float}): pa.float64(),
               frozenset({int, float}): pa.float64(), frozenset({str}): pa.string(), frozenset({bool}): pa.bool_()}


def _survey(block: bytes, wanted: list[str] | None,
            limits: Limits) -> tuple[list[str], dict[str, pa.DataType | None]]:
    """The keys of the block's objects in the order they first appear, and the Arrow type each wanted key's values
    share (None: mixed JSON types); InvalidFile past MAX_COLUMNS keys."""
    seen: dict[str, Any] = {}
    kinds: dict[str, set[type]] = {}
    for line in block.split(b"\n"):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(value, dict):
            continue
        seen.update(value)  # keys already seen keep their place
        if len(seen) > limits.max_columns:
            raise InvalidFile(f"The file's objects have more than {limits.max_columns} different keys, the most "
                              "columns accepted (MAX_COLUMNS).",
                              details={"limit": "MAX_COLUMNS", "max": limits.max_columns})
        for key in (value if wanted is None else wanted):
            v = value.get(key)
            if v is not None:
                kinds.setdefault(key, set()).add(type(v))
    types = {key: _JSON_TYPES.get(frozenset(kinds.get(key, ()))) for key in seen}
    return list(seen), types


def objects_table(objects: Sequence[dict[str, Any]], rows: Sequence[int],
                  names: Sequence[str]) -> tuple[pa.Table, list[RowError]]:
    """Parsed JSON objects as a table of the named columns plus __row, keeping each value's JSON type.

    An object with a named value nested too deeply to be kept as JSON text is left out, as a malformed_row.
    """
    try:
        return _objects_table(objects, rows, names), []
    except orjson.JSONEncodeError:
        pass
    good = [i for i, o in enumerate(objects) if _encodable(o, names)]
    bad = sorted(set(range(len(objects))) - set(good))
    errors = [RowError(rows[i], "malformed_row", f"row {rows[i]}: a value is nested more than {_MAX_DEPTH} levels deep")
              for i in bad]
    return _objects_table([objects[i] for i in good], [rows[i] for i in good], names), errors


def _objects_table(objects: Sequence[dict[str, Any]], rows: Sequence[int], names: Sequence[str]) -> pa.Table:
    arrays, mixed = [], []
    for name in names:
        array, is_mixed = json_column([o.get(name) for o in objects])
        arrays.append(array)
        if is_mixed:
            mixed.append(name)
    arrays.append(pa.array(rows, type=pa.int64()))
    return pa.Table.from_arrays(arrays, names=[*names, ROW], metadata=_marker(mixed))


def _encodable(record: dict[str, Any], names: Sequence[str]) -> bool:
    try:
        for name in names:
            orjson.dumps(record.get(name))
    except orjson.JSONEncodeError:
        return False
    return True


def records_batches(records: Sequence[Any], wanted: Sequence[str], batch_rows: int,
                    limits: Limits | None = None) -> Iterator[Batch]:
    """The `rows` of a JSON request body as batches; an element that is not an object is a malformed_row, and
    one with a text value longer than MAX_CELL_BYTES an invalid_value."""
    max_cell = (limits or Limits.from_settings()).max_cell_bytes
    for start in range(0, len(records), batch_rows):
        objects, rows, errors = [], [], []
        for pos, record in enumerate(records[start:start + batch_rows], start):
            if isinstance(record, dict):
                objects.append(record)
                rows.append(pos)
            else:
                errors.append(RowError(pos, "malformed_row", f"row {pos} is not a JSON object"))
        table, nested = objects_table(objects, rows, wanted)
        table, long = _drop_long_cells(table, max_cell)
        if nested or long:
            errors = sorted(errors + nested + long, key=lambda e: e.row)
        yield Batch(table, errors)


def _load_object(line: bytes) -> dict[str, Any] | str:
    """The line's JSON object, or why it is not one."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(value, dict):
        return value
    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
    return f"found {kind}"


def json_column(values: Sequence[Any]) -> tuple[pa.Array, bool]:
    """One key's values as an Arrow array; as JSON texts (and True) when their JSON types are mixed or nested."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds or kinds <= {int, float} or kinds == {bool} or kinds == {str}:
        try:
            return pa.array(values), False
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # integers beyond 64 bits
    return pa.array([None if v is None else orjson.dumps(v).decode() for v in values], type=pa.string()), True


def _marker(mixed: list[str]) -> dict[bytes, bytes] | None:
    """Schema metadata naming the columns that hold JSON texts."""
    return {JSON_MIXED_KEY: ",".join(mixed).encode()} if mixed else None


def _conform(table: pa.Table, names: list[str]) -> pa.Table:
    """Exactly `names` then __row (the table's last column); a name absent from the block gives an all-null column."""
    present = set(table.column_names[:-1])
    arrays = [table.column(c) if c in present else pa.nulls(table.num_rows) for c in names]
    mixed = [c for c in json_mixed_columns(table.schema) if c in names]
    return pa.Table.from_arrays([*arrays, table.column(table.num_columns - 1)], names=[*names, ROW],
                                metadata=_marker(mixed))


# -- Parquet ------------------------------------------------------------------------------------------

class _ParquetReader(Reader):
    """Parquet, spooled to a temporary file because its footer comes last; column types stay as in the file.

    Before any row is read, the footer's size, the column count (MAX_COLUMNS), the row count (MAX_JOB_ROWS) and
    the uncompressed size of each kept column chunk per row (MAX_CELL_BYTES) are checked, and batches are sized so
    that one decompresses to about MAX_CHUNK_BYTES. Text columns are read as dictionaries and decoded by the
    reader, a batch at a time, after rows with values longer than MAX_CELL_BYTES are set aside: a short file
    whose few long values are repeated on every row cannot make a batch decode to gigabytes.
    """

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int, spool_dir: str | None,
                 limits: Limits):
        self._path: str | None = _spool(stream, spool_dir)
        self._source: pa.NativeFile | None = None
        try:
            size = os.path.getsize(self._path)
            if not size:
                raise InvalidFile("The file is empty.")
            self._source = pa.OSFile(self._path)  # not mapped: mapped pages would count in the process's memory
            _check_footer(self._source, size)
            self._file = _open_parquet(self._source)
            metadata = self._file.metadata
            if metadata.num_columns > limits.max_columns:
                raise too_wide(metadata.num_columns, limits)
            if metadata.num_rows > limits.max_rows:
                raise too_many_rows(limits.max_rows, metadata.num_rows)
            super().__init__(self._file.schema_arrow.names, wanted, batch_rows, limits)
            schema = self._file.schema_arrow
            # Text columns the file does not itself store as dictionaries: read as dictionaries, decoded here.
            self._decode = [c for c in self._keep if any(check(schema.field(c).type) for check in _TEXT)]
            if self._decode:
                self._file = pq.ParquetFile(self._source, metadata=metadata, read_dictionary=self._decode,
                                            buffer_size=_PARQUET_BUFFER, pre_buffer=False)
            self._batch_size = self._plan(schema)
        except BaseException:
            self._release()
            raise

    def _plan(self, schema: pa.Schema) -> int:
        """Rows per batch read; InvalidFile when a kept column's values are longer than MAX_CELL_BYTES on average."""
        metadata = self._file.metadata
        leaves, start = {}, 0
        for f in schema:
            n = _leaf_count(f.type)
            leaves[f.name] = range(start, start + n)
            start += n
        known = start == metadata.num_columns  # else an unusual mapping of Arrow to Parquet: judge whole rows
        limit = self._limits.max_cell_bytes
        row_bytes = 1.0
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            rows = max(group.num_rows, 1)
            if not known:
                row_bytes = max(row_bytes, group.total_byte_size / rows)
                continue
            total = 0.0
            for name in self._keep:
                size = sum(group.column(i).total_uncompressed_size for i in leaves[name])
                if size / rows > limit:
                    raise InvalidFile(f"Column {name!r} holds {size // rows} bytes a row on average (row group {g}), "
                                      f"more than the {limit} bytes one value may hold (MAX_CELL_BYTES): the file is "
                                      "not read.", details={"limit": "MAX_CELL_BYTES", "max": limit, "column": name})
                total += max(size / rows, 8)  # decoded, a value takes at least 8 bytes (its value or offset)
            row_bytes = max(row_bytes, total)
        return max(1, min(self._batch_rows, _PARQUET_BATCH_ROWS, int(self._limits.max_batch_bytes // row_bytes)))

    def _pieces(self) -> Iterator[pa.Table]:
        position = 0
        max_bytes = self._limits.max_batch_bytes
        try:
            for batch in self._file.iter_batches(batch_size=self._batch_size, columns=self._keep, use_threads=False):
                rows = pa.array(np.arange(position, position + batch.num_rows, dtype=np.int64))
                position += batch.num_rows
                table = pa.Table.from_batches([batch]).append_column(ROW, rows)
                table, long = _drop_long_cells(table, self._limits.max_cell_bytes)
                _queue(self._pending, long)
                if not self._decode:
                    yield table
                    continue
                # Decoded, the text columns take the sum of their values' lengths: cut the batch to stay in bounds.
                lengths = sum(pc.fill_null(_value_lengths(table.column(c)), 0).to_numpy().astype(np.int64)
                              for c in self._decode)
                start = 0
                while start < table.num_rows:
                    total = np.cumsum(lengths[start:])
                    stop = start + max(1, int(np.searchsorted(total, max_bytes // 4, side="right")))
                    yield _decoded(table.slice(start, stop - start), self._decode)
                    start = stop
        except pa.ArrowException as exc:
            raise InvalidFile("The Parquet file is corrupt.", details={"reason": _detail(exc)}) from exc

    def _release(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._path is not None:
            os.unlink(self._path)
            self._path = None


def _decoded(table: pa.Table, names: list[str]) -> pa.Table:
    """The table with the named dictionary columns decoded to their value type."""
    for name in names:
        i = table.column_names.index(name)
        column = table.column(i)
        values = pa.chunked_array([c.dictionary_decode() for c in column.chunks], type=column.type.value_type)
        table = table.set_column(i, pa.field(name, column.type.value_type), values)
    return table


def _leaf_count(t: pa.DataType) -> int:
    """Parquet columns (leaves) an Arrow type is stored as."""
    if pa.types.is_struct(t):
        return sum(_leaf_count(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _leaf_count(t.key_type) + _leaf_count(t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _leaf_count(t.value_type)
    if pa.types.is_dictionary(t):
        return _leaf_count(t.value_type)
    return 1


def _check_footer(source: pa.NativeFile, size: int) -> None:
    """Refuse a file that does not end as Parquet does, or whose footer is too large to parse safely."""
    if size < 12:
        raise InvalidFile("The file is not a Parquet file, or it is truncated: it is too short.")
    source.seek(size - 8)
    tail = source.read(8)
    source.seek(0)
    if tail[4:] != b"PAR1":
        raise InvalidFile("The Parquet file is truncated: it does not end with PAR1, so its footer is missing.")
    footer = int.from_bytes(tail[:4], "little")
    if footer > size - 12:
        raise InvalidFile("The Parquet file is truncated or corrupt: its footer is longer than the file.")
    if footer > _MAX_FOOTER:
        raise InvalidFile(f"The Parquet footer is {footer >> 20} MiB, more than the {_MAX_FOOTER >> 20} MiB accepted "
                          "(a file of too many columns or row groups).", details={"footer_bytes": footer})


def _spool(stream: BinaryIO, spool_dir: str | None) -> str:
    """The path of a new temporary file holding the rest of the stream, copied a piece at a time."""
    fd, path = tempfile.mkstemp(prefix="predq-upload-", suffix=".parquet", dir=spool_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_SPOOL_PIECE):
                out.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _open_parquet(source: pa.NativeFile) -> pq.ParquetFile:
    """The Parquet file's reader, or InvalidFile when its footer or schema cannot be read."""
    try:
        # Column chunks are read through a small buffer, not whole: a file written as one big row group (pandas'
        # default) is then read in memory of the order of a batch, not of the row group.
        return pq.ParquetFile(source, buffer_size=_PARQUET_BUFFER, pre_buffer=False)
    except pa.ArrowException as exc:
        raise InvalidFile("The file is not a Parquet file, or it is truncated.",
                          details={"reason": _detail(exc)}) from exc
