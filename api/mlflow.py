"""MLflow's scoring protocol: `/invocations` as `mlflow models serve` answers it, with `/ping`, `/health`, `/version`.

Request shapes follow mlflow.pyfunc.scoring_server: a JSON object with exactly one of `dataframe_split`,
`dataframe_records`, `instances` or `inputs` (other keys but `params` are ignored, as there), or a CSV body with a
header row. The answer is `{"predictions": [...]}`; a request that cannot be predicted as a whole is refused
with MLflow's error body (rendered by api/errors.py).
"""
from __future__ import annotations

import io
import logging
from typing import Any

import orjson
import pyarrow as pa
from flask import Blueprint, Response, request
from werkzeug.http import parse_options_header

from api import schemas
from api.models import predict_all
from api.openapi import operation, query
from api.parsing import read_body
from api.responses import json_response
from api.services import package_version, services
from shared.blobs import ROW
from shared.errors import (
    BadRequest,
    InvalidFile,
    InvalidParameter,
    MalformedJson,
    NotReady,
    PredqError,
    UnsupportedMediaType,
)
from shared.readers import Limits, open_reader
from shared.registry import ModelVersion

log = logging.getLogger(__name__)

bp = Blueprint("mlflow", __name__)

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
CONTENT_TYPES = ("application/json", "text/csv")


def _model() -> ModelVersion:
    """The model named by ?model=, else DEFAULT_MODEL, else the only one deployed."""
    svc = services()
    name = request.args.get("model") or svc.settings.DEFAULT_MODEL
    if not name:
        names = svc.registry.names()
        if len(names) != 1:
            shown = ", ".join(names[:20]) or "none"
            raise BadRequest(f"Name the model with ?model=NAME: {len(names)} models are deployed ({shown}) and "
                             "DEFAULT_MODEL is not set.")
        name = names[0]
    return svc.registry.get(name, request.args.get("version") or None)


def _check_content_type() -> str:
    """The body's media type; 415 as MLflow answers: another type, a charset but UTF-8, other parameters."""
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    if mimetype not in CONTENT_TYPES:
        raise UnsupportedMediaType(f"This predictor only supports the following content types: {list(CONTENT_TYPES)}. "
                                   f"Got {request.headers.get('Content-Type')!r}.")
    if options.get("charset", "utf-8").lower() != "utf-8":
        raise UnsupportedMediaType("The scoring server only supports UTF-8.")
    unexpected = sorted(set(options) - {"charset"})
    if unexpected:
        raise UnsupportedMediaType(f"Unrecognized content type parameters: {', '.join(unexpected)}. Since MLflow 2.0 "
                                   "the input format is a key of the JSON body (dataframe_split, dataframe_records, "
                                   "instances or inputs), not a content type parameter.")
    return mimetype


def _positional(mv: ModelVersion, rows: list, key: str) -> tuple[dict[str, list], int]:
    """Rows given as lists of values, taken in the model's feature order."""
    width = len(mv.features)
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise BadRequest(f"{key}: row {i} is {type(row).__name__}; every row must be a list of "
                             f"{width} values (or an object naming the features).")
        if len(row) != width:
            raise BadRequest(f"{key}: row {i} has {len(row)} values; the model takes {width} features "
                             f"({', '.join(f.name for f in mv.features[:10])}{', ...' if width > 10 else ''}).")
    return {f.name: [row[j] for row in rows] for j, f in enumerate(mv.features)}, len(rows)


def _records(rows: list, key: str) -> tuple[dict[str, list], int]:
    """Rows given as objects: one column per key found in any row, None where a row lacks it."""
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"{key}: row {i} is {type(row).__name__}; expected an object of feature values.")
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}, len(rows)


def _rows(mv: ModelVersion, rows: Any, key: str) -> tuple[dict[str, list], int]:
    if not isinstance(rows, list):
        raise BadRequest(f"{key} must be a list of rows, not {type(rows).__name__}.")
    if rows and isinstance(rows[0], dict):
        return _records(rows, key)
    return _positional(mv, rows, key)


def _column_dict(columns: dict, key: str) -> tuple[dict[str, list], int]:
    """`inputs` (or `instances`) as {feature: [values]}; scalars stand for one row."""
    if all(not isinstance(v, list) for v in columns.values()):
        return {name: [value] for name, value in columns.items()}, 1 if columns else 0
    lengths = {len(v) if isinstance(v, list) else 1 for v in columns.values()}
    if len(lengths) != 1 or not all(isinstance(v, list) for v in columns.values()):
        raise BadRequest(f"{key}: the length of values for each input/column name are not the same.")
    return dict(columns), lengths.pop()


def _split(mv: ModelVersion, frame: Any) -> tuple[dict[str, list], int]:
    """`dataframe_split`: {"columns": [...], "data": [[...], ...], "index"?: [...]} (pandas' split orientation)."""
    if not isinstance(frame, dict):
        raise BadRequest("dataframe_split must be an object {\"columns\": [...], \"data\": [[...], ...]}.")
    data = frame.get("data")
    if not isinstance(data, list):
        raise BadRequest("dataframe_split needs \"data\": a list of rows, each a list of values.")
    index = frame.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(data)):
        raise BadRequest(f"dataframe_split: \"index\" has {len(index) if isinstance(index, list) else 'no list of'} "
                         f"labels for {len(data)} rows.")
    columns = frame.get("columns")
    if columns is None:
        return _positional(mv, data, "dataframe_split")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise BadRequest("dataframe_split: \"columns\" must be a list of column names.")
    if len(set(columns)) != len(columns):
        raise BadRequest("dataframe_split: \"columns\" names a column twice.")
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != len(columns):
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise BadRequest(f"dataframe_split: row {i} has {got}; expected a list of {len(columns)} values, one "
                             "per column.")
    return {name: [row[j] for row in data] for j, name in enumerate(columns)}, len(data)


