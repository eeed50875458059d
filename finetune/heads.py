"""Linear heads on frozen features, and how they become one `nn.Linear`.

The probe fits scikit-learn's StandardScaler + LogisticRegression (or LinearSVC) with C
chosen by stratified cross-validation on the training split, then folds the scaler into the
weights so the saved model is a plain module: trunk -> Linear::

    head = fit_head(x_train, y_train, kind="logreg")      # FittedHead (numpy)
    linear = fold(head)                                    # nn.Linear(D, K)
    model = Classifier(trunk, linear)

Folding: scores = W ((x - mu) / sigma) + b = (W / sigma) x + (b - (W / sigma) mu).
Binary sklearn models have one row w: logistic p = sigmoid(w.x + b) equals the softmax of
the two rows (-w/2, +w/2), and for the SVM their argmax is the sign of w.x + b.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
HEADS = ("logreg", "svm")


@dataclass(frozen=True)
class FittedHead:
    """A linear head in the standardized feature space, plus the standardization itself."""

    kind: str  # "logreg" | "svm"
    coef: np.ndarray  # (K', D), K' = 1 for binary problems
    intercept: np.ndarray  # (K',)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    C: float
    cv_scores: dict[float, float] = field(default_factory=dict)  # C -> mean CV accuracy
    n_folds: int = 0  # 0: C fixed (too few images per class for CV)

    @property
    def probabilistic(self) -> bool:
        return self.kind == "logreg"


class Classifier(nn.Module):
    """The one artifact every recipe produces: trunk (B, 3, H, W) -> (B, D), head (B, D) -> (B, K)."""

    def __init__(self, trunk: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _estimator(kind: str, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if kind == "logreg":
        return LogisticRegression(C=C, max_iter=2000)
    if kind == "svm":
        return LinearSVC(C=C, max_iter=5000, random_state=seed)
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")


def cv_folds(y: np.ndarray) -> int:
    """min(3, smallest class count); below 2 there is no cross-validation."""
    return int(min(3, np.bincount(y).min()))


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    kind: str = "logreg",
    c_grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
) -> FittedHead:
    """Standardize, choose C by stratified k-fold CV on (x, y), refit on all of it.

    Args:
        x: (N, D) float features of the training split.
        y: (N,) integer labels 0..K-1 (every class present).
        kind: "logreg" (probabilities) or "svm" (scores).
        c_grid: inverse regularization strengths to try.
        seed: for the fold assignment.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    folds = cv_folds(y)
    scores: dict[float, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        if folds >= 2 and len(c_grid) > 1:
            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for C in c_grid:
                pipe = make_pipeline(StandardScaler(), _estimator(kind, C, seed))
                scores[C] = float(cross_val_score(pipe, x, y, cv=cv).mean())
            best = max(c_grid, key=lambda c: (scores[c], -abs(np.log10(c))))  # ties: nearest to C=1
        else:
            folds = 0
            best = 1.0 if len(c_grid) != 1 else c_grid[0]
        scaler = StandardScaler().fit(x)
        est = _estimator(kind, best, seed).fit(scaler.transform(x), y)
    return FittedHead(
        kind=kind,
        coef=np.asarray(est.coef_, dtype=np.float64),
        intercept=np.asarray(est.intercept_, dtype=np.float64).reshape(-1),
        mean=np.asarray(scaler.mean_, dtype=np.float64),
        scale=np.asarray(scaler.scale_, dtype=np.float64),
        C=float(best),
        cv_scores=scores,
        n_folds=folds,
    )


def fold(head: FittedHead) -> nn.Linear:
    """The head with its standardization folded in, as one float32 nn.Linear(D, K)."""
    w = head.coef / head.scale[None, :]  # (K', D)
    b = head.intercept - w @ head.mean  # (K',)
    if w.shape[0] == 1:  # binary: one score row -> two symmetric rows
        w = np.concatenate([-w / 2, w / 2])
        b = np.concatenate([-b / 2, b / 2])
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w).float())
        linear.bias.copy_(torch.from_numpy(b).float())
    return linear


def scores_numpy(head: FittedHead, x: np.ndarray) -> np.ndarray:
    """(N, K) scores of the unfolded head, as sklearn computes them (the test reference)."""
    z = ((np.asarray(x, np.float64) - head.mean) / head.scale) @ head.coef.T + head.intercept
    return np.concatenate([-z / 2, z / 2], axis=1) if z.shape[1] == 1 else z
