"""Models for the MLflow and Open Inference Protocol tests: the shapes the two protocols' documentation uses."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from tests.support.models import install

IRIS_FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def iris_classifier():
    """KServe's scikit-learn example: iris, integer classes 0-2, fitted on a DataFrame."""
    iris = load_iris(as_frame=True)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(iris.data, iris.target)


def abc_classifier():
    """MLflow's documentation examples name three columns a, b, c."""
    rng = np.random.default_rng(5)
    X = pd.DataFrame(rng.normal(size=(300, 3)) * 3, columns=["a", "b", "c"])
    return LogisticRegression().fit(X, (X["a"] + X["b"] - X["c"] > 0).astype(int))


MIXED_META = {"features": [{"name": "n", "dtype": "int64"}, {"name": "flag", "dtype": "bool"},
                           {"name": "color", "dtype": "category", "categories": ["red", "blue"]}],
              "allows_missing": False}


def mixed_classifier():
    """An int64, a bool and a category feature (declared in model.json): INT64, BOOL and BYTES tensors."""
    X = pd.DataFrame({"n": np.arange(40) % 7, "flag": np.arange(40) % 2 == 0,
                      "color": pd.Categorical(["red", "blue"] * 20)})
    y = np.where((X["n"] > 3) ^ (X["color"] == "red"), "hi", "lo")
    encode = ColumnTransformer([("color", OneHotEncoder(), ["color"])], remainder="passthrough")
    return make_pipeline(encode, LogisticRegression()).fit(X, y)


def install_compat_models(models_dir: str | Path) -> None:
    """Install `iris`, `abc` and `mixed` (see above) into models_dir."""
    install(models_dir, "iris", iris_classifier())
    install(models_dir, "abc", abc_classifier())
    path = install(models_dir, "mixed", mixed_classifier())
    (path.parent / "model.json").write_text(json.dumps(MIXED_META))
