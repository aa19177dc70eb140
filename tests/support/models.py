"""Test models, importable by worker processes (the tests put the repository root on their path)."""
from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

SENTINEL = 666.0
FEATURES = [f"f{i}" for i in range(5)]


def reject_sentinel(X):
    """Raise when any value equals SENTINEL: a model that fails on particular rows only."""
    values = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X)
    if (values == SENTINEL).any():
        raise ValueError("sentinel value seen")
    return X


def training_frame(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)


def fussy_classifier():
    """A classifier fitted on a DataFrame with string labels, which raises on SENTINEL rows."""
    X = training_frame()
    y = np.where(X["f0"] + X["f1"] > 0, "yes", "no")
    return make_pipeline(FunctionTransformer(reject_sentinel), StandardScaler(), LogisticRegression()).fit(X, y)


def fussy_regressor():
    X = training_frame(seed=1)
    y = X["f0"] * 3.0 - X["f2"] + 0.5
    return make_pipeline(FunctionTransformer(reject_sentinel), LinearRegression()).fit(X, y)


def install(models_dir: str | Path, name: str, estimator, version: str = "v1") -> Path:
    target = Path(models_dir) / name / version
    target.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, target / "model.joblib")
    return target / "model.joblib"


def install_test_models(models_dir: str | Path) -> None:
    install(models_dir, "fussy", fussy_classifier())
    install(models_dir, "fussy_reg", fussy_regressor())


# -- models for fault-injection tests ---------------------------------------------------------------

POISON = 999.0
PREDICT_SLEEP_ENV = "PREDQ_TEST_PREDICT_SLEEP"


def slow_step(X):
    """Sleep PREDQ_TEST_PREDICT_SLEEP seconds (read at every call, default 0) per call: chunks take a set time."""
    import os
    import time

    seconds = float(os.environ.get(PREDICT_SLEEP_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)
    return X


def kill_on_poison(X):
    """SIGKILL the calling process when any value equals POISON: a chunk that kills its worker every time."""
    import os
    import signal

    values = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X)
    if (values == POISON).any():
        os.kill(os.getpid(), signal.SIGKILL)
    return X


def slow_regressor():
    """A regressor on FEATURES whose every predict call first sleeps PREDQ_TEST_PREDICT_SLEEP seconds."""
    X = training_frame(seed=2)
    y = X["f0"] * 2.0 + X["f1"] - X["f4"] * 0.5 + 1.0
    return make_pipeline(FunctionTransformer(slow_step), LinearRegression()).fit(X, y)


def poison_regressor():
    """A regressor on FEATURES that SIGKILLs its own process when a row holds POISON."""
    X = training_frame(seed=3)
    y = X["f0"] - X["f3"] * 2.0 + 0.25
    return make_pipeline(FunctionTransformer(kill_on_poison), FunctionTransformer(slow_step),
                         LinearRegression()).fit(X, y)


def _write_meta(model_file: Path) -> None:
    """A model.json naming the features, so loading never calls predict."""
    import json

    meta = {"features": [{"name": f, "dtype": "float64"} for f in FEATURES], "allows_missing": False}
    (model_file.parent / "model.json").write_text(json.dumps(meta))


def install_fault_models(models_dir: str | Path) -> None:
    """Install `slow_reg` and `poison_reg` (see above) into models_dir."""
    _write_meta(install(models_dir, "slow_reg", slow_regressor()))
    _write_meta(install(models_dir, "poison_reg", poison_regressor()))
