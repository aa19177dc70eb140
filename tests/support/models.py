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
