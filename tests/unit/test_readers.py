"""Streaming readers: CSV, JSON Lines and Parquet as bounded Arrow tables with input positions and row errors."""
from __future__ import annotations

import io
import random

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import readers
from shared.errors import InvalidFile, UnsupportedFormat
from shared.blobs import JSON_MIXED_KEY
from shared.readers import FORMATS, Batch, RowError, detect_format, open_reader


class Trickle(io.RawIOBase):
    """A non-seekable stream whose reads return at most `step` bytes; counts the bytes handed out."""

    def __init__(self, data: bytes, step: int = 7):
        super().__init__()
        self._data = data
        self._step = step
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size is None or size < 0 else min(size, self._step)
        out = self._data[self.served:self.served + n]
        self.served += len(out)
        return out


def read_all(fmt: str, data: bytes, **kwargs) -> tuple[list[str], list[Batch]]:
    with open_reader(fmt, io.BytesIO(data), **kwargs) as reader:
        return reader.columns, list(reader)


def rows_of(batches: list[Batch]) -> list[dict]:
    return [row for b in batches for row in b.table.to_pylist()]


def positions(batches: list[Batch]) -> list[int]:
    return [p for b in batches for p in b.table.column("__row").to_pylist()]


def errors_of(batches: list[Batch]) -> list[RowError]:
    return [e for b in batches for e in b.errors]


def assert_errors_follow_batches(batches: list[Batch]) -> None:
    """Each error comes with the first batch whose last row is at or after it."""
    previous_last = -1
    for b in batches:
        rows = b.table.column("__row").to_pylist()
        last = rows[-1] if rows else float("inf")
        for e in b.errors:
            assert previous_last < e.row <= last
        if rows:
            previous_last = last


# -- CSV ---------------------------------------------------------------------------------------------

def test_csv_quoted_fields_commas_and_newlines_keep_exact_positions():
    data = (b'id,text,n\n'
            b'1,plain,10\n'
            b'2,"with, comma",20\n'
            b'3,"say ""hi""",30\n'
            b'4,"two\nlines",40\n'
            b'5,"three\r\nline\nvalue",50\n'
            b'6,last,60\n')
    columns, batches = read_all("csv", data)
    assert columns == ["id", "text", "n"]
    assert [r["text"] for r in rows_of(batches)] == [
        "plain", "with, comma", 'say "hi"', "two\nlines", "three\r\nline\nvalue", "last"]
    assert positions(batches) == [0, 1, 2, 3, 4, 5]
    assert errors_of(batches) == []


def test_csv_every_column_is_text_and_null_markers_are_null():
    data = b"a,b\n1.5,abc\n,NA\nN/A,null\nNULL,None\nnan,inf\n\"\",x\n"
    _, batches = read_all("csv", data)
    table = batches[0].table
    assert table.schema.field("a").type == pa.string()
    assert table.schema.field("b").type == pa.string()
    assert table.schema.field("__row").type == pa.int64()
    assert table.column("a").to_pylist() == ["1.5", None, None, None, "nan", None]
    assert table.column("b").to_pylist() == ["abc", None, None, None, "inf", "x"]


def test_csv_bom_is_stripped_from_the_header():
    columns, batches = read_all("csv", b"\xef\xbb\xbfa,b\n1,2\n")
    assert columns == ["a", "b"]
    assert rows_of(batches) == [{"a": "1", "b": "2", "__row": 0}]


def test_csv_crlf_line_endings():
    columns, batches = read_all("csv", b"a,b\r\n1,2\r\n3,4\r\n")
    assert columns == ["a", "b"]
    assert rows_of(batches) == [{"a": "1", "b": "2", "__row": 0}, {"a": "3", "b": "4", "__row": 1}]


def test_csv_quoted_header_names():
    columns, _ = read_all("csv", b'"a,1","b\nc",d\n1,2,3\n')
    assert columns == ["a,1", "b\nc", "d"]


