"""The Open Inference Protocol v2 over REST (KServe, Triton, MLServer): health, metadata and inference, JSON tensors.

A model's inputs are its features, one tensor each, named by the feature; one tensor of shape [rows, features]
with the features in the model's order is accepted too (KServe's scikit-learn server takes that). The outputs
are `predict` and, for classifiers, `predict_proba` ([rows, classes], classes in the model's order), in JSON.
Inputs may come as JSON or as binary tensor data (Triton's extension, its client's default). Errors are
`{"error": "<message>"}` (rendered by api/errors.py).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from flask import Blueprint, Response, request

from api import schemas
from api.models import predict_all
from api.openapi import operation, path
from api.parsing import read_body
from api.responses import json_response
from api.services import package_version, services
from shared.errors import BadRequest, MalformedJson, PredqError
from shared.registry import ModelVersion

bp = Blueprint("oip", __name__)

PLATFORM = "scikit-learn"
OUTPUTS = ("predict", "predict_proba")
_FEATURE_DATATYPES = {"float64": "FP64", "int64": "INT64", "bool": "BOOL", "string": "BYTES", "category": "BYTES"}
_INTEGER = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_FLOAT = {"FP16", "FP32", "FP64"}
DATATYPES = _INTEGER | _FLOAT | {"BOOL", "BYTES"}
_NUMPY = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}




def _model(name: str, model_version: str | None) -> ModelVersion:
    return services().registry.get(name, model_version)


def _datatype_of(values: list) -> str:
    """The tensor datatype of a list of JSON predictions."""
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {bool} and kinds:
        return "BOOL"
    if kinds <= {int} and kinds:
        return "INT64"
    if kinds <= {int, float}:
        return "FP64"
    return "BYTES"


def _predict_datatype(mv: ModelVersion) -> str:
    if mv.task == "classification" and mv.classes is not None:
        return _datatype_of(list(mv.classes))
    return "FP64"


def _metadata(mv: ModelVersion) -> dict:
    outputs = [{"name": "predict", "datatype": _predict_datatype(mv), "shape": [-1]}]
    if mv.task == "classification" and mv.classes is not None and hasattr(mv.estimator, "predict_proba"):
        outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(mv.classes)]})
    return {
        "name": mv.name,
        "versions": services().registry.versions().get(mv.name, [mv.version]),
        "platform": PLATFORM,
        "inputs": [{"name": f.name, "datatype": _FEATURE_DATATYPES[f.dtype], "shape": [-1]} for f in mv.features],
        "outputs": outputs,
    }


def _flatten(data: Any, out: list) -> None:
    for v in data:
        if isinstance(v, list):
            _flatten(v, out)
        else:
            out.append(v)


def _check_values(name: str, datatype: str, values: list) -> None:
    """Each value must be of its tensor's datatype (null stands for a missing value)."""
    for v in values:
        if v is None:
            continue
        if datatype == "BYTES":
            ok = isinstance(v, str)
        elif datatype == "BOOL":
            ok = isinstance(v, bool)
        elif datatype in _INTEGER:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            shown = repr(v)
            raise BadRequest(f"Input {name!r} is declared {datatype} but holds {shown[:40]}.")


