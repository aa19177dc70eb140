"""Input limits: every MAX_* setting is kept by the readers and the chunker, and each refusal names its setting."""
from __future__ import annotations

import gzip
import io
import os

import numpy as np
import orjson
import pyarrow as pa
import pytest

from shared import readers
from shared.errors import InvalidFile, TooLarge
from shared.ingest import Chunker
from shared.readers import Batch, CsvPiece, Limits, open_reader, parse_csv_piece, records_batches
from shared.settings import load_settings
from shared.sources import open_source
from tests.support import hostile

LIMITS = Limits(max_bytes=1 << 30, max_columns=50, max_cell_bytes=100, max_rows=1_000_000, max_batch_bytes=1 << 20)


def read(fmt: str, data: bytes, limits: Limits = LIMITS, **kwargs) -> tuple[list[str], list[Batch]]:
    with open_reader(fmt, io.BytesIO(data), limits=limits, **kwargs) as reader:
        return reader.columns, list(reader)


def split(data: bytes, limits: Limits = LIMITS, batch_rows: int = 1000) -> tuple[list, list]:
    """CSV through the splitter and each piece through the worker's parser: (row dicts, errors)."""
    rows, errors = [], []
    with open_reader("csv", io.BytesIO(data), batch_rows=batch_rows, split_csv=True, limits=limits) as reader:
        for item in reader:
            if isinstance(item, CsvPiece):
                table, errs = parse_csv_piece(item, reader.columns, reader.columns, [], limits)
            else:
                table, errs = item.table, item.errors
            rows += table.to_pylist()
            errors += errs
    return rows, errors


def errors_of(batches: list[Batch]) -> list:
    return [e for b in batches for e in b.errors]


def assert_names_limit(exc: pytest.ExceptionInfo, setting: str) -> None:
    assert setting in exc.value.message
    assert exc.value.details["limit"] == setting


def test_settings_defaults():
    """The limits have documented defaults and come from the settings."""
    s = load_settings()
    assert (s.MAX_COLUMNS, s.MAX_CELL_BYTES, s.MAX_JOB_ROWS, s.MAX_CHUNK_BYTES) == (10_000, 65_536, 100_000_000,
                                                                                      8 << 20)
    limits = Limits.from_settings(load_settings({"MAX_COLUMNS": 7, "MAX_UPLOAD_BYTES": 99}))
    assert limits.max_columns == 7 and limits.max_bytes == 99


# -- MAX_COLUMNS --------------------------------------------------------------------------------------

def test_csv_header_wider_than_max_columns_is_invalid_file():
    """A CSV header of more than MAX_COLUMNS names is refused, naming the setting."""
    header = ",".join(f"c{i}" for i in range(51)).encode() + b"\n1\n"
    with pytest.raises(InvalidFile) as info:
        read("csv", header)
    assert_names_limit(info, "MAX_COLUMNS")
    columns, _ = read("csv", ",".join(f"c{i}" for i in range(50)).encode() + b"\n" + b"1," * 49 + b"1\n")
    assert len(columns) == 50


def test_csv_header_of_a_million_names_is_refused_before_its_end():
    """A header of 1e6 names is refused after reading about MAX_COLUMNS of them, not the whole line."""
    stream = io.BytesIO(b"".join(hostile._wide_csv_header(1_000_000)()))
    with pytest.raises(InvalidFile) as info:
        open_reader("csv", stream, limits=LIMITS, split_csv=True)
    assert_names_limit(info, "MAX_COLUMNS")
    assert stream.tell() < 1 << 20


def test_jsonl_keys_past_max_columns_are_invalid_file():
    """JSON Lines whose first block has more than MAX_COLUMNS keys, in one line or over many, is refused."""
    one_line = orjson.dumps({f"k{i}": i for i in range(51)}) + b"\n"
    many_lines = b"".join(orjson.dumps({f"k{i}": i}) + b"\n" for i in range(51))
    for data in (one_line, many_lines):
        with pytest.raises(InvalidFile) as info:
            read("jsonl", data)
        assert_names_limit(info, "MAX_COLUMNS")


