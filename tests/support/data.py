"""Input files with planted bad rows, and the answers a correct service must give for them."""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tests.support.models import SENTINEL, training_frame


@dataclass
class Planted:
    """A file and, for every planted row, the error code it must get."""

    filename: str
    body: bytes
    frame: pd.DataFrame                       # every row's clean values, with the id column
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def good(self) -> pd.DataFrame:
        return self.frame.drop(index=sorted(self.errors))


def base_frame(n: int, seed: int = 11) -> pd.DataFrame:
    frame = training_frame(n, seed)
    frame.insert(0, "id", [f"r{i}" for i in range(n)])
    return frame


def _spread(n: int, codes: list[str], per_code: int = 4) -> dict[int, str]:
    """Rows for each code, spread over the file and including the first and last row."""
    rng = np.random.default_rng(5)
    rows = rng.choice(np.arange(1, n - 1), size=len(codes) * per_code - 2, replace=False).tolist()
    rows = [0, *rows, n - 1]
    return {r: codes[k % len(codes)] for k, r in enumerate(rows)}


def planted_csv(n: int) -> Planted:
    frame = base_frame(n)
    errors = _spread(n, ["missing_feature", "invalid_type", "invalid_value", "malformed_row", "prediction_failed"])
    text = frame.to_csv(index=False, float_format="%.17g")
    lines = text.splitlines()
    for row, code in errors.items():
        cells = lines[row + 1].split(",")
        if code == "missing_feature":
            cells[2] = ""
        elif code == "invalid_type":
            cells[3] = "abc"
        elif code == "invalid_value":
            cells[4] = "inf"
        elif code == "malformed_row":
            cells = cells[:3]
        else:
            cells[5] = repr(SENTINEL)
        lines[row + 1] = ",".join(cells)
    return Planted("input.csv", ("\n".join(lines) + "\n").encode(), frame, errors)


def planted_csv_quoted(n: int) -> Planted:
    """planted_csv with quoted ids (a comma, quotes, a line break) in its last third: the API reads plain records
    as unparsed pieces up to the first quote and parses the rest itself."""
    planted = planted_csv(n)
    lines = planted.body.decode().split("\n")
    for row in range(2 * n // 3, n, 997):
        if row in planted.errors:
            continue
        value = f'r{row}, "quoted"\nsecond line'
        planted.frame.loc[row, "id"] = value
        cells = lines[row + 1].split(",")
        cells[0] = '"' + value.replace('"', '""') + '"'
        lines[row + 1] = ",".join(cells)
    planted.body = "\n".join(lines).encode()
    return planted


def planted_jsonl(n: int) -> Planted:
    """JSON has no NaN or infinity: a float-only model cannot see invalid_value from JSON Lines."""
    frame = base_frame(n)
    errors = _spread(n, ["missing_feature", "invalid_type", "malformed_row", "prediction_failed"])
    out = []
    for row, record in enumerate(frame.to_dict(orient="records")):
        code = errors.get(row)
        if code == "missing_feature":
            del record["f1"]
        elif code == "invalid_type":
            record["f2"] = "1.5"
        elif code == "prediction_failed":
            record["f0"] = SENTINEL
        line = orjson.dumps(record)
        if code == "malformed_row":
            line = line[:-3]
        out.append(line)
    return Planted("input.jsonl", b"\n".join(out) + b"\n", frame, errors)


def planted_parquet(n: int) -> Planted:
    """Parquet has no malformed rows; a text column carries invalid_type."""
    frame = base_frame(n)
    errors = _spread(n, ["missing_feature", "invalid_type", "invalid_value", "prediction_failed"])
    f1 = frame["f1"].to_numpy().copy()
    f2 = frame["f2"].to_numpy().copy()
    f3 = [repr(v) for v in frame["f3"]]
    f4 = frame["f4"].to_numpy().copy()
    nulls = np.zeros(n, dtype=bool)
    for row, code in errors.items():
        if code == "missing_feature":
            nulls[row] = True
        elif code == "invalid_type":
            f3[row] = "abc"
        elif code == "invalid_value":
            f2[row] = np.nan
        else:
            f4[row] = SENTINEL
    table = pa.table({
        "id": frame["id"], "f0": frame["f0"], "f1": pa.array(f1, mask=nulls), "f2": f2,
        "f3": pa.array(f3, type=pa.string()), "f4": f4,
    })
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=7000)
    return Planted("input.parquet", sink.getvalue(), frame, errors)


BOUNDARY = "predq-test-boundary-7f3a"


def _multipart_head(fields: dict[str, str], filename: str, boundary: str) -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode())
    return b"".join(parts)


def multipart(fields: dict[str, str], filename: str, body: bytes, boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """A multipart/form-data body with the fields first and the file last, and its content type."""
    tail = f"\r\n--{boundary}--\r\n".encode()
    return _multipart_head(fields, filename, boundary) + body + tail, f"multipart/form-data; boundary={boundary}"


def paused_multipart(fields: dict[str, str], filename: str, body: bytes, pause_at: int,
                     on_pause: Callable[[], None], piece: int = 64 * 1024) -> tuple[Iterator[bytes], str]:
    """A streamed multipart body that calls `on_pause` after the file's first `pause_at` bytes, then sends the rest."""

    def stream() -> Iterator[bytes]:
        yield _multipart_head(fields, filename, BOUNDARY)
        for start in range(0, pause_at, piece):
            yield body[start:min(start + piece, pause_at)]
        on_pause()
        for start in range(pause_at, len(body), piece):
            yield body[start:start + piece]
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return stream(), f"multipart/form-data; boundary={BOUNDARY}"
