"""Hostile input files, generated at test time: files that lie about their type, are cut short, are not UTF-8,
hold a line of 100 MB or a million columns, decompress to gigabytes, or are plain garbage.

Each case is a file name, its bytes (or a function giving them piece by piece, for the big ones) and what a
correct service answers: the status and error code of the upload, or the job's end and the rows' error codes.
The model is the test model `fussy` (features f0..f4, float64), so a good row is `id,f0,f1,f2,f3,f4`.
"""
from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = ["f0", "f1", "f2", "f3", "f4"]
HEADER = b"id," + ",".join(FEATURES).encode() + b"\n"
MB = 1 << 20


def good_rows(n: int, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(start + 7)
    values = rng.normal(size=(n, len(FEATURES))).round(6)
    return [{"id": f"r{start + i}", **dict(zip(FEATURES, map(float, row)))} for i, row in enumerate(values)]


def csv_bytes(n: int, start: int = 0) -> bytes:
    lines = [f"{r['id']},{','.join(repr(r[f]) for f in FEATURES)}" for r in good_rows(n, start)]
    return HEADER + ("\n".join(lines) + "\n").encode()


def jsonl_bytes(n: int, start: int = 0) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in good_rows(n, start))


def parquet_bytes(table: pa.Table, **options) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def good_parquet(n: int) -> bytes:
    rows = good_rows(n)
    return parquet_bytes(pa.table({"id": [r["id"] for r in rows], **{f: [r[f] for r in rows] for f in FEATURES}}))


@dataclass
class Case:
    """A hostile upload and the answer it must get.

    `status` 422/413/415: the upload is refused with `code`. `status` 202: a job is made and ends `job_status`,
    with `row_errors` (row -> code) among its errors (`message_has` in each one's message, if given).
    """

    name: str
    filename: str
    body: Callable[[], Iterator[bytes]]
    status: int
    code: str | None = None
    message_has: str = ""
    job_status: str | None = None
    row_errors: dict[int, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=lambda: {"id_column": "id"})

    def data(self) -> bytes:
        return b"".join(self.body())


def _once(data: bytes | Callable[[], bytes]) -> Callable[[], Iterator[bytes]]:
    def pieces() -> Iterator[bytes]:
        yield data() if callable(data) else data
    return pieces


def _zip(data: bytes) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("input.csv", data)
    return sink.getvalue()


def _png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    raw = b"".join(b"\x00" + bytes(3 * 16) for _ in range(16))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (16).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _garbage(n: int, seed: int = 3) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _long_line(prefix: bytes, size: int, fill: bytes, suffix: bytes) -> Callable[[], Iterator[bytes]]:
    """prefix, then `size` bytes of `fill`, then suffix, in 1 MiB pieces (never held whole)."""
    def pieces() -> Iterator[bytes]:
        yield prefix
        block = fill * (MB // len(fill))
        for _ in range(size // len(block)):
            yield block
        yield suffix
    return pieces


def _wide_csv_header(columns: int) -> Callable[[], Iterator[bytes]]:
    def pieces() -> Iterator[bytes]:
        step = 50_000
        for start in range(0, columns, step):
            names = ",".join(f"c{i}" for i in range(start, min(start + step, columns)))
            yield (names + ("," if start + step < columns else "\n")).encode()
        yield b"1\n"
    return pieces


def _jsonl_key_explosion(lines: int, after: bytes = b"") -> Callable[[], Iterator[bytes]]:
    """JSON Lines where every line has a key no other line has (a table of lines x keys, if parsed naively)."""
    def pieces() -> Iterator[bytes]:
        yield after
        step = 50_000
        for start in range(0, lines, step):
            yield b"".join(b'{"k%d":%d}\n' % (i, i) for i in range(start, min(start + step, lines)))
    return pieces


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _dictionary_bomb(rows: int, value_bytes: int) -> bytes:
    """Parquet whose `id` and `f0` are one long text repeated on every row, dictionary-encoded: about a KiB on
    disk, 2 x rows x value_bytes once decoded (the Arrow schema is not stored, so the columns read as strings)."""
    value = pa.array(["x" * value_bytes])
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), value)
    table = pa.table({"id": column, "f0": column, **{f: pa.array(np.zeros(rows)) for f in FEATURES[1:]}})
    return parquet_bytes(table, compression="zstd", row_group_size=rows, store_schema=False)