def test_jsonl_keys_after_the_first_block_are_ignored(monkeypatch):
    """Distinct keys on every line after the first block build no columns: their rows only miss features."""
    monkeypatch.setattr(readers, "_JSON_BLOCK", 4096)
    first = b"".join(orjson.dumps({"a": i, "b": i}) + b"\n" for i in range(300))  # more than a block
    rest = b"".join(orjson.dumps({f"k{i}": i, "a": i}) + b"\n" for i in range(300, 5000))
    columns, batches = read("jsonl", first + rest)
    assert columns == ["a", "b"]
    table = pa.concat_tables([b.table for b in batches])
    assert table.column_names == ["a", "b", "__row"]
    assert table.column("a").to_pylist() == list(range(5000))
    assert table.column("b").null_count == 4700


def test_parquet_wider_than_max_columns_is_invalid_file(tmp_path):
    data = hostile.parquet_bytes(pa.table({f"c{i}": [1.0] for i in range(51)}))
    with pytest.raises(InvalidFile) as info:
        read("parquet", data, spool_dir=str(tmp_path))
    assert_names_limit(info, "MAX_COLUMNS")
    assert list(tmp_path.iterdir()) == []


# -- MAX_CELL_BYTES ------------------------------------------------------------------------------------

def test_csv_long_cell_fails_its_row_only():
    """A text value longer than MAX_CELL_BYTES makes its row an invalid_value error; other rows are read."""
    data = b"id,x\na,1\n" + b"b" * 101 + b",2\nc,3\n" + b"d," + b"9" * 101 + b"\ne,5\n"
    for rows, errors in (split(data), split(data, batch_rows=2)):
        assert [(r["id"], r["__row"]) for r in rows] == [("a", 0), ("c", 2), ("e", 4)]
        assert [(e.row, e.code) for e in errors] == [(1, "invalid_value"), (3, "invalid_value")]
        assert "MAX_CELL_BYTES" in errors[0].message and "'id'" in errors[0].message
        assert "'x'" in errors[1].message
    _, batches = read("csv", data, batch_rows=1)
    assert [(e.row, e.code) for e in errors_of(batches)] == [(1, "invalid_value"), (3, "invalid_value")]


def test_csv_long_cell_after_a_quote_is_found_by_the_api_parser():
    data = b'id,x\n"q,1",1\n' + b"b" * 101 + b",2\nc,3\n"
    rows, errors = split(data)
    assert [r["__row"] for r in rows] == [0, 2] and [(e.row, e.code) for e in errors] == [(1, "invalid_value")]


def test_csv_numbers_are_not_text():
    """A long number in a column parsed as float64 is a number, not a long text."""
    piece = CsvPiece(b"1," + b"1" * 150 + b"\n", 1, 0)
    table, errors = parse_csv_piece(piece, ["a", "b"], ["a", "b"], ["a", "b"], LIMITS)
    assert table.num_rows == 1 and errors == []


def test_jsonl_long_value_fails_its_row():
    data = b'{"a": "x", "b": 1}\n{"a": "' + b"y" * 101 + b'", "b": 2}\n{"a": ["' + b"z" * 101 + b'"], "b": 3}\n'
    data += b'{"a": "w", "b": 4}\n'
    _, batches = read("jsonl", data)
    table = pa.concat_tables([b.table for b in batches])
    assert table.column("__row").to_pylist() == [0, 3]
    assert [(e.row, e.code) for e in errors_of(batches)] == [(1, "invalid_value"), (2, "invalid_value")]


def test_json_rows_long_value_and_deep_nesting():
    """Rows of a JSON body: a long text is invalid_value, a value nested past what JSON text can hold is malformed."""
    deep = orjson.loads(b"[" * 300 + b"]" * 300)
    records = [{"a": "x"}, {"a": "y" * 101}, 5, {"a": deep}, {"a": "ok"}]
    batches = list(records_batches(records, ["a"], 2, LIMITS))
    assert [r["__row"] for b in batches for r in b.table.to_pylist()] == [0, 4]
    assert [(e.row, e.code) for e in errors_of(batches)] == [(1, "invalid_value"), (2, "malformed_row"),
                                                             (3, "malformed_row")]