class BinaryData:
    """The bytes after the JSON header of a request in the binary tensor data extension, taken input by input."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.offset = 0

    def take(self, name: str, size: Any) -> memoryview:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"Input {name!r} has a binary_data_size that is not a non-negative integer.")
        if self.offset + size > len(self.data):
            raise BadRequest(f"Input {name!r} claims {size} bytes of binary data; only "
                             f"{len(self.data) - self.offset} are left in the body.")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def check_used(self) -> None:
        if self.offset != len(self.data):
            raise BadRequest(f"{len(self.data) - self.offset} bytes of binary data belong to no input.")


def _decode(name: str, datatype: str, chunk: memoryview, count: int) -> list:
    """Binary tensor data (little-endian, row-major; BYTES as 4-byte lengths each followed by the bytes) as values."""
    if datatype != "BYTES":
        width = np.dtype(_NUMPY[datatype]).itemsize
        if len(chunk) != count * width:
            raise BadRequest(f"Input {name!r} has {len(chunk)} bytes of binary data; {count} {datatype} values take "
                             f"{count * width}.")
        return np.frombuffer(chunk, dtype=_NUMPY[datatype]).tolist()
    values: list = []
    at = 0
    while at < len(chunk):
        if at + 4 > len(chunk):
            raise BadRequest(f"Input {name!r}: its binary BYTES data ends inside a length prefix.")
        size = int.from_bytes(chunk[at:at + 4], "little")
        if at + 4 + size > len(chunk):
            raise BadRequest(f"Input {name!r}: a binary BYTES element runs past the input's data.")
        try:
            values.append(bytes(chunk[at + 4:at + 4 + size]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRequest(f"Input {name!r}: a BYTES element is not UTF-8 text.") from e
        at += 4 + size
    if len(values) != count:
        raise BadRequest(f"Input {name!r} has {len(values)} BYTES elements; its shape needs {count}.")
    return values


def _tensor(i: int, raw: Any, binary: BinaryData) -> tuple[str, list[int], list]:
    """(name, shape, flat values) of one input tensor, checked against its own declaration."""
    if not isinstance(raw, dict):
        raise BadRequest(f"inputs[{i}] must be an object {{\"name\", \"shape\", \"datatype\", \"data\"}}.")
    name, shape, datatype, data = raw.get("name"), raw.get("shape"), raw.get("datatype"), raw.get("data")
    if not isinstance(name, str):
        raise BadRequest(f"inputs[{i}] needs a \"name\" (a string).")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise BadRequest(f"Input {name!r} needs a \"shape\": a list of non-negative integers.")
    if datatype not in DATATYPES:
        raise BadRequest(f"Input {name!r} has datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}.")
    expected = math.prod(shape)
    parameters = raw.get("parameters")
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        values = _decode(name, datatype, binary.take(name, parameters["binary_data_size"]), expected)
        return name, shape, values
    if not isinstance(data, list):
        raise BadRequest(f"Input {name!r} needs \"data\": its values as a (flat or nested) list.")
    values = []
    _flatten(data, values)
    if len(values) != expected:
        raise BadRequest(f"Input {name!r} has {len(values)} values; its shape {shape} needs {expected}.")
    _check_values(name, datatype, values)
    return name, shape, values


def _columns(mv: ModelVersion, inputs: Any, binary: BinaryData) -> tuple[dict[str, list], int]:
    """Feature columns from the input tensors, and the number of rows."""
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("\"inputs\" must be a non-empty list of tensors, one per feature.")
    tensors = [_tensor(i, raw, binary) for i, raw in enumerate(inputs)]
    binary.check_used()
    features = [f.name for f in mv.features]
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        raise BadRequest("Two inputs have the same name.")
    if len(tensors) == 1 and names[0] not in features and len(tensors[0][1]) == 2:
        name, shape, values = tensors[0]
        if shape[1] != len(features):
            raise BadRequest(f"Input {name!r} is not a feature of model {mv.name!r}; as one [rows, features] tensor "
                             f"its second dimension must be {len(features)}, not {shape[1]}.")
        width = len(features)
        return {f: values[j::width] for j, f in enumerate(features)}, shape[0]
    columns: dict[str, list] = {}
    rows: int | None = None
    for name, shape, values in tensors:
        if name not in features:
            continue  # unknown inputs are ignored, like unknown fields of a /v1 row
        if not shape or any(d != 1 for d in shape[1:]):
            raise BadRequest(f"Input {name!r} must have shape [rows] or [rows, 1]: one value per row; got {shape}.")
        if rows is not None and shape[0] != rows:
            raise BadRequest(f"Input {name!r} has {shape[0]} rows; the inputs before it have {rows}.")
        rows = shape[0]
        columns[name] = values
    if rows is None:
        raise BadRequest(f"No input is a feature of model {mv.name!r}; its features are "
                         f"{', '.join(features[:20])}{', ...' if len(features) > 20 else ''}.")
    return columns, rows


def _requested(mv: ModelVersion, outputs: Any) -> list[str]:
    if outputs is None:
        return ["predict"]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise BadRequest("\"outputs\" must be a list of objects {\"name\": ...}.")
    names = [o["name"] for o in outputs]
    available = [o["name"] for o in _metadata(mv)["outputs"]]
    for name in names:
        if name not in available:
            raise BadRequest(f"Model {mv.name!r} has no output {name!r}; it has {', '.join(available)}.")
    return list(dict.fromkeys(names)) or ["predict"]


def _infer(name: str, model_version: str | None) -> Response:
    raw = read_body(request, services().settings.MAX_JSON_BYTES)  # any content type: Triton's client sends none
    header_length = request.headers.get("Inference-Header-Content-Length")
    binary = BinaryData(b"")
    if header_length is not None:  # the binary tensor data extension: a JSON header, then the inputs' bytes
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a length within the body.")
        raw, binary = raw[:int(header_length)], BinaryData(raw[int(header_length):])
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise MalformedJson(f"The body is not valid JSON: {e}.") from e
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object {\"inputs\": [...]}.")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("\"id\" must be a string.")
    mv = _model(name, model_version)
    outputs = _requested(mv, body.get("outputs"))
    columns, rows = _columns(mv, body.get("inputs"), binary)
    predictions, probas = predict_all(mv, columns, rows, probabilities="predict_proba" in outputs)
    tensors = []
    for output in outputs:
        if output == "predict":
            tensors.append({"name": "predict", "datatype": _datatype_of(predictions) if predictions else "FP64",
                            "shape": [len(predictions)], "data": predictions})
        else:
            width = len(mv.classes or [])
            tensors.append({"name": "predict_proba", "datatype": "FP64", "shape": [len(predictions), width],
                            "data": [p for row in probas or [] for p in row]})
    answer: dict[str, Any] = {"model_name": mv.name, "model_version": mv.version}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = tensors
    return json_response(answer)


@bp.get("/v2/health/live")
@operation("get", "/v2/health/live", summary="OIP server liveness", responses={200: schemas.OipLive})
def live() -> Response:
    """200 while the process serves."""
    return json_response({"live": True})


@bp.get("/v2/health/ready")
@operation("get", "/v2/health/ready", summary="OIP server readiness", responses={200: schemas.OipReady, 400: None})
def ready() -> Response:
    """200 when every deployed model loads; 400 (a 4xx means not ready, in this protocol) naming those that do not."""
    registry = services().registry
    failing = []
    for name in registry.names():
        try:
            registry.get(name)
        except PredqError:
            failing.append(name)
    if failing:
        raise BadRequest(f"Not ready: cannot load {', '.join(failing)}.")
    return json_response({"ready": True})


@bp.get("/v2")
@operation("get", "/v2", summary="OIP server metadata", responses={200: schemas.OipServerMetadata})
def server_metadata() -> Response:
    """The server's name, version and protocol extensions (none)."""
    return json_response({"name": "predq", "version": package_version(), "extensions": []})


