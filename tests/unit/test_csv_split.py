"""CSV cut into unparsed pieces (API) and parsed by workers reads exactly as one pass of the CSV reader."""
from __future__ import annotations

import io
import math
import random

import pyarrow as pa
import pytest

from shared import blobs, readers
from shared.chunk import read_input
from shared.errors import InvalidFile
from shared.readers import CsvPiece, open_reader, parse_csv_piece

COLUMNS = ["a", "b", "c"]


def one_pass(data: bytes, wanted: list[str]) -> tuple[list, list]:
    """Rows as (position, values) and errors as read by the single-pass reader (the reference)."""
    rows, errors = [], []
    with open_reader("csv", io.BytesIO(data), wanted=wanted, batch_rows=1 << 20) as reader:
        for batch in reader:
            rows += _rows(batch.table, wanted)
            errors += [tuple(e) for e in batch.errors]
    return rows, errors


def split_then_parse(data: bytes, wanted: list[str], chunk_rows: int, floats: list[str]) -> tuple[list, list, int]:
    """The same file through the splitter, each piece parsed as a worker does; also how many were pieces."""
    rows, errors, pieces = [], [], 0
    with open_reader("csv", io.BytesIO(data), wanted=wanted, batch_rows=chunk_rows, split_csv=True) as reader:
        columns = reader.columns
        for item in reader:
            if isinstance(item, CsvPiece):
                pieces += 1
                assert 0 < item.rows <= chunk_rows
                table, errs = parse_csv_piece(item, columns, wanted, floats)
                assert table.num_rows + len(errs) == item.rows
            else:
                table, errs = item.table, item.errors
            rows += _rows(table, wanted)
            errors += [tuple(e) for e in errs]
    return rows, errors, pieces


def _rows(table: pa.Table, wanted: list[str]) -> list:
    names = [c for c in wanted if c in table.column_names]
    columns = [table.column(c).to_pylist() for c in names]
    return list(zip(table.column(blobs.ROW).to_pylist(), *columns))


def _same_values(got: list, want: list) -> None:
    assert [r[0] for r in got] == [r[0] for r in want]
    for g, w in zip(got, want):
        for x, y in zip(g[1:], w[1:]):
            if isinstance(x, float):
                assert (math.isnan(x) and y is None) or x == float(y) or (x is None and y is None)
            else:
                assert x == y


def random_csv(rng: random.Random, lines: int, quotes: bool, crlf: bool) -> bytes:
    out = ["a,b,c"]
    for i in range(lines):
        kind = rng.random()
        if kind < 0.06:
            out.append("")                                   # empty line: no record
        elif kind < 0.09:
            out.append(" ")                                  # whitespace: a malformed record
        elif kind < 0.14:
            out.append(",".join(str(i) for _ in range(rng.choice([1, 2, 4]))))  # wrong field count
        elif kind < 0.17:
            out.append(f"{i},x{i},")                         # text in a numeric column, null in another
        elif quotes and kind < 0.20:
            out.append(f'{i},"multi\nline, ""quoted""",{i}')  # a quoted value spanning lines
        else:
            out.append(f"{i},{i * 0.5},{-i}")
    text = ("\r\n" if crlf else "\n").join(out)
    if rng.random() < 0.5:
        text += "\r\n" if crlf else "\n"
    return text.encode()


