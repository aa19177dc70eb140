"""Model metadata and synchronous predictions."""
from __future__ import annotations

import gc
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from flask import Blueprint, Response, current_app, request
from flask.blueprints import BlueprintSetupState

from api import schemas
from api.metrics import RequestMetrics, count_predictions, request_metrics
from api.openapi import operation, path, query
from api.parsing import json_body, parse_bool
from api.responses import json_response
from api.services import services
from shared.batching import Arrival, BatchFailed, Batcher, PredictionCache
from shared.errors import EmptyInput, InvalidInput, PredqError, TooManyRows
from shared.ingest import check_columns
from shared.prediction import Scored, Validation, json_value, predict, record_plan, validate
from shared.registry import ModelVersion

bp = Blueprint("models", __name__)

_VERSION = query("version", {"type": "string"}, "A model version; the newest when left out.")
_PROBAS = query("probabilities", {"type": "boolean"}, "Add class probabilities (classifiers).")


class PredictionFailed(PredqError):
    status, code = 422, "prediction_failed"


@dataclass
class Serving:
    """What this process keeps for single predictions: the micro-batcher, the prediction cache (or None), and the
    most predict calls that may look for the failing rows of one request (BISECT_MAX_PREDICT_CALLS)."""

    batcher: Batcher
    cache: PredictionCache | None
    bisect_max_calls: int


def serving() -> Serving:
    return current_app.extensions["predq.serving"]


@bp.record_once
def _attach_serving(state: BlueprintSetupState) -> None:
    svc = state.app.extensions["predq"]
    s = svc.settings
    cache = PredictionCache(s.PREDICTION_CACHE_SIZE) if s.PREDICTION_CACHE_SIZE else None
    batcher = Batcher(s.PREDICT_MAX_BATCH_SIZE, s.PREDICT_MAX_WAIT_MS)
    state.app.extensions["predq.serving"] = Serving(batcher, cache, s.BISECT_MAX_PREDICT_CALLS)
    for name in svc.registry.names():  # prove each model's array path now, not on its first request
        try:
            record_plan(svc.registry.get(name))
        except PredqError:
            continue
    # What exists now (libraries, models) lives as long as the process. Left in the collector's care, it makes
    # every full collection walk ~170k objects: a ~100 ms stall every few seconds under load, which was most
    # of the p99 of single predictions. Frozen, a full collection walks only what was made since.
    gc.collect()
    gc.freeze()


#: The URL rule of single predictions, the route label of their metrics.
PREDICT_RULE = "/v1/models/<name>/predict"


def _model() -> ModelVersion:
    return services().registry.get(request.view_args["name"], request.args.get("version") or None)


@bp.get("/v1/models")
@operation("get", "/v1/models", summary="List models", responses={200: schemas.ModelList})
def list_models() -> Response:
    """One entry per model name, describing its newest version, with every version listed."""
    reg = services().registry
    data = []
    for name in reg.names():
        try:
            data.append(reg.describe(reg.get(name)))
        except PredqError:
            continue
    return json_response({"data": data})


@bp.get("/v1/models/<name>")
@operation("get", "/v1/models/{name}", summary="Describe a model", params=[path("name"), _VERSION],
           responses={200: schemas.Model, 404: None})
def get_model(name: str) -> Response:
    """The newest version of a model, or the one named by `version`."""
    reg = services().registry
    return json_response(reg.describe(_model()))


def _scored_rows(mv: ModelVersion, scored: Scored, n: int, probabilities: bool) -> tuple[list, list | None]:
    predictions: list[Any] = [None] * n
    probas: list[Any] | None = [None] * n if probabilities else None
    classes = [str(c) for c in (mv.classes or [])]
    for k, pos in enumerate(scored.positions.tolist()):
        predictions[pos] = json_value(scored.predictions[k])
        if probas is not None and scored.probabilities is not None:
            probas[pos] = dict(zip(classes, scored.probabilities[k].tolist()))
    return predictions, probas


def _invalid(validation: Validation) -> InvalidInput:
    fields = validation.field_errors(0)
    return InvalidInput(f"The row is invalid: {fields[0]['message']}.", details={"fields": fields})