def test_parquet_long_values_on_average_are_refused_before_reading(tmp_path):
    """A column whose values average more than MAX_CELL_BYTES (a decompression bomb) is refused unread."""
    table = pa.table({"id": [f"{i:04d}" + "v" * 500 for i in range(20)], "x": [1.0] * 20})
    with pytest.raises(InvalidFile) as info:
        read("parquet", hostile.parquet_bytes(table, compression="zstd", use_dictionary=False),
             spool_dir=str(tmp_path))
    assert_names_limit(info, "MAX_CELL_BYTES")


def test_parquet_dictionary_of_a_long_value_fails_rows_without_decoding(tmp_path):
    """A long value repeated through a dictionary fails each of its rows; nothing is decoded."""
    data = hostile._dictionary_of_long_values(50_000, 1000)
    _, batches = read("parquet", data, wanted=["f0", "id"], spool_dir=str(tmp_path), batch_rows=10_000)
    assert sum(b.table.num_rows for b in batches) == 0
    errors = errors_of(batches)
    assert len(errors) == 50_000 and {e.code for e in errors} == {"invalid_value"}


def test_parquet_dictionary_bomb_is_decoded_in_bounded_batches(tmp_path):
    """Values under the limit but repeated through a dictionary decode a batch at a time, each about
    MAX_CHUNK_BYTES."""
    limits = LIMITS._replace(max_cell_bytes=64 << 10)
    data = hostile._dictionary_bomb(20_000, 10_000)  # 400 MB decoded, a KiB on disk
    assert len(data) < 10_000
    with open_reader("parquet", io.BytesIO(data), wanted=["id", "f0", "f1"], batch_rows=20_000, limits=limits,
                     spool_dir=str(tmp_path)) as reader:
        sizes = []
        rows = 0
        for batch in reader:
            assert batch.table.schema.field("id").type == pa.string()
            sizes.append(batch.table.nbytes)
            rows += batch.table.num_rows
    assert rows == 20_000
    assert max(sizes) <= 2 * limits.max_batch_bytes + 100_000


def test_parquet_row_count_past_max_job_rows_is_too_large(tmp_path):
    data = hostile.good_parquet(10_001)
    with pytest.raises(TooLarge) as info:
        read("parquet", data, limits=LIMITS._replace(max_rows=10_000), spool_dir=str(tmp_path))
    assert_names_limit(info, "MAX_JOB_ROWS")
    assert info.value.status == 413


@pytest.mark.parametrize("cut", [4, 11, 100, -1, -5])
def test_parquet_truncated_is_invalid_file(tmp_path, cut):
    data = hostile.good_parquet(100)
    with pytest.raises(InvalidFile, match="Parquet"):
        read("parquet", data[:cut], spool_dir=str(tmp_path))


def test_parquet_footer_larger_than_accepted_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_MAX_FOOTER", 100)
    with pytest.raises(InvalidFile, match="footer"):
        read("parquet", hostile.good_parquet(100), spool_dir=str(tmp_path))


# -- MAX_UPLOAD_BYTES, MAX_JOB_ROWS, MAX_CHUNK_BYTES ----------------------------------------------------------

@pytest.mark.parametrize("fmt,data", [("csv", hostile.csv_bytes(2000)), ("jsonl", hostile.jsonl_bytes(2000)),
                                      ("parquet", hostile.good_parquet(2000))])
def test_a_file_past_max_upload_bytes_is_too_large(fmt, data, tmp_path):
    limits = LIMITS._replace(max_bytes=len(data) - 1)
    with pytest.raises(TooLarge) as info:
        for _ in read(fmt, data, limits=limits, spool_dir=str(tmp_path), split_csv=True)[1]:
            pass
    assert_names_limit(info, "MAX_UPLOAD_BYTES")
    read(fmt, data, limits=LIMITS._replace(max_bytes=len(data)), spool_dir=str(tmp_path))