@pytest.mark.parametrize(("lines", "good", "bad"), [
    # malformed at the start
    ([b"x", b"1,2,3", b"4,5,6"], [1, 2], [0]),
    # malformed in the middle, too many and too few fields
    ([b"1,2,3", b"4,5", b"7,8,9", b"1,2,3,4", b"5,6,7"], [0, 2, 4], [1, 3]),
    # malformed at the end
    ([b"1,2,3", b"4,5,6", b"oops"], [0, 1], [2]),
    # several in a row everywhere
    ([b"x", b"y", b"1,2,3", b"z", b"w", b"4,5,6", b"q", b"r"], [2, 5], [0, 1, 3, 4, 6, 7]),
])
def test_csv_malformed_rows_take_their_positions(lines, good, bad):
    data = b"a,b,c\n" + b"\n".join(lines) + b"\n"
    _, batches = read_all("csv", data, batch_rows=1)
    assert positions(batches) == good
    errors = errors_of(batches)
    assert [e.row for e in errors] == bad
    assert {e.code for e in errors} == {"malformed_row"}
    assert_errors_follow_batches(batches)


def test_csv_malformed_row_message_names_line_and_field_counts():
    _, batches = read_all("csv", b"a,b,c,d,e\n1,2,3,4,5\n1,2,3\n")
    assert errors_of(batches) == [RowError(1, "malformed_row", "line 3: expected 5 fields, found 3")]


def test_csv_only_malformed_rows_give_one_batch_of_errors():
    _, batches = read_all("csv", b"a,b\nx\ny\n", wanted=["b"])
    assert len(batches) == 1
    assert batches[0].table.num_rows == 0
    assert batches[0].table.schema.names == ["b", "__row"]
    assert [e.row for e in batches[0].errors] == [0, 1]


def test_csv_malformed_rows_across_many_blocks_with_quoted_newlines(monkeypatch):
    monkeypatch.setattr(readers, "_CSV_BLOCK", 256)  # many pyarrow blocks, so many record batches
    lines, expected_good, expected_bad = [], [], []
    for i in range(600):
        if i % 37 == 5 or i % 101 == 0:
            lines.append(b"broken")
            expected_bad.append(i)
        elif i % 10 == 3:
            lines.append(b'%d,"multi\nline",x' % i)
            expected_good.append(i)
        else:
            lines.append(b"%d,v,x" % i)
            expected_good.append(i)
    data = b"i,t,u\n" + b"\n".join(lines) + b"\n"
    _, batches = read_all("csv", data, batch_rows=50)
    assert len(batches) > 5
    assert positions(batches) == expected_good
    assert [int(r["i"]) for r in rows_of(batches)] == expected_good
    assert [e.row for e in errors_of(batches)] == expected_bad
    assert_errors_follow_batches(batches)


def test_csv_stream_with_short_reads():
    body = b"".join(b'%d,"q,%d",v%d\n' % (i, i, i) if i % 13 != 7 else b"bad\n" for i in range(300))
    stream = Trickle(b"a,b,c\n" + body, step=7)
    with open_reader("csv", stream, batch_rows=64) as reader:
        batches = list(reader)
    expected = [i for i in range(300) if i % 13 != 7]
    assert positions(batches) == expected
    assert [r["b"] for r in rows_of(batches)] == [f"q,{i}" for i in expected]
    assert [e.row for e in errors_of(batches)] == [i for i in range(300) if i % 13 == 7]
    assert all(b.table.num_rows <= 64 for b in batches)


def test_csv_open_reads_only_the_start_of_the_stream():
    data = b"a,b\n" + b"1,2\n" * 500_000
    stream = Trickle(data, step=1 << 20)
    reader = open_reader("csv", stream)
    assert reader.columns == ["a", "b"]
    assert stream.served <= 128 << 10
    reader.close()


def test_csv_wanted_subset_in_the_callers_order_and_missing_ones_absent():
    columns, batches = read_all("csv", b"a,b,c\n1,2,3\n4,5,6\n", wanted=["c", "zz", "a", "c"])
    assert columns == ["a", "b", "c"]
    assert batches[0].table.schema.names == ["c", "a", "__row"]
    assert rows_of(batches) == [{"c": "3", "a": "1", "__row": 0}, {"c": "6", "a": "4", "__row": 1}]


def test_csv_no_wanted_column_present_still_counts_rows():
    _, batches = read_all("csv", b"a,b\n1,2\nbad\n3,4\n", wanted=["zz"])
    assert batches[0].table.schema.names == ["__row"]
    assert positions(batches) == [0, 2]
    assert [e.row for e in errors_of(batches)] == [1]


@pytest.mark.parametrize("data", [b"a,b,c\n", b"a,b,c", b"a,b,c\r\n", b"a,b,c\n\n\n"])
def test_csv_header_only_yields_nothing(data):
    columns, batches = read_all("csv", data)
    assert columns == ["a", "b", "c"]
    assert batches == []