def _one(serving: Serving, mv: ModelVersion, columns: dict[str, Any], probabilities: bool) -> tuple[Any, dict | None]:
    """(prediction, probabilities) of one row on its own: validated, then predicted with the general path."""
    validation = validate(mv, columns, 1)
    if not validation.valid[0]:
        raise _invalid(validation)
    scored = predict(mv, validation, probabilities, serving.bisect_max_calls)
    if not len(scored.positions):
        raise PredictionFailed(f"The model could not predict this row: {scored.error_messages[0]}.")
    probas = None
    if probabilities and scored.probabilities is not None:
        probas = dict(zip((str(c) for c in mv.classes or []), scored.probabilities[0].tolist()))
    return json_value(scored.predictions[0]), probas


def answered(metrics: RequestMetrics, mv: ModelVersion, prediction: Any, probas: dict | None) -> dict[str, Any]:
    """The body of one prediction's answer; the prediction is counted."""
    metrics.count_predictions(mv.name, mv.version, 1)
    body: dict[str, Any] = {"model": {"name": mv.name, "version": mv.version}, "prediction": prediction}
    if probas is not None:
        body["probabilities"] = probas
    return body


def _answer(mv: ModelVersion, prediction: Any, probas: dict | None) -> Response:
    return json_response(answered(request_metrics(), mv, prediction, probas))


def score_record(serving: Serving, mv: ModelVersion, record: dict, probabilities: bool,
                 arrival: Arrival) -> tuple[Any, dict | None]:
    """One JSON object: validated alone, predicted together with concurrent requests for the same model file."""
    plan = record_plan(mv)
    probabilities = probabilities and plan.probabilities
    row: Any
    if plan.numeric is not None:
        row = plan.numeric.row(record)
        if row is None:  # a value that is not plainly valid: the general path names the problem exactly
            arrival.leave()
            return _one(serving, mv, {f.name: [record.get(f.name)] for f in mv.features}, probabilities)
        row_bytes = array("d", row).tobytes()
    else:
        row = plan.values(mv, record)
        validation = validate(mv, {f.name: [v] for f, v in zip(mv.features, row)}, 1)
        if not validation.valid[0]:
            raise _invalid(validation)
        row_bytes = orjson.dumps(row)
    cache = serving.cache
    cache_key = (plan.key, probabilities, row_bytes)
    if cache is not None:
        hit = cache.get(cache_key)
        if hit is not None:
            arrival.leave()
            return hit
    try:
        answer = arrival.submit((plan.key, probabilities), row, lambda rows: plan.score(mv, rows, probabilities))
    except BatchFailed:  # a batch-mate's row (or this one) made the model raise: this row alone decides
        answer = _one(serving, mv, {f.name: [record.get(f.name)] for f in mv.features}, probabilities)
    if cache is not None:
        cache.put(cache_key, answer)
    return answer


def predict_all(mv: ModelVersion, columns: dict[str, Any], n_rows: int,
                probabilities: bool) -> tuple[list, list | None]:
    """Predictions (and class probabilities) of every row of a whole-request protocol, or one error for the request.

    `columns` are JSON values (lists) or Arrow arrays, by feature name. One JSON row takes the single-prediction
    road (numeric fast path, micro-batcher, cache); more rows are validated and predicted together. The first
    invalid row, a missing feature or a row the model cannot predict refuses the whole request, naming the row.
    """
    s = services().settings
    if n_rows == 0:
        raise EmptyInput("The input has no rows; send at least one.")
    if n_rows > s.SYNC_MAX_ROWS:
        raise TooManyRows(f"{n_rows} rows is more than the {s.SYNC_MAX_ROWS} a synchronous call takes "
                          "(SYNC_MAX_ROWS); submit them as a batch job with POST /v1/jobs.",
                          details={"limit": "SYNC_MAX_ROWS", "max": s.SYNC_MAX_ROWS})
    if not mv.allows_missing:
        check_columns(mv, list(columns), None)
    probabilities = probabilities and mv.task == "classification"
    if n_rows == 1 and all(isinstance(c, list) for c in columns.values()):
        current = serving()
        with current.batcher.arrival() as arrival:
            prediction, probas = score_record(current, mv, {k: c[0] for k, c in columns.items()}, probabilities,
                                              arrival)
        return [prediction], ([list(probas.values())] if probas is not None else None)
    validation = validate(mv, columns, n_rows)
    if not validation.valid.all():
        bad = np.flatnonzero(~validation.valid)
        fields = validation.field_errors(int(bad[0]))
        more = len(bad) - 1
        others = f" ({more} more {'row is' if more == 1 else 'rows are'} invalid)" if more else ""
        raise InvalidInput(f"Row {int(bad[0])} is invalid: " + "; ".join(f["message"] for f in fields) + f"{others}.",
                           details={"row": int(bad[0]), "fields": fields})
    scored = predict(mv, validation, probabilities, s.BISECT_MAX_PREDICT_CALLS)
    if len(scored.error_positions):
        raise PredictionFailed(f"The model could not predict row {int(scored.error_positions[0])}: "
                               f"{scored.error_messages[0]}.")
    predictions = [json_value(v) for v in scored.predictions.tolist()]
    probas = scored.probabilities.tolist() if probabilities and scored.probabilities is not None else None
    return predictions, probas


