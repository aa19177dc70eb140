"""Output writers: results and row errors streamed as JSON Lines, CSV or Parquet, one chunk at a time."""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


class _Drain(io.RawIOBase):
    """A write-only sink whose bytes are taken out after each chunk, so nothing piles up in memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


_JSONL_SLICE = 4096  # rows encoded at a time: bounds the memory a download holds, whatever the chunk size


def _jsonl(tables: Iterable[pa.Table]) -> Iterator[bytes]:
    for table in tables:
        names = table.column_names
        for start in range(0, table.num_rows, _JSONL_SLICE):
            part = table.slice(start, _JSONL_SLICE)
            columns = [part.column(n).to_pylist() for n in names]
            yield b"".join(orjson.dumps(dict(zip(names, values))) + b"\n" for values in zip(*columns))


def _csv(tables: Iterable[pa.Table], empty_schema: pa.Schema) -> Iterator[bytes]:
    sink = _Drain()
    writer = None
    schema = empty_schema
    for table in tables:
        if writer is None:
            schema = table.schema
            writer = pacsv.CSVWriter(sink, schema)
        writer.write_table(table if table.schema.equals(schema) else table.cast(schema))
        yield sink.take()
    if writer is None:
        writer = pacsv.CSVWriter(sink, empty_schema)
    writer.close()
    yield sink.take()


def _parquet(tables: Iterable[pa.Table], empty_schema: pa.Schema) -> Iterator[bytes]:
    sink = _Drain()
    writer = None
    for table in tables:
        if writer is None:
            writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
        writer.write_table(table if table.schema.equals(writer.schema) else table.cast(writer.schema))
        yield sink.take()
    if writer is None:
        writer = pq.ParquetWriter(sink, empty_schema, compression="zstd")
    writer.close()
    yield sink.take()


def stream(fmt: str, tables: Iterable[pa.Table], empty_schema: pa.Schema) -> Iterator[bytes]:
    """Encode tables (already in row order) as one file in `fmt`, yielding bytes as each table is done."""
    if fmt == "jsonl":
        return _jsonl(tables)
    if fmt == "csv":
        return _csv(tables, empty_schema)
    return _parquet(tables, empty_schema)
