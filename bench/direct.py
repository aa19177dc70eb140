"""Per-call time of a linear model's direct path against scikit-learn's predict, for 1, 8 and 64 rows.

    .venv/bin/python bench/direct.py [--repeat 2000] [--rounds 7]

Models: Pipeline(StandardScaler, LogisticRegression) binary and 3-class, and Pipeline(StandardScaler, Ridge), on
20 gaussian float features. Both paths take the same float64 array (what `NumericRows.stack` makes):
`predict` (and `predict_proba` for classifiers) under `config_context(assume_finite=True,
skip_parameter_validation=True)`, as the synchronous endpoint calls them, against `DirectLinear.call`. Each cell
is the best of `--rounds` rounds of `--repeat` calls, in microseconds per call; the direct answers are checked
equal to predict's first. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from shared.direct import direct_linear  # noqa: E402

N_FEATURES = 20


def models() -> dict:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20_000, N_FEATURES))
    return {
        "scaler + logreg, binary": make_pipeline(StandardScaler(), LogisticRegression()).fit(X, X[:, 0] + X[:, 1] > 0),
        "scaler + logreg, 3 classes": make_pipeline(StandardScaler(), LogisticRegression()).fit(
            X, np.digitize(X[:, 0], [-0.5, 0.5])),
        "scaler + ridge": make_pipeline(StandardScaler(), Ridge()).fit(X, X[:, 0] * 3 - X[:, 2]),
    }


def per_call(fn, X: np.ndarray, repeat: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            fn(X)
        best = min(best, time.perf_counter() - started)
    return best / repeat * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    print("| model | rows | predict (us) | direct (us) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, est in models().items():
        direct = direct_linear(est)
        proba = hasattr(est, "predict_proba")

        def sklearn_call(X, est=est, proba=proba):
            with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
                return est.predict(X), est.predict_proba(X) if proba else None

        def direct_call(X, direct=direct, proba=proba):
            return direct.call(X, proba)

        for n in (1, 8, 64):
            X = rng.standard_normal((n, N_FEATURES))
            for a, b in zip(sklearn_call(X), direct_call(X)):
                assert (a is None and b is None) or np.array_equal(a, b), "the direct path differs from predict"
            slow = per_call(sklearn_call, X, args.repeat, args.rounds)
            fast = per_call(direct_call, X, args.repeat, args.rounds)
            print(f"| {name} | {n} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
