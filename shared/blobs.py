"""Chunk blobs: Arrow IPC streams with cheap compression, the form chunks take in the store."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

ROW = "__row"  # each row's 0-based position in the input
JSON_MIXED_KEY = b"predq.json_mixed"  # schema metadata: columns holding JSON texts of mixed JSON types
_PRE_ERRORS = b"predq.row_errors"
_CSV = b"predq-csv/1\n"  # unparsed CSV records: this, a JSON line describing them, then their bytes


def json_mixed_columns(schema: pa.Schema) -> frozenset[str]:
    """The columns a table's schema marks as holding JSON texts."""
    raw = (schema.metadata or {}).get(JSON_MIXED_KEY)
    return frozenset(raw.decode().split(",")) if raw else frozenset()


def encode(table: pa.Table, compression: str | None = "zstd", row_errors: list | None = None) -> memoryview:
    """Serialise a table (and the row errors found while reading it) to one compressed blob.

    The blob is a view of Arrow's buffer, which Redis clients send as it is: a copy into a bytes object would
    touch every page of a new multi-megabyte allocation. Uncompressed, the stream's size is known before it is
    written, so it is written once into a buffer of that size rather than into one that grows.
    """
    if row_errors:
        meta = dict(table.schema.metadata or {})
        meta[_PRE_ERRORS] = json.dumps([list(e) for e in row_errors]).encode()
        table = table.replace_schema_metadata(meta)
    codec = None if compression in (None, "none") else compression
    options = pa.ipc.IpcWriteOptions(compression=codec)
    if codec is None:
        size = pa.MockOutputStream()
        _write(size, table, options)
        buffer = pa.allocate_buffer(size.size())
        _write(pa.FixedSizeBufferWriter(buffer), table, options)
        return memoryview(buffer).cast("B")
    sink = pa.BufferOutputStream()
    _write(sink, table, options)
    return memoryview(sink.getvalue()).cast("B")


def _write(sink: pa.NativeFile, table: pa.Table, options: pa.ipc.IpcWriteOptions) -> None:
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)


class Compression:
    """The codec for one job's chunks: the configured one while it pays, none once it does not.

    The first chunk is compressed with `codec`; if it keeps more than `keep` of its size, the job's other chunks
    are stored uncompressed. A chunk's input stays in the store only until the chunk commits, and compressing it
    takes the cores the model needs: CSV text (zstd keeps 0.42 of it) pays; binary floats (0.69 for values of six
    significant digits, 0.98 for random ones) do not, as zstd costs the API about 0.5 CPU-seconds per 1M rows
    of 20 floats, a fifth of what the model's predictions cost.
    """

    def __init__(self, codec: str | None, keep: float = 0.6):
        self.codec = None if codec in (None, "none") else codec
        self.keep = keep
        self._decided = self.codec is None

    def observe(self, raw_bytes: int, stored_bytes: int) -> None:
        """Judge the first compressed chunk by the bytes it had and the bytes it took."""
        if self._decided:
            return
        self._decided = True
        if raw_bytes > 0 and stored_bytes > self.keep * raw_bytes:
            self.codec = None


def decode(blob: bytes) -> tuple[pa.Table, list[tuple[int, str, str]]]:
    """The table and the row errors stored with it."""
    table = pa.ipc.open_stream(pa.py_buffer(blob)).read_all()
    meta = table.schema.metadata or {}
    errors = [tuple(e) for e in json.loads(meta[_PRE_ERRORS])] if _PRE_ERRORS in meta else []
    return table, errors


def encode_csv(data: bytes, layout: dict[str, Any], compression: str | None = "zstd") -> bytes:
    """Unparsed CSV records and what reading them needs (columns, positions), compressed like Arrow blobs."""
    codec = None if compression in (None, "none") else compression
    payload = pa.Codec(codec).compress(data, asbytes=True) if codec else data
    head = json.dumps({**layout, "codec": codec, "size": len(data)}).encode()
    return _CSV + head + b"\n" + payload


def is_csv(blob: bytes) -> bool:
    return blob.startswith(_CSV)


def decode_csv(blob: bytes) -> tuple[bytes, dict[str, Any]]:
    """The records' bytes and their layout, as given to encode_csv."""
    end = blob.index(b"\n", len(_CSV))
    layout = json.loads(blob[len(_CSV):end])
    payload = memoryview(blob)[end + 1:]
    codec = layout.pop("codec")
    data = pa.Codec(codec).decompress(payload, decompressed_size=layout.pop("size"), asbytes=True) if codec \
        else bytes(payload)
    return data, layout