def _dictionary_of_long_values(rows: int, value_bytes: int) -> bytes:
    """Parquet whose `id` is one text longer than MAX_CELL_BYTES repeated on every row, dictionary-encoded."""
    value = pa.array(["v" * value_bytes])
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), value)
    table = pa.table({"id": column, **{f: pa.array(np.zeros(rows)) for f in FEATURES}})
    return parquet_bytes(table, compression="zstd", row_group_size=rows, store_schema=False)


def _long_values_bomb(rows: int, value_bytes: int) -> bytes:
    """Parquet of a few rows whose `id` values are each value_bytes long (distinct, so no dictionary helps)."""
    ids = pa.array([("%08d" % i) + "y" * (value_bytes - 8) for i in range(rows)])
    table = pa.table({"id": ids, **{f: pa.array(np.zeros(rows)) for f in FEATURES}})
    return parquet_bytes(table, compression="zstd", use_dictionary=False)


def _wide_parquet(columns: int) -> bytes:
    table = pa.table({f"c{i}": pa.array([0.0]) for i in range(columns)})
    return parquet_bytes(table)


def _truncated_parquet() -> bytes:
    data = good_parquet(2000)
    return data[: len(data) // 2]


def _cut_csv() -> bytes:
    data = csv_bytes(50)
    return data[: data.rindex(b",")]  # the last record loses its last field(s), and its line feed


def _cut_jsonl() -> bytes:
    data = jsonl_bytes(50)
    return data[: len(data) - 20]


def _latin1_csv() -> bytes:
    bad = "r\xe9sum\xe9,1,2,3,4,5\n".encode("latin-1")
    return HEADER + csv_bytes(20)[len(HEADER):] + bad + csv_bytes(5, 20)[len(HEADER):]


def _latin1_jsonl() -> bytes:
    return jsonl_bytes(3) + b'{"id": "r\xe9sum\xe9", "f0": 1, "f1": 2, "f2": 3, "f3": 4, "f4": 5}\n' + jsonl_bytes(3, 4)


def _deep_jsonl() -> bytes:
    """Row 1 nested 100,000 deep in a key no model reads, row 2 2,000 deep in a feature (orjson reads at most
    1,024), row 3 300 deep (readable, but deeper than orjson writes back as JSON text): three malformed rows."""
    good = jsonl_bytes(4)
    lines = good.split(b"\n")
    deep_ignored = lines[1][:-1] + b', "junk": ' + _nested(100_000) + b"}"
    deep_feature = b'{"id": "r2", "f0": ' + _nested(2_000) + b', "f1": 1, "f2": 1, "f3": 1, "f4": 1}'
    deeper_than_writable = b'{"id": "r3", "f0": ' + _nested(300) + b', "f1": 1, "f2": 1, "f3": 1, "f4": 1}'
    return b"\n".join([lines[0], deep_ignored, deep_feature, deeper_than_writable, lines[3]]) + b"\n"


def cases() -> list[Case]:
    """Every hostile upload with the service's default limits (MAX_COLUMNS 10,000, MAX_CELL_BYTES 64 KiB...)."""
    csv, jsonl, parquet = csv_bytes(200), jsonl_bytes(200), good_parquet(200)
    return [
        Case("parquet named .csv", "input.csv", _once(parquet), 422, "invalid_file", "Parquet"),
        Case("parquet named .jsonl", "input.jsonl", _once(parquet), 422, "invalid_file", "Parquet"),
        Case("csv named .parquet", "input.parquet", _once(csv), 422, "invalid_file", "not Parquet"),
        Case("jsonl named .csv", "input.csv", _once(jsonl), 422, "invalid_file", "JSON Lines"),
        Case("png named .csv", "input.csv", _once(_png), 422, "invalid_file", "PNG"),
        Case("gzip named .csv", "input.csv", _once(lambda: gzip.compress(csv)), 422, "invalid_file", "gzip"),
        Case("zip named .csv", "input.csv", _once(lambda: _zip(csv)), 422, "invalid_file", "zip"),
        Case("gzip named .jsonl", "input.jsonl", _once(lambda: gzip.compress(jsonl)), 422, "invalid_file", "gzip"),
        Case("parquet without footer", "input.parquet", _once(_truncated_parquet), 422, "invalid_file", "truncated"),
        Case("csv cut mid-record", "input.csv", _once(_cut_csv), 202, job_status="partially_succeeded",
             row_errors={49: "malformed_row"}),
        Case("jsonl cut mid-line", "input.jsonl", _once(_cut_jsonl), 202, job_status="partially_succeeded",
             row_errors={49: "malformed_row"}),
        Case("csv not utf-8", "input.csv", _once(_latin1_csv), 422, "invalid_file", "UTF-8"),
        Case("jsonl not utf-8", "input.jsonl", _once(_latin1_jsonl), 202, job_status="partially_succeeded",
             row_errors={3: "malformed_row"}),
        Case("csv 100 MB line", "input.csv",
             _long_line(csv_bytes(100) + b"r100,", 100 * MB, b"1", b",1,1,1,1\n" + csv_bytes(10)[len(HEADER):]),
             422, "invalid_file", "longer than"),
        Case("jsonl 100 MB line", "input.jsonl",
             _long_line(jsonl_bytes(100) + b'{"id": "', 100 * MB, b"z", b'", "f0": 1}\n' + jsonl_bytes(10, 101)),
             202, job_status="partially_succeeded", row_errors={100: "malformed_row"}, message_has="longer than"),
        Case("csv header of a million columns", "input.csv", _wide_csv_header(1_000_000), 422, "invalid_file",
             "MAX_COLUMNS"),
        Case("jsonl line of 200,000 keys", "input.jsonl",
             _once(lambda: orjson.dumps({f"k{i}": 0 for i in range(200_000)}) + b"\n"), 422, "invalid_file",
             "MAX_COLUMNS"),
        Case("jsonl 300,000 lines of distinct keys", "input.jsonl", _jsonl_key_explosion(300_000), 422,
             "invalid_file", "MAX_COLUMNS"),
        Case("jsonl distinct keys after the first block", "input.jsonl",
             _jsonl_key_explosion(300_000, jsonl_bytes(60_000)), 202, job_status="partially_succeeded",
             row_errors={60_000: "missing_feature", 359_999: "missing_feature"}),
        Case("jsonl nested 100,000 deep", "input.jsonl", _once(_deep_jsonl), 202, job_status="partially_succeeded",
             row_errors={1: "malformed_row", 2: "malformed_row", 3: "malformed_row"}),
        Case("parquet of 20,000 columns", "input.parquet", _once(lambda: _wide_parquet(20_000)), 422,
             "invalid_file", "MAX_COLUMNS"),
        Case("parquet values of 1 MB (200 MB decoded)", "input.parquet",
             _once(lambda: _long_values_bomb(200, MB)), 422, "invalid_file", "MAX_CELL_BYTES"),
        Case("parquet dictionary of a 1 MB value (100 GB decoded)", "input.parquet",
             _once(lambda: _dictionary_of_long_values(100_000, MB)), 202, job_status="failed",
             row_errors={0: "invalid_value", 99_999: "invalid_value"}, message_has="MAX_CELL_BYTES"),
        Case("parquet dictionary bomb (1.2 GB decoded)", "input.parquet",
             _once(lambda: _dictionary_bomb(10_000, 60_000)), 202, job_status="failed",
             row_errors={0: "invalid_type", 9_999: "invalid_type"}),
        Case("binary garbage .csv", "input.csv", _once(lambda: _garbage(5 * MB)), 422, "invalid_file"),
        Case("binary garbage .jsonl", "input.jsonl", _once(lambda: _garbage(5 * MB)), 422, "invalid_file"),
        Case("binary garbage .parquet", "input.parquet", _once(lambda: _garbage(5 * MB)), 422, "invalid_file"),
        Case("csv then binary", "input.csv", _once(lambda: csv + _garbage(2 * MB)), 422, "invalid_file"),
    ]
