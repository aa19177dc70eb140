"""The model registry: `<MODELS_DIR>/<name>/<version>/model.joblib`, loaded once per process."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from natsort import natsorted
from sklearn.base import is_classifier

from shared.errors import ModelNotFound

log = logging.getLogger(__name__)

MODEL_FILE = "model.joblib"
META_FILE = "model.json"
DTYPES = ("float64", "int64", "bool", "string", "category")


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str = "float64"
    categories: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}


@dataclass
class ModelVersion:
    """One loaded model file and what is known about its inputs and outputs."""

    name: str
    version: str
    path: Path
    sha256: str
    estimator: Any
    features: tuple[Feature, ...]
    allows_missing: bool
    task: str
    classes: list | None
    direct_predict: bool = False            # model.json opts in to the direct linear path of single predictions
    loaded_at: float = field(default_factory=time.time)

    @property
    def numeric_only(self) -> bool:
        return all(f.dtype in ("float64", "int64", "bool") for f in self.features)

    @property
    def takes_frame(self) -> bool:
        """Models fitted on a DataFrame want one back; others want a plain array."""
        return hasattr(self.estimator, "feature_names_in_") or not self.numeric_only

    def describe(self, versions: list[str]) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "versions": versions,
            "sha256": self.sha256,
            "task": self.task,
            "features": [f.to_dict() for f in self.features],
            "classes": self.classes,
            "allows_missing": self.allows_missing,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _python_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _parse_meta(path: Path) -> dict:
    meta = json.loads(path.read_text())
    features = []
    for f in meta.get("features", []):
        dtype = f.get("dtype", "float64")
        if dtype not in DTYPES:
            raise ValueError(f"feature {f.get('name')!r} has dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        cats = f.get("categories")
        features.append(Feature(str(f["name"]), dtype, tuple(map(str, cats)) if cats else None))
    meta["features"] = tuple(features)
    direct = meta.get("direct_predict", False)
    if not isinstance(direct, bool):
        raise ValueError(f"{path}: field 'direct_predict' must be true or false, not {direct!r}")
    return meta


def _probe_allows_missing(estimator: Any, features: tuple[Feature, ...], takes_frame: bool) -> bool:
    """Predict one all-missing row: estimator tags are wrong for some pipelines, behaviour is not."""
    try:
        if takes_frame:
            row = pd.DataFrame({f.name: [np.nan if f.dtype != "string" and f.dtype != "category" else None]
                                for f in features})
        else:
            row = np.full((1, len(features)), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimator.predict(row)
        return True
    except Exception:  # noqa: BLE001 - any failure means missing values are not accepted
        return False


def load_version(name: str, version: str, directory: Path) -> ModelVersion:
    """Load one model version from disk, checking its recorded sha256 when it has a model.json."""
    path = directory / MODEL_FILE
    sha = file_sha256(path)
    meta = _parse_meta(directory / META_FILE) if (directory / META_FILE).exists() else {}
    if meta.get("sha256") and meta["sha256"] != sha:
        raise ValueError(f"{name}/{version}: model file sha256 {sha} does not match {meta['sha256']} in {META_FILE}")
    estimator = joblib.load(path)
    features = meta.get("features")
    if not features:
        names = getattr(estimator, "feature_names_in_", None)
        if names is None:
            raise ValueError(f"{name}/{version}: the model has no feature_names_in_; add a {META_FILE} listing its features")
        features = tuple(Feature(str(n)) for n in names)
    task = meta.get("task") or ("classification" if is_classifier(estimator) else "regression")
    classes = getattr(estimator, "classes_", None) if task == "classification" else None
    mv = ModelVersion(
        name=name, version=version, path=path, sha256=sha, estimator=estimator, features=features,
        allows_missing=False, task=task,
        classes=[_python_value(c) for c in classes] if classes is not None else None,
    )
    if "allows_missing" in meta:
        mv.allows_missing = bool(meta["allows_missing"])
    else:
        mv.allows_missing = _probe_allows_missing(estimator, features, mv.takes_frame)
    mv.direct_predict = meta.get("direct_predict", False)
    return mv


class Registry:
    """Finds model versions on disk and keeps each loaded one for the life of the process."""

    def __init__(self, models_dir: str | Path, rescan_seconds: float = 2.0):
        self.root = Path(models_dir)
        self.rescan_seconds = rescan_seconds
        self._lock = threading.RLock()
        self._versions: dict[str, list[str]] = {}
        self._scanned_at = 0.0
        self._loaded: dict[tuple[str, str], tuple[tuple[float, int], ModelVersion]] = {}
        self._refused: dict[tuple[str, str], tuple[float, int]] = {}
        self._checked: dict[tuple[str, str], float] = {}  # when each loaded file's stamp was last read

    def scan(self) -> dict[str, list[str]]:
        """Model names and their versions in natural order, read from disk now."""
        found: dict[str, list[str]] = {}
        if self.root.is_dir():
            for model_dir in self.root.iterdir():
                if not model_dir.is_dir() or model_dir.name.startswith("."):
                    continue
                versions = [v.name for v in model_dir.iterdir() if (v / MODEL_FILE).is_file()]
                if versions:
                    found[model_dir.name] = natsorted(versions)
        with self._lock:
            self._versions = found
            self._scanned_at = time.monotonic()
        return found

    def versions(self, refresh: bool = False) -> dict[str, list[str]]:
        if refresh or time.monotonic() - self._scanned_at > self.rescan_seconds:
            return self.scan()
        return self._versions

    def names(self) -> list[str]:
        return natsorted(self.versions())

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The loaded model; the newest version when none is named. Raises ModelNotFound."""
        versions = self.versions().get(name)
        if not versions or (version is not None and version not in versions):
            versions = self.scan().get(name)  # a version deployed a moment ago
        if not versions:
            raise ModelNotFound(f"No model named {name!r}; see GET /v1/models for the deployed models.")
        if version is None:
            for candidate in reversed(versions):
                mv = self._load(name, candidate)
                if mv is not None:
                    return mv
            raise ModelNotFound(f"Model {name!r} has no version that can be loaded.")
        if version not in versions:
            raise ModelNotFound(f"Model {name!r} has no version {version!r}; it has {', '.join(versions)}.")
        mv = self._load(name, version)
        if mv is None:
            raise ModelNotFound(f"Model {name!r} version {version!r} could not be loaded; see the service log.")
        return mv

    def load_all(self) -> list[ModelVersion]:
        """Load the newest version of every model (at start, so the first request pays nothing)."""
        loaded = []
        for name in self.scan():
            try:
                loaded.append(self.get(name))
            except ModelNotFound as e:
                log.error("%s", e)
        return loaded

    def describe(self, mv: ModelVersion) -> dict:
        return mv.describe(self.versions().get(mv.name, [mv.version]))

    def _load(self, name: str, version: str) -> ModelVersion | None:
        key = (name, version)
        cached = self._loaded.get(key)
        if cached and time.monotonic() - self._checked.get(key, -math.inf) < self.rescan_seconds:
            return cached[1]  # its file was looked at lately: a file replaced in place is seen within rescan_seconds
        directory = self.root / name / version
        try:
            st = (directory / MODEL_FILE).stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime, st.st_size)
        if cached and cached[0] == stamp:
            self._checked[key] = time.monotonic()
            return cached[1]
        with self._lock:
            cached = self._loaded.get(key)
            if cached and cached[0] == stamp:
                return cached[1]
            if self._refused.get(key) == stamp:
                return None
            try:
                mv = load_version(name, version, directory)
            except Exception as e:  # noqa: BLE001 - a bad file must not take the service down
                log.error("refusing model %s/%s: %s", name, version, e)
                self._refused[key] = stamp
                return None
            log.info("loaded model %s/%s sha256=%s", name, version, mv.sha256[:12])
            self._loaded[key] = (stamp, mv)
            self._checked[key] = time.monotonic()
            return mv