def test_chunker_refuses_rows_past_max_job_rows():
    """The chunker raises TooLarge (MAX_JOB_ROWS) as soon as the rows read pass the limit, counting row errors."""
    out = []
    chunker = Chunker(100, lambda i, t, e: out.append(i), max_rows=250)
    table = pa.table({"__row": pa.array(range(100), pa.int64())})
    chunker.add(Batch(table, []))
    chunker.add(CsvPiece(b"", 100, 100))
    with pytest.raises(TooLarge) as info:
        chunker.add(Batch(table.slice(0, 40), [readers.RowError(240 + i, "malformed_row", "") for i in range(11)]))
    assert_names_limit(info, "MAX_JOB_ROWS")


def test_chunker_cuts_chunks_at_max_chunk_bytes():
    out = []
    chunker = Chunker(1_000_000, lambda i, t, e: out.append(t.num_rows), max_bytes=80_000)
    for start in range(0, 10_000, 1000):
        chunker.add(Batch(pa.table({"x": np.zeros(1000), "__row": np.arange(start, start + 1000)}), []))
    chunker.close()
    assert sum(out) == 10_000 and max(out) <= 5000 and len(out) >= 2


def test_csv_pieces_of_wide_records_are_cut_at_max_chunk_bytes():
    """The splitter ends a piece at MAX_CHUNK_BYTES even before batch_rows records."""
    record = b"x" * 1000 + b",1\n"
    data = b"id,n\n" + record * 5000
    with open_reader("csv", io.BytesIO(data), batch_rows=1_000_000, split_csv=True, limits=LIMITS._replace(
            max_cell_bytes=10_000)) as reader:
        pieces = list(reader)
    assert sum(p.rows for p in pieces) == 5000
    assert max(len(p.data) for p in pieces) <= LIMITS.max_batch_bytes + (1 << 20) + len(record)
    assert len(pieces) >= 3
    assert [p.base for p in pieces] == list(np.cumsum([0] + [p.rows for p in pieces[:-1]]))


def test_rebatch_ends_a_batch_at_max_bytes():
    text = "x" * 500
    data = b"id\n" + (text.encode() + b"\n") * 10_000
    _, batches = read("csv", data, limits=LIMITS._replace(max_cell_bytes=1000), batch_rows=1_000_000)
    assert sum(b.table.num_rows for b in batches) == 10_000 and len(batches) >= 3


# -- content checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("name,data,says", [
    ("parquet", hostile.good_parquet(10), "Parquet"),
    ("gzip", gzip.compress(b"a,b\n1,2\n"), "gzip"),
    ("zip", hostile._zip(b"a,b\n1,2\n"), "zip"),
    ("png", hostile._png(), "PNG"),
    ("utf-16", "a,b\n1,2\n".encode("utf-16"), "UTF-16"),
])
def test_text_formats_refuse_other_content(fmt, name, data, says):
    with pytest.raises(InvalidFile, match=says) as info:
        read(fmt, data)
    assert info.value.details["detected"]


def test_csv_refuses_json_lines_and_accepts_a_header_that_starts_like_parquet():
    with pytest.raises(InvalidFile, match="JSON Lines"):
        read("csv", hostile.jsonl_bytes(3))
    columns, batches = read("csv", b"PAR1,b\n1,2\n")
    assert columns == ["PAR1", "b"] and batches[0].table.num_rows == 1


