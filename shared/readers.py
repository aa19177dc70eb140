"""Streaming readers for uploaded batch files (CSV, JSON Lines, Parquet) as Arrow tables of bounded size.

Every table carries an int64 ``__row`` column: each row's 0-based position among all the input's records,
malformed ones included, so that results and errors can be reported against the caller's own numbering.
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
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from shared.blobs import JSON_MIXED_KEY, ROW, json_mixed_columns
from shared.errors import InvalidFile, UnsupportedFormat

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
_MAX_LINE = 64 << 20        # a longer JSON line is refused rather than buffered
_SPOOL_PIECE = 1 << 20

_LINE_BREAK = re.compile(rb"[\r\n]")
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")
_EMPTY_LINE = re.compile(rb"\n\n")          # (a regular expression finds it faster than bytes.find)
_EMPTY_LINE_CR = re.compile(rb"\n\r?\n")
_BLANK_FIRST_LINE = re.compile(rb"[ \t\r]*\n")
_UNHANDLED_ROW = re.compile(r"Expected \d+ columns, got \d+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*")


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

    def __init__(self, columns: list[str], wanted: list[str] | None, batch_rows: int):
        _check_names(columns)
        self.columns = columns
        self._keep = _keep(columns, wanted)
        self._batch_rows = batch_rows
        self._pending: deque[RowError] = deque()
        self._batches: Generator[Batch, None, None] | None = None

    def __iter__(self) -> Iterator[Batch]:
        if self._batches is not None:
            raise RuntimeError("a reader can only be iterated once")
        self._batches = _rebatch(self._pieces(), self._pending, self._batch_rows, self._schema())
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
                batch_rows: int = 65536, spool_dir: str | None = None, split_csv: bool = False) -> Reader:
    """A reader over the stream, having read just enough of it to know the file's columns.

    With split_csv, CSV comes as CsvPiece items of batch_rows records for workers to parse (parse_csv_piece),
    as far as the file allows, and as Batch items after that.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if fmt == "csv":
        return _CsvSplitter(stream, wanted, batch_rows) if split_csv else _CsvReader(stream, wanted, batch_rows)
    if fmt == "jsonl":
        return _JsonlReader(stream, wanted, batch_rows)
    if fmt == "parquet":
        return _ParquetReader(stream, wanted, batch_rows, spool_dir)
    raise UnsupportedFormat(f"Unsupported file format {fmt!r}: send {_ACCEPTED}.", details={"accepted": list(FORMATS)})


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
             schema: pa.Schema) -> Generator[Batch, None, None]:
    """Batches of at most batch_rows rows from pieces of any size; pieces typed differently are never merged."""
    held: list[pa.Table] = []
    held_rows = 0
    for piece in pieces:
        if not piece.num_rows:
            continue
        if held and not piece.schema.equals(schema, check_metadata=True):
            yield _batch(pa.concat_tables(held), pending)
            held, held_rows = [], 0
        schema = piece.schema
        held.append(piece)
        held_rows += piece.num_rows
        while held_rows >= batch_rows:
            table = pa.concat_tables(held)  # zero-copy: the chunks are only referenced
            yield _batch(table.slice(0, batch_rows), pending)
            rest = table.slice(batch_rows)
            held, held_rows = ([rest] if rest.num_rows else []), rest.num_rows
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
                 columns: list[str] | None = None, base: int = 0, floats: Sequence[str] = ()):
        """With `columns`, the stream starts after the header, its first record at input position `base`.

        Columns named in `floats` are parsed as float64 directly; a cell that is not a number raises
        _NotNumbers (the caller reads them as text instead, for validation to name the bad cells).
        """
        if columns is None:
            columns, rest = _read_header(stream)
        else:
            rest = b""
        super().__init__(columns, wanted, batch_rows)
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
                yield table.append_column(ROW, pa.array(self._positions(batch.num_rows)))
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

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int):
        header, rest = _read_header(stream)
        super().__init__(header, wanted, batch_rows)
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
        held_rows = 0
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
            if count < 0 or held_rows + count >= self._batch_rows:  # a piece ends in this block
                ends = _record_ends(block, last, plain)
                start = 0
                while held_rows + len(ends) >= self._batch_rows:
                    take = self._batch_rows - held_rows
                    cut = int(ends[take - 1]) + 1
                    held.append(block[start:cut])
                    yield CsvPiece(b"".join(held), self._batch_rows, base)
                    base += self._batch_rows
                    held, held_rows = [], 0
                    ends, start = ends[take:], cut
                held.append(block[start:])
                held_rows += len(ends)
            else:
                held.append(block)
                held_rows += count
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
        self._parser = _CsvReader(stream, self._keep, self._batch_rows, columns=self.columns, base=base)
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
                    floats: Sequence[str]) -> tuple[pa.Table, list[RowError]]:
    """A piece's rows (wanted columns and ``__row``) and malformed records, as _CsvReader reads them.

    Numeric columns are parsed as float64; if one of them has a cell that is not a number, the piece is read
    again with every column as text. A piece whose record count differs from the splitter's (which cannot
    happen for text the splitter leaves unparsed) has every row reported as malformed rather than misplaced.
    """
    for typed in (floats, ()):
        reader = _CsvReader(io.BytesIO(piece.data), wanted, max(piece.rows, 1), columns=columns, base=piece.base,
                            floats=typed)
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


