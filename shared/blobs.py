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


def encode(table: pa.Table, compression: str | None = "zstd", row_errors: list | None = None) -> bytes:
    """Serialise a table (and the row errors found while reading it) to one compressed blob."""
    if row_errors:
        meta = dict(table.schema.metadata or {})
        meta[_PRE_ERRORS] = json.dumps([list(e) for e in row_errors]).encode()
        table = table.replace_schema_metadata(meta)
    options = pa.ipc.IpcWriteOptions(compression=None if compression in (None, "none") else compression)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class Compression:
    """The codec for one job's chunks: the configured one while it pays, none once it does not.

    The first chunk is compressed with `codec`; if it keeps more than `keep` of its size (random floats, say, or
    text that is already compressed), the job's other chunks are stored uncompressed, which costs the API and
    the workers no CPU for nothing.
    """

    def __init__(self, codec: str | None, keep: float = 0.8):
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