_NAME = path("name")
_VERSION = path("version")


@bp.get("/v2/models/<name>")
@operation("get", "/v2/models/{name}", summary="OIP model metadata", params=[_NAME],
           responses={200: schemas.OipModelMetadata, 404: None})
def model_metadata(name: str) -> Response:
    """The newest version's inputs (one per feature) and outputs (predict, and predict_proba for classifiers)."""
    return json_response(_metadata(_model(name, None)))


@bp.get("/v2/models/<name>/versions/<version>")
@operation("get", "/v2/models/{name}/versions/{version}", summary="OIP model metadata of a version",
           params=[_NAME, _VERSION], responses={200: schemas.OipModelMetadata, 404: None})
def version_metadata(name: str, version: str) -> Response:
    """A version's inputs and outputs."""
    return json_response(_metadata(_model(name, version)))


@bp.get("/v2/models/<name>/ready")
@operation("get", "/v2/models/{name}/ready", summary="OIP model readiness", params=[_NAME],
           responses={200: schemas.OipModelReady, 404: None})
def model_ready(name: str) -> Response:
    """200 when the newest version is loaded; 404 for a model that is not deployed or does not load."""
    mv = _model(name, None)
    return json_response({"name": mv.name, "ready": True})


@bp.get("/v2/models/<name>/versions/<version>/ready")
@operation("get", "/v2/models/{name}/versions/{version}/ready", summary="OIP model version readiness",
           params=[_NAME, _VERSION], responses={200: schemas.OipModelReady, 404: None})
def version_ready(name: str, version: str) -> Response:
    """200 when the version is loaded; 404 otherwise."""
    mv = _model(name, version)
    return json_response({"name": mv.name, "ready": True})


_INFER_BODY = {"application/json": {"model": schemas.OipInferRequest}}


@bp.post("/v2/models/<name>/infer")
@operation("post", "/v2/models/{name}/infer", summary="OIP inference", params=[_NAME], body=_INFER_BODY,
           responses={200: schemas.OipInferResponse, 400: None, 404: None, 413: None})
def infer(name: str) -> Response:
    """One tensor per feature (or one [rows, features] tensor) in; `predict` (and `predict_proba` when asked) out.

    The body is read as JSON whatever its content type. Every row must be valid: an invalid or missing value, or a
    row the model cannot predict, refuses the request (400) naming the row. At most SYNC_MAX_ROWS rows.
    """
    return _infer(name, None)


@bp.post("/v2/models/<name>/versions/<version>/infer")
@operation("post", "/v2/models/{name}/versions/{version}/infer", summary="OIP inference on a version",
           params=[_NAME, _VERSION], body=_INFER_BODY,
           responses={200: schemas.OipInferResponse, 400: None, 404: None, 413: None})
def version_infer(name: str, version: str) -> Response:
    """As /v2/models/{name}/infer, on the given version."""
    return _infer(name, version)
