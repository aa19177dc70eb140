"""The prediction core: validate rows column by column and predict the valid ones in one call.

Pure functions over columns (pyarrow arrays or lists of JSON values), shared by the synchronous
endpoint and the batch worker so that the two paths cannot disagree. The synchronous endpoint also has a
shorter road for one JSON record of a numeric model (`record_plan`), proved equal to this one when a model
is first used; for a linear model whose model.json sets `direct_predict`, that road may skip scikit-learn's
per-call checks (`shared.direct`), again only once proved equal.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sklearn
from sklearn.base import BaseEstimator

from shared.direct import DirectLinear, Unsupported, direct_linear
from shared.registry import Feature, ModelVersion

log = logging.getLogger(__name__)

OK, MISSING, INVALID_TYPE, INVALID_VALUE = 0, 1, 2, 3
CODE_NAMES = {MISSING: "missing_feature", INVALID_TYPE: "invalid_type", INVALID_VALUE: "invalid_value"}
NUMERIC = ("float64", "int64", "bool")
_BOOL_STRINGS = {"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0, "True": 1.0, "False": 0.0, "TRUE": 1.0, "FALSE": 0.0}
_NAN_STRINGS = frozenset({"nan", "NaN", "NAN", "-nan", "+nan"})

Column = pa.Array | pa.ChunkedArray | Sequence[Any]


@dataclass
class Validation:
    """The typed valid rows of a batch and the first problem of each invalid one."""

    n_rows: int
    valid: np.ndarray                       # bool per input row
    X: Any                                  # ndarray or DataFrame of the valid rows only
    codes: dict[str, np.ndarray]            # feature -> int8 code per input row
    values: dict[str, Column]               # the raw columns, for error messages

    def row_errors(self) -> tuple[np.ndarray, list[str], list[str]]:
        """Positions, codes and messages of the invalid rows, naming the first offending feature."""
        positions = np.flatnonzero(~self.valid)
        codes, messages = [], []
        for pos in positions:
            problems = self.field_errors(int(pos))
            codes.append(problems[0]["code"])
            extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            messages.append(problems[0]["message"] + extra)
        return positions, codes, messages

    def field_errors(self, pos: int) -> list[dict]:
        """Every offending feature of one row, as the contract's details.fields."""
        out = []
        for name, codes in self.codes.items():
            code = int(codes[pos])
            if code:
                out.append({"name": name, "code": CODE_NAMES[code],
                            "message": _describe(name, code, _value_at(self.values.get(name), pos))})
        return out


@dataclass
class Scored:
    """The outcome of scoring a batch: predictions of the rows that succeeded, errors of the rest."""

    positions: np.ndarray                   # input positions of succeeded rows, ascending
    predictions: np.ndarray
    probabilities: np.ndarray | None        # one row per succeeded row, one column per class
    error_positions: np.ndarray
    error_codes: list[str] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)
    predict_calls: int = 0


def _value_at(column: Column | None, pos: int) -> Any:
    if column is None:
        return None
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column[pos].as_py()
    return column[pos]


def _describe(name: str, code: int, value: Any) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if code == MISSING:
        return f"feature {name!r} is missing"
    if code == INVALID_TYPE:
        return f"feature {name!r} has a value of the wrong type: {shown}"
    return f"feature {name!r} has an invalid value: {shown}"


# -- columns from JSON values (synchronous requests, JSON rows) ---------------------------------------