def _from_json(mv: ModelVersion, raw: bytes) -> tuple[dict[str, list], int]:
    """Columns and the number of rows of a JSON body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise MalformedJson(f"Invalid input. Ensure that input is a valid JSON formatted string. Error: {e}.") from e
    required = f"The input must be a JSON dictionary with exactly one of the input fields {list(FORMATS)}"
    if not isinstance(body, dict):
        raise BadRequest(f"{required}. Received {'a list' if isinstance(body, list) else type(body).__name__}.")
    present = [k for k in FORMATS if k in body]
    if len(present) != 1:
        raise BadRequest(f"{required}. Received dictionary with input fields: {list(body)}.")
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidParameter(f"params must be a dictionary. Got type {type(params).__name__!r}.")
    if params:  # an sklearn model has no params schema: MLflow ignores them too
        log.debug("params ignored", extra={"params": sorted(params)})
    key = present[0]
    value = body[key]
    if key == "dataframe_split":
        return _split(mv, value)
    if key == "dataframe_records":
        return _rows(mv, value, key)
    if isinstance(value, dict):  # instances and inputs may be given column by column
        return _column_dict(value, key)
    return _rows(mv, value, key)


def _from_csv(mv: ModelVersion, raw: bytes) -> tuple[dict[str, pa.Array], int]:
    """A CSV body with a header row, read as batch jobs read CSV (every value as text, parsed by dtype later)."""
    settings = services().settings
    wanted = [f.name for f in mv.features]
    try:
        with open_reader("csv", io.BytesIO(raw), wanted=wanted, limits=Limits.from_settings(settings)) as reader:
            present = set(reader.columns)
            tables = []
            for batch in reader:
                if batch.errors:
                    first = batch.errors[0]
                    raise BadRequest(f"The CSV body cannot be read: row {first.row}: {first.message}.")
                tables.append(batch.table)
    except InvalidFile as e:
        raise BadRequest(f"The CSV body cannot be read: {e.message}") from e
    table = pa.concat_tables(tables) if tables else None
    if table is None or not table.num_rows:
        return {name: pa.array([], type=pa.string()) for name in wanted if name in present}, 0
    return {name: table.column(name) for name in table.column_names if name != ROW}, table.num_rows


@bp.post("/invocations")
@operation("post", "/invocations", summary="Predict as MLflow's scoring server does",
           params=[query("model", {"type": "string"}, "The model; may be left out when one model is deployed or "
                         "DEFAULT_MODEL is set."),
                   query("version", {"type": "string"}, "A model version; the newest when left out.")],
           body={"application/json": {"schema": {
                     "type": "object", "description": "Exactly one of these keys; `params` is accepted and ignored.",
                     "properties": {"dataframe_split": {"type": "object"}, "dataframe_records": {"type": "array"},
                                    "instances": {"type": ["array", "object"]},
                                    "inputs": {"type": ["array", "object"]}, "params": {"type": "object"}}}},
                 "text/csv": {"schema": {"type": "string"}}},
           responses={200: schemas.MlflowPredictions, 400: None, 404: None, 413: None, 415: None})
def invocations() -> Response:
    """MLflow's scoring request: JSON (`dataframe_split`, `dataframe_records`, `instances`, `inputs`) or CSV.

    Every row must be valid: the first invalid row, a missing feature or a row the model cannot predict refuses the
    whole request with 400 (error_code BAD_REQUEST), as MLflow does. At most SYNC_MAX_ROWS rows.
    """
    mimetype = _check_content_type()
    mv = _model()
    raw = read_body(request, services().settings.MAX_JSON_BYTES)
    if mimetype == "text/csv":
        columns, n_rows = _from_csv(mv, raw)
    else:
        columns, n_rows = _from_json(mv, raw)
    predictions, _ = predict_all(mv, columns, n_rows, probabilities=False)
    return json_response({"predictions": predictions})


def _ping() -> Response:
    """200 with an empty body while a model can be served, as MLflow's scoring server answers."""
    registry = services().registry
    for name in registry.names():
        try:
            registry.get(name)
        except PredqError:
            continue
        return Response("\n", status=200, mimetype="application/json")
    raise NotReady("No model can be served: none is deployed, or none loads.")


@bp.get("/ping")
@operation("get", "/ping", summary="MLflow health check", responses={200: None, 503: None})
def ping() -> Response:
    """200 (body a newline) while a model can be served, as MLflow's scoring server answers; 503 when none can."""
    return _ping()


@bp.get("/health")
@operation("get", "/health", summary="MLflow health check (same as /ping)", responses={200: None, 503: None})
def health() -> Response:
    """The same as /ping."""
    return _ping()


@bp.get("/version")
@operation("get", "/version", summary="Server version, as MLflow's /version", responses={200: "text/plain"})
def serverpackage_version() -> Response:
    """This server's version as plain text (MLflow's scoring server answers its own version here)."""
    return Response(package_version(), mimetype="text/plain")
