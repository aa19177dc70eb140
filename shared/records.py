"""JSON records as Arrow tables, keeping each value's JSON type so validation can judge it exactly."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pyarrow as pa

from shared.blobs import ROW
from shared.prediction import JSON_MIXED_KEY
from shared.readers import Batch, RowError


def json_column(values: Sequence[Any]) -> tuple[pa.Array, bool]:
    """An Arrow array of the values; (array of JSON texts, True) when their JSON types are mixed or nested."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds or kinds <= {int, float} or kinds == {bool} or kinds == {str}:
        try:
            return pa.array(values), False
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
    return pa.array([None if v is None else orjson.dumps(v).decode() for v in values], type=pa.string()), True


def records_table(records: Sequence[Any], first_row: int, wanted: Sequence[str]) -> Batch:
    """One batch from parsed JSON values; a value that is not an object is a malformed_row error."""
    rows, objects, errors = [], [], []
    for offset, record in enumerate(records):
        if isinstance(record, dict):
            rows.append(first_row + offset)
            objects.append(record)
        else:
            errors.append(RowError(first_row + offset, "malformed_row",
                                   f"row {first_row + offset} is not a JSON object"))
    columns: dict[str, pa.Array] = {}
    mixed = []
    for name in wanted:
        array, is_mixed = json_column([o.get(name) for o in objects])
        columns[name] = array
        if is_mixed:
            mixed.append(name)
    columns[ROW] = pa.array(rows, type=pa.int64())
    table = pa.table(columns)
    if mixed:
        table = table.replace_schema_metadata({JSON_MIXED_KEY: ",".join(mixed).encode()})
    return Batch(table, errors)


def records_batches(records: Sequence[Any], wanted: Sequence[str], batch_rows: int) -> Iterator[Batch]:
    for start in range(0, len(records), batch_rows):
        yield records_table(records[start:start + batch_rows], start, wanted)