def test_csv_empty_file_is_invalid():
    with pytest.raises(InvalidFile, match="empty"):
        open_reader("csv", io.BytesIO(b""))


def test_csv_non_utf8_data_is_invalid():
    reader = open_reader("csv", io.BytesIO(b"a,b\n1,2\n\xff\xfe,3\n"))
    with pytest.raises(InvalidFile, match="UTF-8") as info:
        list(reader)
    assert "/" not in str(info.value)
    reader.close()


def test_csv_non_utf8_header_is_invalid():
    with pytest.raises(InvalidFile, match="UTF-8"):
        open_reader("csv", io.BytesIO(b"a,\xe9t\xe9\n1,2\n"))


@pytest.mark.parametrize("data", [
    random.Random(1).randbytes(300_000),
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 50,
    b"PK\x03\x04" + b"\x00" * 5000,
])
def test_csv_binary_garbage_is_invalid(data):
    with pytest.raises(InvalidFile):
        with open_reader("csv", io.BytesIO(data)) as reader:
            list(reader)


# pyarrow reports (as "Exception ignored") that it cannot decode a non-UTF-8 malformed row for the handler.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("body", [random.Random(4).randbytes(50_000), b"1,2\n\xff\xfe\n3,4\n"])
def test_csv_garbage_after_a_valid_header_is_invalid(body):
    reader = open_reader("csv", io.BytesIO(b"a,b\n" + body))
    with pytest.raises(InvalidFile, match="UTF-8"):
        list(reader)
    reader.close()


def test_csv_record_longer_than_a_block_is_invalid(monkeypatch):
    monkeypatch.setattr(readers, "_CSV_BLOCK", 64)
    reader = open_reader("csv", io.BytesIO(b"a,b\n1,2\n3," + b"x" * 500 + b"\n"))
    with pytest.raises(InvalidFile, match="longer than"):
        list(reader)
    reader.close()


def test_csv_reader_closed_mid_iteration():
    reader = open_reader("csv", io.BytesIO(b"a\n" + b"1\n" * 1000), batch_rows=10)
    batches = iter(reader)
    assert next(batches).table.num_rows == 10
    reader.close()
    with pytest.raises(StopIteration):
        next(batches)


def test_csv_header_without_end_is_invalid():
    with pytest.raises(InvalidFile, match="header"):
        open_reader("csv", io.BytesIO(b"x" * (3 << 20)))


def test_csv_duplicate_header_names_are_invalid():
    with pytest.raises(InvalidFile, match="Duplicate column names") as info:
        open_reader("csv", io.BytesIO(b"a,b,a,c,b\n1,2,3,4,5\n"))
    assert "'a'" in str(info.value) and "'b'" in str(info.value)
    assert info.value.details == {"columns": ["a", "b"]}


def test_csv_reserved_column_name_is_invalid():
    with pytest.raises(InvalidFile, match="reserved"):
        open_reader("csv", io.BytesIO(b"a,__row\n1,2\n"))


def test_csv_200k_rows_in_bounded_batches_with_exact_positions():
    n = 200_000
    data = b"id,x,y\n" + b"".join(b"%d,%d.5,s%d\n" % (i, i, i) for i in range(n))
    _, batches = read_all("csv", data, batch_rows=7_000)
    sizes = [b.table.num_rows for b in batches]
    assert max(sizes) <= 7_000
    assert sizes[:-1] == [7_000] * (len(sizes) - 1)
    assert sum(sizes) == n
    rows = pa.concat_tables([b.table for b in batches])
    assert rows.column("__row").to_pylist() == list(range(n))
    assert rows.column("id").to_pylist() == [str(i) for i in range(n)]


# -- JSON Lines ---------------------------------------------------------------------------------------

def jsonl(*records) -> bytes:
    return b"".join(r if isinstance(r, bytes) else orjson.dumps(r) + b"\n" for r in records)


def test_jsonl_fast_path_types_and_positions(monkeypatch):
    def no_line_parsing(*args):
        raise AssertionError("parsed line by line")

    monkeypatch.setattr(readers._JsonlReader, "_parse_lines", no_line_parsing)
    data = jsonl(*({"i": i, "f": i / 2, "s": f"s{i}", "b": i % 2 == 0, "n": None} for i in range(1000)))
    columns, batches = read_all("jsonl", data, batch_rows=300)
    assert columns == ["i", "f", "s", "b", "n"]
    assert [b.table.num_rows for b in batches] == [300, 300, 300, 100]
    schema = batches[0].table.schema
    assert [schema.field(c).type for c in columns] == [pa.int64(), pa.float64(), pa.string(), pa.bool_(), pa.null()]
    assert schema.metadata is None
    assert positions(batches) == list(range(1000))
    assert rows_of(batches)[3] == {"i": 3, "f": 1.5, "s": "s3", "b": False, "n": None, "__row": 3}