def _read_header(stream: BinaryIO) -> tuple[list[str], bytes]:
    """The header row's names and the bytes read beyond it."""
    buf = b""
    while (end := _header_end(buf)) < 0:
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

    A block is parsed by pyarrow when it can be, else line by line. A column whose values in a block are of
    mixed JSON types, or objects/arrays, holds each non-null value as JSON text and is named in the table's
    schema metadata under JSON_MIXED_KEY, so that validation can tell the string "1.5" from the number 1.5.
    `columns` is the union of the keys in the first block; keys first seen later are ignored.
    """

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int):
        self._stream = stream
        self._tail = b""
        self._eof = False
        self._line = 0                   # physical lines consumed
        self._pos = 0                    # records (non-blank lines) consumed
        self._as_text: set[str] = set()  # columns pyarrow would otherwise turn into timestamps
        block = self._next_block()
        if block is None:
            raise InvalidFile("The file is empty.")
        if block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8):]
        first, errors = self._parse(block, None)
        if not first.num_rows:
            reason = errors[0].message if errors else "it holds only blank lines"
            raise InvalidFile(f"The file cannot be read as JSON Lines: {reason}.")
        super().__init__(first.column_names[:-1], wanted, batch_rows)
        self._head = [(_conform(first, self._keep), errors)]  # parsed to learn the columns; handed out first

    def _pieces(self) -> Iterator[pa.Table]:
        table, errors = self._head.pop()
        while True:
            self._pending.extend(errors)
            yield table
            block = self._next_block()
            if block is None:
                return
            table, errors = self._parse(block, self._keep)
            table = _conform(table, self._keep)

    def _next_block(self) -> bytes | None:
        """The next run of whole lines (about _JSON_BLOCK bytes, ending with a newline), or None at the end."""
        buf = self._tail
        while not self._eof:
            chunk = _read_full(self._stream, _JSON_BLOCK)
            self._eof = len(chunk) < _JSON_BLOCK
            buf += chunk
            cut = buf.rfind(b"\n") + 1
            if cut:
                self._tail = buf[cut:]
                return buf[:cut]
            if len(buf) > _MAX_LINE:
                raise InvalidFile(f"Line {self._line + 1} is longer than {_MAX_LINE >> 20} MiB.")
        self._tail = b""
        if not buf:
            return None
        return buf if buf.endswith(b"\n") else buf + b"\n"

    def _parse(self, block: bytes, names: list[str] | None) -> tuple[pa.Table, list[RowError]]:
        """The block's records (columns `names`, or every key if None, then __row) and its malformed lines."""
        table = self._parse_fast(block, names)
        if table is None:
            return self._parse_lines(block, names)
        rows = pa.array(np.arange(self._pos, self._pos + table.num_rows, dtype=np.int64))
        self._pos += table.num_rows
        self._line += table.num_rows
        return table.append_column(ROW, rows), []

    def _parse_fast(self, block: bytes, names: list[str] | None) -> pa.Table | None:
        """The block parsed by pyarrow, or None when only parsing line by line gives every record its place."""
        if _BLANK_LINE.search(block) or _BLANK_FIRST_LINE.match(block):
            return None  # pyarrow skips blank lines too, but then its rows could not be matched to lines
        try:
            table = self._read_json(block)
            temporal = [f.name for f in table.schema if pa.types.is_temporal(f.type)]
            if temporal:
                # pyarrow reads ISO-looking strings as timestamps: keep them the strings they are, as lines parse.
                self._as_text.update(temporal)
                table = self._read_json(block).select(table.column_names)
        except (pa.ArrowException, ValueError):
            return None  # mixed types in a column, a line that is not an object, invalid UTF-8...
        kept = table.column_names if names is None else [c for c in names if c in table.column_names]
        # With no blank line, as many rows as lines means exactly one object per line.
        if table.num_rows != block.count(b"\n") or not all(_plain(table.schema.field(c).type) for c in kept):
            return None
        return table

    def _read_json(self, block: bytes) -> pa.Table:
        """pyarrow's parse of the block, with the columns once seen as timestamps read as text."""
        schema = pa.schema([(c, pa.string()) for c in sorted(self._as_text)]) if self._as_text else None
        return pajson.read_json(pa.BufferReader(block),
                                read_options=pajson.ReadOptions(use_threads=True, block_size=_JSON_ARROW_BLOCK),
                                parse_options=pajson.ParseOptions(explicit_schema=schema))

    def _parse_lines(self, block: bytes, names: list[str] | None) -> tuple[pa.Table, list[RowError]]:
        """The block parsed line by line: malformed lines become errors, the objects columns."""
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        errors: list[RowError] = []
        for line in block.split(b"\n")[:-1]:  # the block ends with a newline
            self._line += 1
            if not line.strip():
                continue
            value = _load_object(line)
            if isinstance(value, str):
                errors.append(RowError(self._pos, "malformed_row", f"line {self._line}: not a JSON object: {value}"))
            else:
                records.append(value)
                rows.append(self._pos)
            self._pos += 1
        if names is None:
            names = list(dict.fromkeys(k for r in records for k in r))
        return objects_table(records, rows, names), errors