@pytest.mark.parametrize("data,says", [(b"a,b\n1,2\n", "text"), (gzip.compress(b"x" * 100), "gzip"), (b"", "empty")])
def test_parquet_refuses_other_content_before_spooling(data, says, tmp_path):
    with pytest.raises(InvalidFile, match=says):
        read("parquet", data, spool_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# -- JSON Lines: long lines, deep nesting, bad UTF-8 ---------------------------------------------------------------

def test_jsonl_line_past_max_line_is_a_malformed_row_skipped_unread(monkeypatch):
    """A line still unended at _MAX_LINE is dropped piece by piece; the lines after it are read as usual."""
    monkeypatch.setattr(readers, "_MAX_LINE", 10_000)
    monkeypatch.setattr(readers, "_JSON_BLOCK", 4096)
    data = hostile.jsonl_bytes(50) + b'{"id": "' + b"z" * 200_000 + b'"}\n' + hostile.jsonl_bytes(5, 50)
    held = []
    original = readers._JsonlReader._next_block

    def watched(self):
        block = original(self)
        held.append(len(self._tail) + len(block or b""))
        return block

    monkeypatch.setattr(readers._JsonlReader, "_next_block", watched)
    _, batches = read("jsonl", data, limits=LIMITS._replace(max_cell_bytes=1 << 20))
    table = pa.concat_tables([b.table for b in batches])
    assert table.column("__row").to_pylist() == [*range(50), *range(51, 56)]
    assert [(e.row, e.code) for e in errors_of(batches)] == [(50, "malformed_row")]
    assert "longer than" in errors_of(batches)[0].message
    assert max(held) < 10_000 + 2 * 4096


def test_jsonl_deep_nesting_is_malformed_not_a_crash():
    """Lines nested 100,000 deep (which crash pyarrow's type inference) are malformed rows."""
    data = hostile._deep_jsonl()
    _, batches = read("jsonl", data, limits=LIMITS._replace(max_cell_bytes=1 << 20))
    assert [r["__row"] for b in batches for r in b.table.to_pylist()] == [0, 4]
    assert [(e.row, e.code) for e in errors_of(batches)] == [(1, "malformed_row"), (2, "malformed_row"),
                                                             (3, "malformed_row")]


def test_jsonl_deep_value_in_an_ignored_key_after_the_first_block(monkeypatch):
    """Blocks after the first are parsed with the kept columns only: a deep value elsewhere costs nothing."""
    monkeypatch.setattr(readers, "_JSON_BLOCK", 4096)
    deep = b'{"a": 1, "junk": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    data = hostile.jsonl_bytes(100) + deep + hostile.jsonl_bytes(3, 101)
    _, batches = read("jsonl", data, wanted=["f0", "id"])
    assert sum(b.table.num_rows for b in batches) + len(errors_of(batches)) == 104


def test_jsonl_invalid_utf8_line_is_malformed():
    data = hostile._latin1_jsonl()
    _, batches = read("jsonl", data)
    assert [(e.row, e.code) for e in errors_of(batches)] == [(3, "malformed_row")]
    assert sum(b.table.num_rows for b in batches) == 6


def test_jsonl_later_blocks_keep_each_value_type(monkeypatch):
    """Blocks parsed with the first block's types still fall back when a value's type changes."""
    monkeypatch.setattr(readers, "_JSON_BLOCK", 256)
    records = [{"a": i, "s": f"s{i}", "n": None} for i in range(40)]
    records[30] = {"a": 1.5, "s": 7, "n": "late"}
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    _, batches = read("jsonl", data)
    rows = [r for b in batches for r in b.table.to_pylist()]
    assert len(rows) == 40 and rows[30]["a"] == 1.5 and rows[31]["a"] == 31
    assert rows[30]["s"] in (7, "7") and rows[30]["n"] == "late"


# -- sources ------------------------------------------------------------------------------------------------

def test_source_that_is_not_a_regular_file_or_too_large(tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(InvalidFile, match="regular file"):
        open_source(str(fifo))
    big = tmp_path / "big.csv"
    big.write_bytes(b"a\n" * 100)
    with pytest.raises(TooLarge) as info:
        open_source(f"file://{big}", max_bytes=199)
    assert_names_limit(info, "MAX_UPLOAD_BYTES")
    with open_source(str(big), max_bytes=200) as stream:
        assert stream.read() == b"a\n" * 100


def test_parquet_dictionary_column_stored_as_such_keeps_its_type_and_the_limit(tmp_path):
    """A column the file stores as a dictionary (pandas' category) stays one, and its long values fail their rows."""
    indices = pa.array([0] * 150 + [1] + [0] * 149, pa.int32())
    values = pa.DictionaryArray.from_arrays(indices, pa.array(["a", "b" * 200]))
    data = hostile.parquet_bytes(pa.table({"c": values, "x": [1.0] * 300}))
    _, batches = read("parquet", data, spool_dir=str(tmp_path))
    table = pa.concat_tables([b.table for b in batches if b.table.num_rows])
    assert pa.types.is_dictionary(table.schema.field("c").type)
    assert table.column("__row").to_pylist() == [i for i in range(300) if i != 150]
    assert [(e.row, e.code) for e in errors_of(batches)] == [(150, "invalid_value")]