def _coerce_list(values: Sequence[Any], feature: Feature, allows_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    n = len(values)
    codes = np.zeros(n, dtype=np.int8)
    if feature.dtype in NUMERIC:
        out = np.empty(n, dtype=np.float64)
        for i, v in enumerate(values):
            if v is None:
                out[i] = math.nan
                if not allows_missing:
                    codes[i] = MISSING
            elif isinstance(v, bool):
                if feature.dtype == "bool":
                    out[i] = float(v)
                else:
                    out[i], codes[i] = math.nan, INVALID_TYPE
            elif isinstance(v, (int, float)):
                f = float(v)
                out[i] = f
                if feature.dtype == "bool" and f not in (0.0, 1.0):
                    codes[i] = INVALID_VALUE
                elif math.isinf(f) or (math.isnan(f) and not allows_missing):
                    codes[i] = INVALID_VALUE
                elif feature.dtype == "int64" and not f.is_integer():
                    codes[i] = INVALID_TYPE
            else:
                out[i], codes[i] = math.nan, INVALID_TYPE
        return out, codes
    out = np.empty(n, dtype=object)
    for i, v in enumerate(values):
        if v is None:
            out[i] = None
            if not allows_missing:
                codes[i] = MISSING
        elif isinstance(v, str):
            out[i] = v
            if feature.categories is not None and v not in feature.categories:
                codes[i] = INVALID_VALUE
        else:
            out[i], codes[i] = None, INVALID_TYPE
    return out, codes


# -- columns from Arrow (CSV, JSON Lines, Parquet) ----------------------------------------------------

def _numeric_from_strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse text to float64; returns values and a mask of cells that are not numbers."""
    try:
        parsed = pc.cast(arr, pa.float64())
        return parsed.to_numpy(zero_copy_only=False), np.zeros(len(arr), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        series = pd.Series(arr.to_numpy(zero_copy_only=False), dtype=object)
        stripped = series.str.strip()
        values = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(values) & series.notna().to_numpy() & ~stripped.isin(_NAN_STRINGS).to_numpy()
        return values, bad


def _coerce_arrow(arr: pa.Array, feature: Feature, allows_missing: bool, json_mixed: bool) -> tuple[Any, np.ndarray]:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if json_mixed:
        # A column of JSON-encoded cells (mixed JSON types): decode and judge each value as JSON.
        decoded = [None if v is None else orjson.loads(v) for v in arr.to_pylist()]
        return _coerce_list(decoded, feature, allows_missing)
    n = len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(n, dtype=bool)
    codes = np.zeros(n, dtype=np.int8)
    t = arr.type
    if feature.dtype in NUMERIC:
        bad = np.zeros(n, dtype=bool)
        if pa.types.is_null(t):
            values = np.full(n, np.nan)
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        elif pa.types.is_boolean(t):
            values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
            if feature.dtype != "bool":
                bad = ~null
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            if feature.dtype == "bool":
                mapped = pd.Series(arr.to_numpy(zero_copy_only=False), dtype=object).map(_BOOL_STRINGS)
                values = mapped.to_numpy(dtype=np.float64, na_value=np.nan)
                bad = np.isnan(values) & ~null
            else:
                values, bad = _numeric_from_strings(arr)
        else:
            values, bad = np.full(n, np.nan), ~null
        values = np.array(values, dtype=np.float64, copy=True)
        with np.errstate(invalid="ignore"):
            nan = np.isnan(values) & ~null & ~bad
            codes[np.isinf(values)] = INVALID_VALUE
            if not allows_missing:
                codes[nan] = INVALID_VALUE
            if feature.dtype == "int64":
                codes[(codes == OK) & ~np.isnan(values) & (np.floor(values) != values)] = INVALID_TYPE
            if feature.dtype == "bool":
                codes[(codes == OK) & ~np.isnan(values) & (values != 0) & (values != 1)] = INVALID_VALUE
        codes[bad] = INVALID_TYPE
        if not allows_missing:
            codes[null] = MISSING
        values[codes != OK] = np.nan
        return values, codes
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t) or pa.types.is_null(t):
        values = arr.cast(pa.string()).to_numpy(zero_copy_only=False) if not pa.types.is_null(t) else np.full(n, None, dtype=object)
        if feature.categories is not None:
            known = pc.is_in(arr.cast(pa.string()), value_set=pa.array(feature.categories)).to_numpy(zero_copy_only=False)
            codes[~known & ~null] = INVALID_VALUE
    else:
        values = np.full(n, None, dtype=object)
        codes[~null] = INVALID_TYPE
    if not allows_missing:
        codes[null] = MISSING
    return values, codes


def validate(mv: ModelVersion, columns: Mapping[str, Column], n_rows: int, json_mixed: frozenset[str] = frozenset()) -> Validation:
    """Type every feature column and mark the rows that cannot be predicted, without a per-row loop for Arrow input."""
    typed: dict[str, Any] = {}
    codes: dict[str, np.ndarray] = {}
    for feature in mv.features:
        col = columns.get(feature.name)
        if col is None:
            code = OK if mv.allows_missing else MISSING
            codes[feature.name] = np.full(n_rows, code, dtype=np.int8)
            typed[feature.name] = np.full(n_rows, np.nan if feature.dtype in NUMERIC else None,
                                          dtype=np.float64 if feature.dtype in NUMERIC else object)
            continue
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            typed[feature.name], codes[feature.name] = _coerce_arrow(col, feature, mv.allows_missing, feature.name in json_mixed)
        else:
            typed[feature.name], codes[feature.name] = _coerce_list(col, feature, mv.allows_missing)
    valid = np.ones(n_rows, dtype=bool)
    for c in codes.values():
        valid &= c == OK
    all_valid = bool(valid.all())
    if mv.takes_frame:
        data = {f.name: (typed[f.name] if all_valid else typed[f.name][valid]) for f in mv.features}
        X = pd.DataFrame(data, columns=[f.name for f in mv.features])
        for f in mv.features:
            if f.dtype == "category":
                X[f.name] = X[f.name].astype("category")
    else:
        X = np.column_stack([typed[f.name] for f in mv.features]) if mv.features else np.empty((n_rows, 0))
        if not all_valid:
            X = X[valid]
    return Validation(n_rows=n_rows, valid=valid, X=X, codes=codes, values=dict(columns))


def _take(X: Any, idx: np.ndarray | slice) -> Any:
    return X.iloc[idx] if isinstance(X, pd.DataFrame) else X[idx]


def _call(mv: ModelVersion, X: Any, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore")  # feature-name and convergence chatter is not the caller's concern
        # predict gets its own copy when predict_proba follows: a step such as StandardScaler(copy=False) scales
        # its input in place, and predict_proba must see the rows as they came.
        preds = np.asarray(mv.estimator.predict(X.copy() if probabilities else X))
        probas = np.asarray(mv.estimator.predict_proba(X), dtype=np.float64) if probabilities else None
    if len(preds) != len(X):
        raise ValueError(f"the model returned {len(preds)} predictions for {len(X)} rows")
    return preds, probas


def predict(mv: ModelVersion, validation: Validation, probabilities: bool = False, max_calls: int = 200) -> Scored:
    """Predict the valid rows in one call; if the model raises, isolate the failing rows by bisection."""
    probabilities = probabilities and mv.task == "classification" and hasattr(mv.estimator, "predict_proba")
    valid_pos = np.flatnonzero(validation.valid)
    err_pos, err_codes, err_msgs = validation.row_errors()
    errors = dict(zip(err_pos.tolist(), zip(err_codes, err_msgs)))
    n = len(valid_pos)
    calls = 0
    ok_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    failed: dict[int, str] = {}
    # Each segment is a range of indexes into the valid rows; a failing one is split in two.
    stack = [(0, n)] if n else []
    while stack:
        lo, hi = stack.pop()
        if calls >= max_calls:
            for i in range(lo, hi):
                failed[i] = f"the model failed on a part of this chunk and isolation stopped after {max_calls} predict calls"
            continue
        calls += 1
        try:
            preds, probas = _call(mv, _take(validation.X, slice(lo, hi)), probabilities)
        except Exception as e:  # noqa: BLE001 - any model error is a row error, never a crash
            if hi - lo == 1:
                failed[lo] = f"the model raised {type(e).__name__}: {str(e)[:200]}"
            else:
                mid = (lo + hi) // 2
                stack.extend([(mid, hi), (lo, mid)])
            continue
        ok_parts.append((np.arange(lo, hi), preds, probas))
    ok_parts.sort(key=lambda p: p[0][0] if len(p[0]) else 0)
    if ok_parts:
        idx = np.concatenate([p[0] for p in ok_parts])
        preds = np.concatenate([p[1] for p in ok_parts])
        probas = np.concatenate([p[2] for p in ok_parts]) if probabilities else None
    else:
        idx, preds = np.empty(0, dtype=np.int64), np.empty(0)
        probas = np.empty((0, len(mv.classes or []))) if probabilities else None
    for i, msg in failed.items():
        errors[int(valid_pos[i])] = ("prediction_failed", msg)
    order = sorted(errors)
    return Scored(
        positions=valid_pos[idx],
        predictions=preds,
        probabilities=probas,
        error_positions=np.array(order, dtype=np.int64),
        error_codes=[errors[p][0] for p in order],
        error_messages=[errors[p][1] for p in order],
        predict_calls=calls,
    )


def json_value(v: Any) -> Any:
    """A prediction as plain JSON (numpy scalars become Python numbers, NaN becomes null)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -- one JSON record without a DataFrame (the synchronous hot path) ------------------------------------

_FLOAT, _INT, _BOOL = 0, 1, 2
_KINDS = {"float64": _FLOAT, "int64": _INT, "bool": _BOOL}
_INF = math.inf
_PROBE_ROWS = 64
_CHECK_ROWS = 10_000


@dataclass(eq=False)
class NumericRows:
    """A numeric model's JSON records as float64 rows in its feature order, predicted as an array.

    `estimator` is the model itself, or (for a model fitted on a DataFrame) a twin whose steps no longer
    remember feature names, so that an array draws no feature-name warning; the twin shares every fitted
    array with the model. Rows are stacked in the memory order the DataFrame path hands over ("F", as
    pandas does, or "C", as `validate` stacks plain arrays), so a batch gives the same bits as that path.
    """

    estimator: Any
    features: tuple[tuple[str, int], ...]
    allows_missing: bool
    order: str
    direct: DirectLinear | None = None      # set once proved equal to `estimator` (model.json direct_predict)

    def row(self, record: Mapping[str, Any]) -> list[float] | None:
        """The record's values, or None when one is not plainly valid (then `validate` says exactly why)."""
        out = []
        append = out.append
        for name, kind in self.features:
            v = record.get(name)
            t = type(v)
            if t is float:
                if not -_INF < v < _INF:
                    return None  # NaN or infinity
                if (kind == _INT and not v.is_integer()) or (kind == _BOOL and v not in (0.0, 1.0)):
                    return None  # a fraction for an int64, another number for a bool
                append(v)
            elif t is int:
                if kind == _BOOL and v not in (0, 1):
                    return None
                try:
                    append(float(v))
                except OverflowError:
                    return None
            elif v is None and self.allows_missing:
                append(math.nan)
            elif t is bool and kind == _BOOL:
                append(1.0 if v else 0.0)
            else:
                return None
        return out

    def stack(self, rows: list[list[float]]) -> np.ndarray:
        return np.array(rows, dtype=np.float64, order=self.order)

    def call(self, X: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """predict (and predict_proba) on an array; warnings are not silenced here, the probe found none."""
        if self.direct is not None:
            return self.direct.call(X, probabilities)
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            preds = np.asarray(self.estimator.predict(X.copy() if probabilities else X))  # as in _call
            probas = np.asarray(self.estimator.predict_proba(X), dtype=np.float64) if probabilities else None
        if len(preds) != len(X):
            raise ValueError(f"the model returned {len(preds)} predictions for {len(X)} rows")
        return preds, probas


@dataclass(eq=False)
class RecordPlan:
    """How the synchronous endpoint scores one JSON record of a model version."""

    key: str                        # sha256 of the model file and of its feature list: equal keys predict alike
    probabilities: bool             # the model is a classifier with predict_proba
    labels: list[str]               # str(class), the keys of a probabilities object
    numeric: NumericRows | None     # None: the record goes through `validate` and a DataFrame

    def values(self, mv: ModelVersion, record: Mapping[str, Any]) -> list[Any]:
        return [record.get(f.name) for f in mv.features]

    def score(self, mv: ModelVersion, rows: list[Any], probabilities: bool) -> list[tuple[Any, dict | None]]:
        """(prediction, probabilities) of each valid row: `NumericRows.row`s, or `values` lists of valid records."""
        probabilities = probabilities and self.probabilities
        if self.numeric is not None:
            preds, probas = self.numeric.call(self.numeric.stack(rows), probabilities)
        else:
            columns = {f.name: [r[i] for r in rows] for i, f in enumerate(mv.features)}
            validation = validate(mv, columns, len(rows))
            if not validation.valid.all():
                raise ValueError("a row of the batch is not valid")
            preds, probas = _call(mv, validation.X, probabilities)
        labels = self.labels
        answers = [json_value(v) for v in preds.tolist()]
        if probas is None:
            return [(a, None) for a in answers]
        return [(a, dict(zip(labels, p))) for a, p in zip(answers, probas.tolist())]


_plans: dict[int, tuple[weakref.ref, RecordPlan]] = {}
_plans_lock = threading.Lock()


def record_plan(mv: ModelVersion) -> RecordPlan:
    """The plan of a loaded model version, made (and its array path proved) on first use."""
    entry = _plans.get(id(mv))
    if entry is not None and entry[0]() is mv:
        return entry[1]
    with _plans_lock:
        entry = _plans.get(id(mv))
        if entry is not None and entry[0]() is mv:
            return entry[1]
        key = id(mv)
        plan = _make_plan(mv)
        # Forget the plan with its model version (a redeployed file is a new ModelVersion).
        _plans[key] = (weakref.ref(mv, lambda _, key=key: _plans.pop(key, None)), plan)
        return plan


def _make_plan(mv: ModelVersion) -> RecordPlan:
    features = orjson.dumps([[f.name, f.dtype, f.categories] for f in mv.features])
    key = f"{mv.sha256}:{hashlib.sha256(features).hexdigest()[:16]}"
    probabilities = mv.task == "classification" and hasattr(mv.estimator, "predict_proba")
    labels = [str(c) for c in mv.classes or []]
    numeric = _numeric_rows(mv, probabilities)
    if mv.direct_predict:
        if numeric is None:
            _keep_predict(mv, "its features are not all numeric or it does not take a plain array")
        else:
            numeric.direct = _proved_direct(mv, numeric, probabilities)
    return RecordPlan(key=key, probabilities=probabilities, labels=labels, numeric=numeric)


def _keep_predict(mv: ModelVersion, why: str) -> None:
    log.warning("model %s/%s: direct_predict is set in model.json but %s; it keeps scikit-learn's predict",
                mv.name, mv.version, why)


def _proved_direct(mv: ModelVersion, rows: NumericRows, probabilities: bool) -> DirectLinear | None:
    """The direct path of a linear model, if it gives predict's exact bits on the probe and check rows."""
    try:
        direct = direct_linear(mv.estimator)
    except Unsupported as e:
        _keep_predict(mv, str(e))
        return None
    X = np.vstack([_probe_rows(mv), _check_rows(mv, _CHECK_ROWS)]).tolist()
    try:
        expected = rows.call(rows.stack(X), probabilities)
        got = direct.call(rows.stack(X), probabilities)
    except Exception as e:  # noqa: BLE001 - a direct path that cannot take the check rows is not used
        _keep_predict(mv, f"its direct path raised {type(e).__name__}: {str(e)[:200]}")
        return None
    for what, a, b in zip(("predict", "predict_proba"), expected, got):
        if not _same(a, b):
            _keep_predict(mv, f"its direct path differs from {what} on check rows")
            return None
    return direct


def _numeric_rows(mv: ModelVersion, probabilities: bool) -> NumericRows | None:
    """The array path of a numeric model, if it gives exactly what the DataFrame path gives on probe rows."""
    if not mv.features or not mv.numeric_only:
        return None
    est = mv.estimator
    names = getattr(est, "feature_names_in_", None)
    if names is not None and [str(n) for n in names] != [f.name for f in mv.features]:
        return None  # model.json orders the features differently: keep the path that names them
    X = _probe_rows(mv)
    columns = {f.name: X[:, i].tolist() for i, f in enumerate(mv.features)}
    try:
        with warnings.catch_warnings(record=True) as seen:  # once per model version, not per request
            warnings.simplefilter("always")
            rows = NumericRows(
                estimator=without_feature_names(est) if names is not None else est,
                features=tuple((f.name, _KINDS[f.dtype]) for f in mv.features),
                allows_missing=mv.allows_missing,
                order="F" if mv.takes_frame else "C",
            )
            expected = _call(mv, validate(mv, columns, len(X)).X, probabilities)
            del seen[:]
            got = rows.call(rows.stack(X.tolist()), probabilities)
    except Exception:  # noqa: BLE001 - a model that cannot take the probe keeps the DataFrame path
        return None
    if seen or not all(_same(a, b) for a, b in zip(expected, got)):
        return None
    return rows


def _probe_rows(mv: ModelVersion) -> np.ndarray:
    X = _typed(mv, np.random.default_rng(0).standard_normal((_PROBE_ROWS, len(mv.features))))
    X[0] = 0.0
    if mv.allows_missing:
        X[1:_PROBE_ROWS:7, ::2] = np.nan
    return X


def _check_rows(mv: ModelVersion, n: int) -> np.ndarray:
    """Rows of every scale from 1e-4 to 1e4, some with missing values when the model allows them."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, len(mv.features))) * 10.0 ** rng.uniform(-4, 4, (n, 1))
    X = _typed(mv, X)
    if mv.allows_missing:
        X[::11, ::3] = np.nan
    return X


def _typed(mv: ModelVersion, X: np.ndarray) -> np.ndarray:
    for i, f in enumerate(mv.features):
        if f.dtype == "int64":
            X[:, i] = np.round(X[:, i] * 3)
        elif f.dtype == "bool":
            X[:, i] = X[:, i] > 0
    return X


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def without_feature_names(est: Any, _memo: dict[int, Any] | None = None) -> Any:
    """A shallow twin of a fitted estimator in which no step remembers feature names (fitted arrays are shared)."""
    memo = {} if _memo is None else _memo
    if id(est) in memo:
        return memo[id(est)]
    if isinstance(est, (list, tuple)):
        items = [without_feature_names(x, memo) for x in est]
        same = all(a is b for a, b in zip(items, est))
        out = est if same else (type(est)(items) if isinstance(est, list) else tuple(items))
    elif isinstance(est, BaseEstimator):
        changed = {k: without_feature_names(v, memo) for k, v in vars(est).items()
                   if isinstance(v, (BaseEstimator, list, tuple))}
        changed = {k: v for k, v in changed.items() if v is not vars(est)[k]}
        if changed or "feature_names_in_" in vars(est):
            out = object.__new__(type(est))  # not copy.copy: no __setstate__, no version check
            vars(out).update(vars(est), **changed)
            vars(out).pop("feature_names_in_", None)
        else:
            out = est
    else:
        out = est
    memo[id(est)] = out
    return out
