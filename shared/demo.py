"""Demo models trained on data that ships with scikit-learn, so a fresh install has something to serve."""
from __future__ import annotations

import json
from pathlib import Path

import joblib
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.registry import MODEL_FILE, file_sha256

DEMO_VERSION = "v1"


def _install(estimator, models_dir: Path, name: str, version: str) -> Path:
    target = models_dir / name / version
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / (MODEL_FILE + ".tmp")
    joblib.dump(estimator, tmp)
    tmp.replace(target / MODEL_FILE)  # a scanning process never sees half a file
    return target / MODEL_FILE


def install_demo_models(models_dir: str | Path, version: str = DEMO_VERSION) -> list[Path]:
    """Train `breast_cancer` (a classifier) and `diabetes` (a regressor) and install them under models_dir."""
    root = Path(models_dir)
    cancer = load_breast_cancer(as_frame=True)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    classifier.fit(cancer.data, cancer.target_names[cancer.target])
    diabetes = load_diabetes(as_frame=True)
    regressor = HistGradientBoostingRegressor(max_iter=200, random_state=0)
    regressor.fit(diabetes.data, diabetes.target)
    return [_install(classifier, root, "breast_cancer", version), _install(regressor, root, "diabetes", version)]


def record_sha256(model_path: str | Path) -> dict:
    """Write (or update) model.json beside a model file with the file's sha256, so a changed file is refused."""
    path = Path(model_path)
    meta_path = path.parent / "model.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta["sha256"] = file_sha256(path)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