def test_jsonl_malformed_lines_fall_back_with_exact_positions():
    data = (b'{"a": 1}\n'
            b'not json\n'
            b'\n'
            b'{"a": 2}\n'
            b'[1, 2]\n'
            b'  \r\n'
            b'"text"\n'
            b'{"a": 3}\n'
            b'{"a": 4} {"a": 5}\n'
            b'{"a": 6}\n')
    _, batches = read_all("jsonl", data)
    assert rows_of(batches) == [{"a": 1, "__row": 0}, {"a": 2, "__row": 2}, {"a": 3, "__row": 5},
                                {"a": 6, "__row": 7}]
    errors = errors_of(batches)
    assert [e.row for e in errors] == [1, 3, 4, 6]
    assert {e.code for e in errors} == {"malformed_row"}
    messages = [e.message for e in errors]
    assert messages[0].startswith("line 2: not a JSON object: invalid JSON")
    assert messages[1] == "line 5: not a JSON object: found an array"
    assert messages[2] == "line 7: not a JSON object: found a string"
    assert messages[3].startswith("line 9: not a JSON object: invalid JSON")


def test_jsonl_blank_lines_take_no_position():
    data = b'\n{"a": 1}\n\n\n{"a": 2}\n   \n{"a": 3}\n\n'
    _, batches = read_all("jsonl", data)
    assert rows_of(batches) == [{"a": 1, "__row": 0}, {"a": 2, "__row": 1}, {"a": 3, "__row": 2}]
    assert errors_of(batches) == []


def test_jsonl_mixed_types_are_json_text_with_marker():
    data = jsonl({"x": 1.5, "y": 1, "z": "a"}, {"x": "abc", "y": 2, "z": "b"}, {"x": "1.5", "y": None, "z": None})
    _, batches = read_all("jsonl", data)
    table = batches[0].table
    assert table.schema.metadata == {JSON_MIXED_KEY: b"x"}
    assert table.schema.field("x").type == pa.string()
    assert [orjson.loads(v) for v in table.column("x").to_pylist()] == [1.5, "abc", "1.5"]
    assert table.column("y").to_pylist() == [1, 2, None]
    assert table.column("z").to_pylist() == ["a", "b", None]


def test_jsonl_bool_and_number_mix_is_marked():
    _, batches = read_all("jsonl", jsonl({"x": True}, {"x": 2}))
    assert batches[0].table.schema.metadata == {JSON_MIXED_KEY: b"x"}
    assert batches[0].table.column("x").to_pylist() == ["true", "2"]


def test_jsonl_nested_values_are_json_text_with_marker():
    data = jsonl({"o": {"k": [1, 2]}, "l": [1, "a"], "v": 1}, {"o": None, "l": [], "v": 2})
    _, batches = read_all("jsonl", data)
    table = batches[0].table
    assert sorted(table.schema.metadata[JSON_MIXED_KEY].decode().split(",")) == ["l", "o"]
    assert table.column("o").to_pylist() == ['{"k":[1,2]}', None]
    assert table.column("l").to_pylist() == ['[1,"a"]', "[]"]
    assert table.column("v").to_pylist() == [1, 2]


def test_jsonl_marker_names_only_kept_columns():
    data = jsonl({"x": 1, "y": 1}, {"x": "a", "y": 2})
    _, batches = read_all("jsonl", data, wanted=["y"])
    assert batches[0].table.schema.names == ["y", "__row"]
    assert batches[0].table.schema.metadata is None


def test_jsonl_iso_dates_stay_strings():
    data = jsonl(*({"d": f"2024-01-{i + 1:02d}", "t": "2024-01-01T10:00:00"} for i in range(5)))
    _, batches = read_all("jsonl", data)
    table = batches[0].table
    assert table.schema.field("d").type == pa.string()
    assert table.column("d").to_pylist()[:2] == ["2024-01-01", "2024-01-02"]
    assert table.column("t").to_pylist()[0] == "2024-01-01T10:00:00"