def objects_table(objects: Sequence[dict[str, Any]], rows: Sequence[int], names: Sequence[str]) -> pa.Table:
    """Parsed JSON objects as a table of the named columns plus __row, keeping each value's JSON type."""
    arrays, mixed = [], []
    for name in names:
        array, is_mixed = json_column([o.get(name) for o in objects])
        arrays.append(array)
        if is_mixed:
            mixed.append(name)
    arrays.append(pa.array(rows, type=pa.int64()))
    return pa.Table.from_arrays(arrays, names=[*names, ROW], metadata=_marker(mixed))


def records_batches(records: Sequence[Any], wanted: Sequence[str], batch_rows: int) -> Iterator[Batch]:
    """The `rows` of a JSON request body as batches; an element that is not an object is a malformed_row."""
    for start in range(0, len(records), batch_rows):
        objects, rows, errors = [], [], []
        for pos, record in enumerate(records[start:start + batch_rows], start):
            if isinstance(record, dict):
                objects.append(record)
                rows.append(pos)
            else:
                errors.append(RowError(pos, "malformed_row", f"row {pos} is not a JSON object"))
        yield Batch(objects_table(objects, rows, wanted), errors)


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


def _plain(t: pa.DataType) -> bool:
    """Whether pyarrow typed a column as line parsing would (anything else is parsed line by line)."""
    return (pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_string(t)
            or t == pa.int64() or t == pa.float64())


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
    """Parquet, spooled to a temporary file because its footer comes last; column types stay as in the file."""

    def __init__(self, stream: BinaryIO, wanted: list[str] | None, batch_rows: int, spool_dir: str | None):
        self._path: str | None = _spool(stream, spool_dir)
        self._source: pa.NativeFile | None = None
        try:
            if not os.path.getsize(self._path):
                raise InvalidFile("The file is empty.")
            self._source = pa.OSFile(self._path)  # not mapped: mapped pages would count in the process's memory
            self._file = _open_parquet(self._source)
            super().__init__(self._file.schema_arrow.names, wanted, batch_rows)
        except BaseException:
            self._release()
            raise

    def _pieces(self) -> Iterator[pa.Table]:
        position = 0
        try:
            for batch in self._file.iter_batches(batch_size=self._batch_rows, columns=self._keep, use_threads=False):
                rows = pa.array(np.arange(position, position + batch.num_rows, dtype=np.int64))
                position += batch.num_rows
                yield pa.Table.from_batches([batch]).append_column(ROW, rows)
        except pa.ArrowException as exc:
            raise InvalidFile("The Parquet file is corrupt.", details={"reason": _detail(exc)}) from exc

    def _release(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._path is not None:
            os.unlink(self._path)
            self._path = None


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
        return pq.ParquetFile(source, buffer_size=_SPOOL_PIECE, pre_buffer=False)
    except pa.ArrowException as exc:
        raise InvalidFile("The file is not a Parquet file, or it is truncated.",
                          details={"reason": _detail(exc)}) from exc
