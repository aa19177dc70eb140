"""JSON Lines built column by column reads back exactly as encoding each row with orjson."""
from __future__ import annotations

import math

import numpy as np
import orjson
import pyarrow as pa
import pytest

from shared import writers


def _lines(table: pa.Table) -> list[bytes]:
    return b"".join(writers.stream("jsonl", iter([table]), table.schema)).split(b"\n")


def _row_by_row(table: pa.Table) -> list[dict]:
    columns = [c.to_pylist() for c in table.columns]
    return [orjson.loads(orjson.dumps(dict(zip(table.column_names, values)))) for values in zip(*columns)]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


def test_every_kind_of_value_reads_back_as_orjson_writes_it():
    rng = np.random.default_rng(0)
    n = 20_000
    floats = np.concatenate([rng.random(n // 2), rng.standard_normal(n // 2) * 10.0 ** rng.integers(-300, 300, n // 2)])
    floats[:8] = [3.0, -0.0, 0.0, 1e16, 5e-324, 1.7976931348623157e308, np.nan, np.inf]
    texts = ["plain", 'a "quote"', "back\\slash", "line\nbreak", "tab\t", "é€ unicode", "\x01 control", None]
    table = pa.table({
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "id": pa.array([texts[i % len(texts)] for i in range(n)], pa.string()),
        "label": pa.array([["benign", "malignant", None][i % 3] for i in range(n)], pa.string()),
        "prediction": pa.array(floats),
        "small": pa.array(np.clip(floats, -1e30, 1e30).astype(np.float32), pa.float32()),
        "flag": pa.array([[True, False, None][i % 3] for i in range(n)], pa.bool_()),
        "count": pa.array([[1, -7, None][i % 3] for i in range(n)], pa.int32()),
    })
    lines = _lines(table)
    assert lines[-1] == b"" and len(lines) == n + 1
    got = [orjson.loads(line) for line in lines[:-1]]
    want = _row_by_row(table)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for key in g:
            assert _same(g[key], w[key]), (key, g[key], w[key])


@pytest.mark.parametrize("value", [3.0, 2.0 ** 60, -5.0, 0.0])
def test_whole_floats_stay_floats(value):
    line = _lines(pa.table({"p": pa.array([value])}))[0]
    assert isinstance(orjson.loads(line)["p"], float)


def test_sliced_tables_and_many_slices(monkeypatch):
    monkeypatch.setattr(writers, "_JSONL_SLICE", 7)
    table = pa.table({"row": pa.array(np.arange(100)), "p": pa.array(np.arange(100) / 3)}).slice(13, 50)
    got = [orjson.loads(line) for line in _lines(table)[:-1]]
    assert got == _row_by_row(table)