def test_jsonl_blocks_keep_the_same_columns_and_positions(monkeypatch):
    monkeypatch.setattr(readers, "_JSON_BLOCK", 64)  # a block every few lines
    records = [{"a": i, "b": f"s{i}"} if i < 3 else {"a": i} for i in range(40)]
    records[10] = {"a": 10, "b": "late", "new": 1}   # a key first seen after the first block is ignored
    lines = [orjson.dumps(r) + b"\n" for r in records]
    lines[20] = b"{broken\n"
    lines.insert(30, b"\n")
    stream = Trickle(b"".join(lines), step=7)
    with open_reader("jsonl", stream, wanted=["b", "a", "new"], batch_rows=8) as reader:
        assert reader.columns == ["a", "b"]
        batches = list(reader)
    assert len(batches) > 4
    assert all(b.table.schema.names == ["b", "a", "__row"] for b in batches)
    assert all(b.table.num_rows <= 8 for b in batches)
    rows = rows_of(batches)
    assert [r["__row"] for r in rows] == [i for i in range(40) if i != 20]
    assert [r["a"] for r in rows] == [i for i in range(40) if i != 20]
    assert [r["b"] for r in rows][:4] == ["s0", "s1", "s2", None]
    assert rows[10]["b"] == "late"
    assert [(e.row, e.message.split(":")[0]) for e in errors_of(batches)] == [(20, "line 21")]
    assert_errors_follow_batches(batches)


