"""The direct path of a linear model: scikit-learn's own arithmetic on a float64 array, without its per-call checks.

Each step repeats, in the same order of float operations, what the installed scikit-learn does
(`StandardScaler.transform`, `LinearModel._decision_function`, `LinearClassifierMixin.decision_function`,
`predict`, `_predict_proba_lr` and `softmax`), on the estimator's own fitted arrays, so its answers are the
same bits. The prediction core uses it for a model only after comparing it with `predict` on sample rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse, special
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

CLASSIFIERS = (LogisticRegression, LinearSVC)
REGRESSORS = (LinearRegression, Ridge)
_SUPPORTED = "a Pipeline of StandardScaler steps ending in LogisticRegression, LinearSVC, LinearRegression or Ridge"


class Unsupported(ValueError):
    """The estimator is not one the direct path computes exactly."""


@dataclass(frozen=True, eq=False)
class DirectLinear:
    """A fitted linear model (after standard scalers) as arrays; `call` answers as predict and predict_proba do."""

    scalers: tuple[tuple[np.ndarray | None, np.ndarray | None], ...]  # (mean or None, scale or None) per step
    coef: np.ndarray                # coef_.T when coef_ is 2-D (a view, as decision_function multiplies by)
    intercept: Any
    classes: np.ndarray | None      # None for a regressor
    probabilities: str | None       # "expit" (binary), "softmax" (multinomial) or None

    def decision(self, X: np.ndarray) -> np.ndarray:
        if self.scalers:
            X = np.array(X, copy=True)  # what check_array's copy does: same values, same memory order
            for mean, scale in self.scalers:
                if mean is not None:
                    X -= mean
                if scale is not None:
                    X /= scale
        scores = X @ self.coef + self.intercept
        if self.classes is not None and scores.ndim > 1 and scores.shape[1] == 1:
            scores = scores.reshape(-1)
        return scores

    def call(self, X: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        scores = self.decision(X)
        if self.classes is None:
            return scores, None
        if scores.ndim == 1:
            indices = (scores > 0).astype(np.int64)
        else:
            indices = np.argmax(scores, axis=1)
        preds = self.classes.take(indices, axis=0)
        if not probabilities or self.probabilities is None:
            return preds, None
        if self.probabilities == "expit":
            prob = special.expit(scores, out=scores)
            return preds, np.stack([1 - prob, prob], axis=1)
        scores -= np.max(scores, axis=1).reshape(-1, 1)
        np.exp(scores, out=scores)
        scores /= np.sum(scores, axis=1).reshape(-1, 1)
        return preds, scores


def direct_linear(estimator: Any) -> DirectLinear:
    """The direct form of a supported fitted estimator; raises Unsupported saying why not."""
    steps = [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    steps = [s for s in steps if s is not None and not (isinstance(s, str) and s == "passthrough")]
    if not steps:
        raise Unsupported(f"the pipeline has no steps; supported: {_SUPPORTED}")
    *scalers, final = steps
    for step in scalers:
        if type(step) is not StandardScaler:
            raise Unsupported(f"step {type(step).__name__} is not a StandardScaler; supported: {_SUPPORTED}")
    if type(final) not in CLASSIFIERS + REGRESSORS:
        raise Unsupported(f"the final step is a {type(final).__name__}; supported: {_SUPPORTED}")
    coef = getattr(final, "coef_", None)
    if not isinstance(coef, np.ndarray) or sparse.issparse(coef) or coef.dtype != np.float64:
        raise Unsupported("the model's coef_ is not a dense float64 array")
    classifier = type(final) in CLASSIFIERS
    classes = np.asarray(final.classes_) if classifier else None
    kind = None
    if type(final) is LogisticRegression:
        kind = "expit" if classes.size <= 2 else "softmax"
    return DirectLinear(
        scalers=tuple(_scaler(s) for s in scalers),
        coef=coef.T if coef.ndim == 2 else coef,
        intercept=final.intercept_,
        classes=classes,
        probabilities=kind,
    )


def _scaler(step: StandardScaler) -> tuple[np.ndarray | None, np.ndarray | None]:
    mean = np.asarray(step.mean_).astype(np.float64) if step.with_mean else None
    scale = np.asarray(step.scale_).astype(np.float64) if step.with_std and step.scale_ is not None else None
    return mean, scale