@pytest.mark.parametrize("seed", range(12))
def test_split_pieces_read_exactly_as_one_pass(seed, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", rng.choice([16, 64, 257, 4096]))
    data = random_csv(rng, rng.randint(1, 600), quotes=seed % 3 == 0, crlf=seed % 2 == 1)
    for wanted in (["a", "b", "c"], ["c", "a"], ["b"]):
        want_rows, want_errors = one_pass(data, wanted)
        for chunk_rows in (1, 7, 50, 10_000):
            rows, errors, _ = split_then_parse(data, wanted, chunk_rows, floats=[])
            assert rows == want_rows
            assert sorted(errors) == sorted(want_errors)
            for floats in (["a", "c"], ["a", "b", "c"]):  # b has text cells: read again as text
                rows, errors, _ = split_then_parse(data, wanted, chunk_rows, floats=floats)
                _same_values(rows, want_rows)
                assert sorted(errors) == sorted(want_errors)


def test_plain_numeric_csv_is_all_pieces_of_exact_size(monkeypatch):
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", 1000)
    data = b"a,b,c\n" + b"".join(b"%d,%d.5,%d\n" % (i, i, -i) for i in range(10_001))
    with open_reader("csv", io.BytesIO(data), batch_rows=1000, split_csv=True) as reader:
        items = list(reader)
    assert all(isinstance(p, CsvPiece) for p in items)
    assert [p.rows for p in items] == [1000] * 10 + [1]
    assert [p.base for p in items] == list(range(0, 10_001, 1000))
    assert b"".join(p.data for p in items) == data[len(b"a,b,c\n"):]
    table, errors = parse_csv_piece(items[3], COLUMNS, COLUMNS, ["a", "b", "c"])
    assert errors == [] and table.column("b").type == pa.float64()
    assert table.column(blobs.ROW).to_pylist() == list(range(3000, 4000))
    assert table.column("a").to_pylist() == [float(i) for i in range(3000, 4000)]


def test_a_quote_late_in_the_file_hands_the_rest_to_the_parser(monkeypatch):
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", 1000)
    n = 20_000  # more than the splitter's first read, which looks for the header
    body = b"".join(b"%d,%d,%d\n" % (i, i, i) for i in range(n)) + b'%d,"two\nlines",0\n%d,1,1\n' % (n, n + 1)
    with open_reader("csv", io.BytesIO(b"a,b,c\n" + body), batch_rows=3000, split_csv=True) as reader:
        items = list(reader)
    kinds = [type(i).__name__ for i in items]
    assert kinds[0] == "CsvPiece" and kinds[-1] == "Batch"
    assert kinds == sorted(kinds, key=lambda k: k != "CsvPiece")  # pieces first, then parsed batches
    last = items[-1].table
    assert last.column(blobs.ROW).to_pylist()[-2:] == [n, n + 1]
    assert last.column("b").to_pylist()[-2:] == ["two\nlines", "1"]


def test_text_in_a_numeric_column_is_read_as_text_for_validation():
    piece = CsvPiece(b"1,2,3\n4,oops,6\n", 2, 10)
    table, errors = parse_csv_piece(piece, COLUMNS, COLUMNS, ["a", "b", "c"])
    assert errors == []
    assert table.column("b").to_pylist() == ["2", "oops"]
    assert table.column(blobs.ROW).to_pylist() == [10, 11]


def test_a_piece_that_does_not_hold_its_count_fails_its_rows_as_malformed():
    piece = CsvPiece(b"1,2,3\n4,5,6\n", 3, 100)
    table, errors = parse_csv_piece(piece, COLUMNS, COLUMNS, [])
    assert table.num_rows == 0
    assert [e.row for e in errors] == [100, 101, 102]
    assert {e.code for e in errors} == {"malformed_row"}


@pytest.mark.parametrize("bad", [b"1,2,3\n\xff\xfe,1,2\n", b"1,2,3\n" * 5000 + b"\xc3"])
def test_non_utf8_is_refused_by_the_splitter(bad, monkeypatch):
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", 4096)
    with pytest.raises(InvalidFile, match="UTF-8"):
        with open_reader("csv", io.BytesIO(b"a,b,c\n" + bad), split_csv=True) as reader:
            list(reader)


def test_utf8_character_across_a_block_boundary_is_fine(monkeypatch):
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", 7)
    data = "a,b,c\n" + "".join(f"{i},é€,{i}\n" for i in range(50))
    rows, errors, pieces = split_then_parse(data.encode(), COLUMNS, 10, floats=[])
    assert errors == [] and pieces == 5
    assert [r[2] for r in rows] == ["é€"] * 50


def test_stored_piece_round_trips_through_the_chunk_reader():
    piece = CsvPiece(b"1,2,3\n4,5\n7,8,9", 3, 40)
    layout = {"columns": COLUMNS, "wanted": ["c", "a"], "floats": ["a", "c"], "base": piece.base, "rows": piece.rows}
    for compression in ("zstd", "lz4", "none"):
        blob = blobs.encode_csv(piece.data, layout, compression)
        table, errors = read_input(blob)
        assert table.column_names == ["c", "a", blobs.ROW]
        assert table.column(blobs.ROW).to_pylist() == [40, 42]
        assert table.column("c").to_pylist() == [3.0, 9.0]
        assert [(e.row, e.code) for e in errors] == [(41, "malformed_row")]
        positions, none = read_input(blob, parse=False)
        assert positions.column(blobs.ROW).to_pylist() == [40, 41, 42] and none == []


def test_a_record_longer_than_a_parser_block_is_refused_without_holding_it(monkeypatch):
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", 1000)
    monkeypatch.setattr(readers, "_CSV_BLOCK", 5000)  # the parser's block, which no record may outgrow
    served = [0]

    class Endless(io.RawIOBase):  # a header, then a line that never ends: stop early, do not buffer it all
        def readable(self):
            return True

        def readinto(self, b):
            data = (b"a,b,c\n1,2,3\n" if not served[0] else b"") + b"9" * len(b)
            b[:] = data[:len(b)]
            served[0] += len(b)
            return len(b)

    with pytest.raises(InvalidFile, match="longer than"):
        with open_reader("csv", Endless(), split_csv=True) as reader:
            list(reader)
    assert served[0] < readers._PEEK + 5000 + 3 * 1000
    body = b"a,b,c\n" + b"1,2,3\n" * 10 + b"4," + b"5" * 6000 + b",6\n"
    with pytest.raises(InvalidFile, match="longer than"):
        with open_reader("csv", io.BytesIO(body), split_csv=True) as reader:
            list(reader)
    fine = b"a,b,c\n" + b"1,2,3\n" * 10 + b"4," + b"5" * 4000 + b",6\n"
    rows, errors, _ = split_then_parse(fine, COLUMNS, 3, floats=[])
    assert len(rows) == 11 and errors == []


def test_utf8_character_split_where_the_parser_takes_over(monkeypatch):
    """A quote sends the rest to the parser while a character is split between read-ahead and the stream."""
    monkeypatch.setattr(readers, "_SPLIT_BLOCK", 8)
    body = ("a,b,c\n" + "1,2,3\n" + '4,"q",6\n' + "".join(f"{i},é€,{i}\n" for i in range(30))).encode()
    for peek in range(8, 60):  # how much the header's read takes: every cut through the multi-byte characters
        monkeypatch.setattr(readers, "_PEEK", peek)
        rows, errors, _ = split_then_parse(body, COLUMNS, 4, floats=[])
        assert errors == [] and len(rows) == 32