def test_jsonl_last_line_without_newline_and_bom():
    columns, batches = read_all("jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}')
    assert columns == ["a"]
    assert rows_of(batches) == [{"a": 1, "__row": 0}, {"a": 2, "__row": 1}]


def test_jsonl_trailing_malformed_lines_come_in_a_last_batch():
    _, batches = read_all("jsonl", b'{"a": 1}\n{"a": 2}\nnope\n')
    assert [b.table.num_rows for b in batches] == [2, 0]
    assert batches[1].table.schema.names == ["a", "__row"]
    assert [e.row for e in batches[1].errors] == [2]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_jsonl_empty_file_is_invalid(data):
    with pytest.raises(InvalidFile):
        open_reader("jsonl", io.BytesIO(data))


@pytest.mark.parametrize("data", [random.Random(2).randbytes(20_000), b"a,b\n1,2\n", b"[1, 2]\n"])
def test_jsonl_file_without_objects_is_invalid(data):
    with pytest.raises(InvalidFile, match="JSON Lines"):
        open_reader("jsonl", io.BytesIO(data))


# -- Parquet ------------------------------------------------------------------------------------------

def parquet_bytes(table: pa.Table, row_group_size: int = 100) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


@pytest.fixture
def sample() -> pa.Table:
    n = 250
    return pa.table({
        "i": pa.array(range(n), pa.int32()),
        "f": pa.array([i / 4 for i in range(n)], pa.float64()),
        "s": pa.array([None if i % 7 == 0 else f"s{i}" for i in range(n)]),
        "b": pa.array([i % 2 == 0 for i in range(n)]),
    })


@pytest.mark.parametrize("batch_rows", [1, 7, 100, 101, 1000])
def test_parquet_round_trip_in_bounded_batches(sample, batch_rows, tmp_path):
    columns, batches = read_all("parquet", parquet_bytes(sample, row_group_size=30),
                                batch_rows=batch_rows, spool_dir=str(tmp_path))
    assert columns == ["i", "f", "s", "b"]
    assert all(0 < b.table.num_rows <= batch_rows for b in batches)
    table = pa.concat_tables([b.table for b in batches])
    assert table.column("__row").to_pylist() == list(range(sample.num_rows))
    assert table.drop_columns(["__row"]).equals(sample)
    assert errors_of(batches) == []


def test_parquet_wanted_subset_keeps_types(sample, tmp_path):
    _, batches = read_all("parquet", parquet_bytes(sample), wanted=["s", "nope", "i"], spool_dir=str(tmp_path))
    table = pa.concat_tables([b.table for b in batches])
    assert table.schema.names == ["s", "i", "__row"]
    assert table.schema.field("i").type == pa.int32()
    assert table.column("s").equals(sample.column("s"))


def test_parquet_from_a_trickling_stream(sample, tmp_path):
    stream = Trickle(parquet_bytes(sample), step=7)
    with open_reader("parquet", stream, batch_rows=64, spool_dir=str(tmp_path)) as reader:
        batches = list(reader)
    assert positions(batches) == list(range(sample.num_rows))


def test_parquet_temp_file_lives_until_close(sample, tmp_path):
    reader = open_reader("parquet", io.BytesIO(parquet_bytes(sample)), spool_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    next(iter(reader))
    reader.close()
    assert list(tmp_path.iterdir()) == []
    reader.close()  # closing twice is harmless


@pytest.mark.parametrize("cut", [10, 200, -8, -1])
def test_parquet_truncated_file_is_invalid_and_leaves_no_temp_file(sample, tmp_path, cut):
    data = parquet_bytes(sample)
    with pytest.raises(InvalidFile, match="Parquet") as info:
        open_reader("parquet", io.BytesIO(data[:cut]), spool_dir=str(tmp_path))
    assert str(tmp_path) not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("data", [b"", b"a,b\n1,2\n", random.Random(3).randbytes(5000)])
def test_parquet_other_content_is_invalid(data, tmp_path):
    with pytest.raises(InvalidFile):
        open_reader("parquet", io.BytesIO(data), spool_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# -- format detection and the common contract ---------------------------------------------------------

@pytest.mark.parametrize(("filename", "content_type", "expected"), [
    ("data.csv", None, "csv"),
    ("DATA.CSV", "application/octet-stream", "csv"),
    ("rows.jsonl", None, "jsonl"),
    ("rows.ndjson", None, "jsonl"),
    ("rows.json-lines", None, "jsonl"),
    ("t.parquet", None, "parquet"),
    ("dir/sub.dir/t.pq", None, "parquet"),
    ("C:\\uploads\\x.csv", None, "csv"),
    ("x.csv", "application/x-parquet", "csv"),
    (None, "text/csv; charset=utf-8", "csv"),
    ("upload", "application/x-ndjson", "jsonl"),
    ("upload.bin", "application/jsonl", "jsonl"),
    ("", "application/json-lines", "jsonl"),
    (None, "application/x-jsonlines", "jsonl"),
    (None, "Application/Vnd.Apache.Parquet", "parquet"),
    (None, "application/parquet", "parquet"),
])
def test_detect_format(filename, content_type, expected):
    assert detect_format(filename, content_type) == expected


@pytest.mark.parametrize(("filename", "content_type"), [
    ("data.csv.gz", None),
    ("data.json", "application/json"),
    ("book.xlsx", None),
    (None, None),
    ("noext", "text/plain"),
])
def test_detect_format_rejects_others(filename, content_type):
    with pytest.raises(UnsupportedFormat) as info:
        detect_format(filename, content_type)
    message = str(info.value)
    assert "CSV" in message and "JSON Lines" in message and "Parquet" in message
    assert info.value.details["accepted"] == list(FORMATS)


def test_open_reader_rejects_unknown_format():
    with pytest.raises(UnsupportedFormat):
        open_reader("xlsx", io.BytesIO(b"a\n1\n"))


def test_open_reader_rejects_a_batch_size_below_one():
    with pytest.raises(ValueError):
        open_reader("csv", io.BytesIO(b"a\n1\n"), batch_rows=0)


def test_a_reader_is_iterated_once():
    with open_reader("csv", io.BytesIO(b"a\n1\n")) as reader:
        assert len(list(reader)) == 1
        with pytest.raises(RuntimeError):
            iter(reader)


def test_csv_reads_only_a_few_blocks_ahead_of_the_parser(monkeypatch):
    """A fast upload is not pulled into memory ahead of parsing: reads wait for the parser."""
    import shared.readers as readers_module

    monkeypatch.setattr(readers_module, "_CSV_BLOCK", 64 * 1024)
    body = b"a,b\n" + b"".join(b"%d,%d\n" % (i, i * 7) for i in range(400_000))
    stream = io.BytesIO(body)
    reads = []
    real_read = stream.read

    def counting_read(size=-1):
        reads.append(size)
        return real_read(size)

    monkeypatch.setattr(stream, "read", counting_read)
    reader = open_reader("csv", stream, batch_rows=1000)
    batches = iter(reader)
    next(batches)
    blocks_total = len(body) // (64 * 1024)
    assert len(reads) <= readers_module._CSV_AHEAD + 4 < blocks_total
    reader.close()  # stopping early must not leave pyarrow's read thread waiting forever
    assert sum(b.table.num_rows for b in open_reader("csv", io.BytesIO(body), batch_rows=50_000)) == 400_000