def _many(mv: ModelVersion, rows: list, probabilities: bool) -> Response:
    objects = [i for i, r in enumerate(rows) if isinstance(r, dict)]
    columns = {f.name: [rows[i].get(f.name) for i in objects] for f in mv.features}
    validation = validate(mv, columns, len(objects))
    scored = predict(mv, validation, probabilities, services().settings.BISECT_MAX_PREDICT_CALLS)
    index = np.array(objects, dtype=np.int64)
    scored.positions = index[scored.positions] if len(objects) else scored.positions
    errors = [{"row": int(index[p]), "code": c, "message": m}
              for p, c, m in zip(scored.error_positions.tolist(), scored.error_codes, scored.error_messages)]
    errors += [{"row": i, "code": "malformed_row", "message": f"row {i} is not a JSON object"}
               for i, r in enumerate(rows) if not isinstance(r, dict)]
    errors.sort(key=lambda e: e["row"])
    predictions, probas = _scored_rows(mv, scored, len(rows), probabilities and mv.task == "classification")
    count_predictions(mv.name, mv.version, len(scored.positions))
    body: dict[str, Any] = {"model": {"name": mv.name, "version": mv.version}, "predictions": predictions}
    if probas is not None:
        body["probabilities"] = probas
    body["errors"] = errors
    return json_response(body)


@bp.post(PREDICT_RULE)
@operation("post", "/v1/models/{name}/predict", summary="Predict one row or a few",
           params=[path("name"), _VERSION, _PROBAS],
           body={"application/json": {"schema": {"oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}]}}},
           responses={200: schemas.PredictOne, 400: None, 404: None, 413: None, 415: None, 422: None})
def predict_post(name: str) -> Response:
    """One object answers with one prediction; an array answers with a prediction or an error per row."""
    current = serving()
    with current.batcher.arrival() as arrival:
        probabilities = parse_bool("probabilities", request.args.get("probabilities"))
        s = services().settings
        body = json_body(request, s.MAX_JSON_BYTES)
        mv = _model()
        if isinstance(body, dict):
            return _answer(mv, *score_record(current, mv, body, probabilities, arrival))
    if isinstance(body, list):
        if not body:
            raise EmptyInput("The array has no rows; send at least one object.")
        if len(body) > s.SYNC_MAX_ROWS:
            raise TooManyRows(f"{len(body)} rows is more than the {s.SYNC_MAX_ROWS} a synchronous call takes "
                              "(SYNC_MAX_ROWS); submit them as a batch job with POST /v1/jobs.",
                              details={"limit": "SYNC_MAX_ROWS", "max": s.SYNC_MAX_ROWS})
        return _many(mv, body, probabilities)
    raise InvalidInput("The body must be a JSON object (one row) or an array of objects (several rows).")


@bp.get("/v1/models/<name>/predict")
@operation("get", "/v1/models/{name}/predict", summary="Predict one row given as query parameters",
           params=[path("name"), _VERSION, _PROBAS],
           responses={200: schemas.PredictOne, 400: None, 404: None, 422: None})
def predict_get(name: str) -> Response:
    """Each feature is a query parameter; values are parsed by the feature's dtype."""
    probabilities = parse_bool("probabilities", request.args.get("probabilities"))
    mv = _model()
    columns = {f.name: pa.array([request.args[f.name]], type=pa.string())
               for f in mv.features if f.name in request.args and request.args[f.name] != ""}
    return _answer(mv, *_one(serving(), mv, columns, probabilities))
