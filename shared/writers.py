"""Output writers: results and row errors streamed as JSON Lines, CSV or Parquet, one chunk at a time."""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
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


_JSONL_SLICE = 65536  # rows encoded at a time: bounds the memory a download holds, whatever the chunk size
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'
_NULL = pa.scalar(None, pa.string())


def _json_texts(column: pa.ChunkedArray) -> pa.Array:
    """Each value of a column as JSON text, made by Arrow where it can be, reading back as orjson's would."""
    col = column.combine_chunks()
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        text = pc.cast(col, pa.string())
    elif pa.types.is_floating(t):
        col = pc.cast(col, pa.float64())
        text = pc.cast(col, pa.string())  # the shortest text that reads back as the same double, as orjson's
        whole = pc.invert(pc.match_substring_regex(text, "[.en]"))  # "3" is written "3.0", as orjson does
        text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
        text = pc.if_else(pc.is_finite(col), text, _NULL)  # NaN and infinities are null
    elif (pa.types.is_string(t) or pa.types.is_large_string(t)) and not pc.any(
            pc.match_substring_regex(col, _NEEDS_ESCAPE)).as_py():
        text = pc.binary_join_element_wise('"', pc.cast(col, pa.string()), '"', "")
    else:
        text = pa.array([None if v is None else orjson.dumps(v).decode() for v in col.to_pylist()], pa.string())
    return pc.fill_null(text, "null")


def _jsonl(tables: Iterable[pa.Table]) -> Iterator[bytes]:
    """One JSON object per row, built column by column: no Python work per row for numbers and plain text."""
    for table in tables:
        keys = [orjson.dumps(n).decode() + ":" for n in table.column_names]
        for start in range(0, table.num_rows, _JSONL_SLICE):
            part = table.slice(start, _JSONL_SLICE)
            pieces: list = []
            for i, column in enumerate(part.columns):
                pieces += [("{" if i == 0 else ",") + keys[i], _json_texts(column)]
            lines = pc.binary_join_element_wise(*pieces, "}\n", "")
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset:lines.offset + len(lines) + 1]
            yield lines.buffers()[2][int(offsets[0]):int(offsets[-1])].to_pybytes()


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
    # A row group per chunk: gathering chunks into bigger row groups was no faster here and the Parquet writer
    # held about 50 MiB more (bench/README.md).
    sink = _Drain()
    writer = None
    for table in tables:
        if writer is None:
            writer = _parquet_writer(sink, table.schema)
        writer.write_table(table if table.schema.equals(writer.schema) else table.cast(writer.schema))
        yield sink.take()
    if writer is None:
        writer = _parquet_writer(sink, empty_schema)
    writer.close()
    yield sink.take()


def _parquet_writer(sink: _Drain, schema: pa.Schema) -> pq.ParquetWriter:
    # Dictionaries only for text (labels, ids, error codes repeat; row numbers and scores do not), and zstd's
    # fastest level: half the time of the defaults and a smaller file for results (bench/README.md).
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return pq.ParquetWriter(sink, schema, compression="zstd", compression_level=1, use_dictionary=text)


def stream(fmt: str, tables: Iterable[pa.Table], empty_schema: pa.Schema) -> Iterator[bytes]:
    """Encode tables (already in row order) as one file in `fmt`, yielding bytes as each table is done."""
    if fmt == "jsonl":
        return _jsonl(tables)
    if fmt == "csv":
        return _csv(tables, empty_schema)
    return _parquet(tables, empty_schema)
