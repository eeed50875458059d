"""Linear heads on frozen features, and how they become one `nn.Linear`.

The probe standardizes features, fits a logistic regression (or a linear SVM) with C chosen
by stratified cross-validation on the training split, then folds the scaler into the weights
so the saved model is a plain module: trunk -> Linear::

    head = fit_head(x_train, y_train, kind="logreg")      # FittedHead (numpy)
    w, b = fold(head)                                      # (K, D), (K,): scores = x @ w.T + b
    model = Classifier(trunk, linear_layer(w, b))          # finetune.model

Why not `LogisticRegressionCV`: both heads are solved by full-batch L-BFGS (scipy) on
scikit-learn's exact objectives, warm-started along the C path, with the cross-validation
folds fitted side by side on one BLAS thread each. Against the fair library baseline,
`LogisticRegressionCV` with its own warm starts over the same C grid and folds, this is
measured faster at the same C and accuracy (`benchmarks/head_fit.py` prints both; on 2 cores
and lite0 features of the 1,797 digits, see the README). Logistic regression is
LogisticRegression(lbfgs)'s objective (mean cross-entropy + ||W||^2 / (2 C n), intercept
unpenalized, binary problems as one row); the linear SVM is LinearSVC's (one-vs-rest squared
hinge, intercept penalized as liblinear does). scikit-learn is the reference in the tests, and
its StratifiedKFold makes the folds. A solve that stops before convergence is reported.

`standardize=False` fits on the raw features (the starting head of LP-FT fine-tuning, whose
weights must stay O(1) once the features move).

Folding: scores = W ((x - mu) / sigma) + b = (W / sigma) x + (b - (W / sigma) mu).
Binary sklearn models have one row w: logistic p = sigmoid(w.x + b) equals the softmax of
the two rows (-w/2, +w/2), and for the SVM their argmax is the sign of w.x + b.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
HEADS = ("logreg", "svm")

log = logging.getLogger(__name__)


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
    converged: bool = True  # L-BFGS met its tolerance on the final fit

    @property
    def probabilistic(self) -> bool:
        return self.kind == "logreg"


def cv_folds(y: np.ndarray) -> int:
    """min(3, smallest class count); below 2 there is no cross-validation."""
    return int(min(3, np.bincount(y).min()))


def _targets(y: np.ndarray, n_classes: int, rows: int, signed: bool) -> np.ndarray:
    """(n, K') targets: one-hot (or 0/1 for one row); `signed` maps 0/1 to -1/+1 (hinge losses)."""
    if rows == 1:
        t = (y == 1).astype(np.float32)[:, None]
    else:
        t = np.zeros((len(y), rows), np.float32)
        t[np.arange(len(y)), y] = 1.0
    return 2 * t - 1 if signed else t


def _logreg_loss(z: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean logistic (one row) or softmax cross-entropy loss of logits z (n, K'), and dloss/dz."""
    n = len(z)
    if z.shape[1] == 1:
        loss = float(np.mean(np.logaddexp(0.0, z) - t * z))  # log(1 + e^z) - y z, stably
        p = np.exp(-np.logaddexp(0.0, -z))  # sigmoid
    else:
        zmax = z.max(axis=1, keepdims=True)
        ez = np.exp(z - zmax)
        norm = ez.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(norm[:, 0]) + zmax[:, 0] - (z * t).sum(axis=1)))
        p = ez / norm
    return loss, (p - t) / n


def _svm_loss(z: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean one-vs-rest squared hinge of scores z (n, K') for signed targets t, and dloss/dz."""
    slack = np.maximum(0.0, 1.0 - t * z)  # (n, K')
    return float((slack * slack).sum() / len(z)), -2.0 * t * slack / len(z)


Solution = tuple[np.ndarray, np.ndarray]  # coef (K', d) float32, intercept (K',) float32
Solved = tuple[np.ndarray, np.ndarray, bool]  # coef, intercept, whether L-BFGS converged


def _lbfgs(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    init: Solution | None,
    kind: str,
    max_iter: int,
    tol: float,
) -> Solved:
    """Minimize mean loss + ||W||^2 / (2 C n) (+ b^2 / (2 C n) for the SVM) with scipy's L-BFGS-B.

    The objective and its analytic gradient are float32 matmuls; scipy runs L-BFGS-B with
    sklearn's own settings (ftol = 64 eps, maxls 50), gtol = `tol` on the largest gradient entry.
    No autograd and no torch.optim: the first `torch.optim` step imports torch._dynamo (about
    2-3 s), which would dominate a cached re-run.
    """
    from scipy.optimize import minimize

    xn = np.asarray(x, dtype=np.float32)  # (n, d)
    n, d = xn.shape
    rows = 1 if n_classes == 2 else n_classes
    t = _targets(np.asarray(y), n_classes, rows, signed=kind == "svm")
    loss_fn = _svm_loss if kind == "svm" else _logreg_loss
    # liblinear (LinearSVC) penalizes the intercept like a weight; sklearn's logistic lbfgs does not.
    reg_b = 1.0 if kind == "svm" else 0.0
    penalty = 1.0 / (C * n)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: rows * d].reshape(rows, d).astype(np.float32)  # (K', d)
        b = theta[rows * d :].astype(np.float32)  # (K',)
        # float32 matmuls, float64 loss: a float32 objective is too noisy for the line search.
        loss, r = loss_fn((xn @ w.T + b).astype(np.float64), t)  # r: dloss/dz, (n, K')
        r = r.astype(np.float32)
        loss += 0.5 * penalty * (float(np.dot(theta[: rows * d], theta[: rows * d])) + reg_b * float(b @ b))
        gw = r.T @ xn + penalty * w
        gb = r.sum(axis=0) + reg_b * penalty * b
        return loss, np.concatenate([gw.ravel(), gb]).astype(np.float64)

    if init is None:
        theta0 = np.zeros(rows * d + rows)
    else:
        theta0 = np.concatenate([init[0].ravel(), init[1].ravel()]).astype(np.float64)
    res = minimize(
        objective,
        theta0,
        method="L-BFGS-B",
        jac=True,
        options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
    )
    coef = res.x[: rows * d].reshape(rows, d).astype(np.float32)
    return coef, res.x[rows * d :].astype(np.float32), bool(res.success)


def logreg_lbfgs(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    init: Solution | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
) -> Solved:
    """sklearn's L2 logistic regression on standardized x (n, d): returns coef (K', d), intercept (K',).

    K' = 1 for two classes (one logistic row, as sklearn), else K (softmax rows); the intercept
    is not penalized. gtol is 10x tighter than sklearn's default (warm starts keep that cheap).
    """
    return _lbfgs(x, y, n_classes, C, init, "logreg", max_iter, tol)


def svm_lbfgs(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    init: Solution | None = None,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> Solved:
    """sklearn's LinearSVC (squared hinge, L2, one-vs-rest, intercept penalized like liblinear).

    Its primal 0.5 (||w||^2 + b^2) + C sum(max(0, 1 - y (w.x + b))^2), divided by C n, is smooth,
    so L-BFGS solves it directly; K' = 1 row for two classes, as sklearn.
    """
    return _lbfgs(x, y, n_classes, C, init, "svm", max_iter, tol)


SOLVERS = {"logreg": logreg_lbfgs, "svm": svm_lbfgs}


def _standardize(x: np.ndarray, on: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not on:
        return x, np.zeros(x.shape[1], x.dtype), np.ones(x.shape[1], x.dtype)
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 0, scale, 1.0).astype(x.dtype)  # sklearn: constant features keep scale 1
    return (x - mean) / scale, mean, scale


def _fold_path(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, kind: str, c_grid, standardize: bool
) -> dict[float, tuple[float, Solution]]:
    """One CV fold: {C: (test accuracy, solution)} along the C path, warm-started from small C."""
    k = int(y.max()) + 1
    xtr, mean, scale = _standardize(x[train], standardize)
    xva = (x[test] - mean) / scale
    out: dict[float, tuple[float, Solution]] = {}
    init = None
    for C in sorted(c_grid):  # small C (strong penalty) first: each solution starts the next
        # Ranking C needs accuracy, not a tight optimum: sklearn's own tolerance (1e-4) here.
        w, b, _ = SOLVERS[kind](xtr, y[train], k, C, init, tol=1e-4)
        init = (w, b)
        z = xva @ w.T + b  # (n_test, K')
        pred = (z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(1)
        out[C] = (float((pred == y[test]).mean()), (w, b))
    return out


def _cv_lbfgs(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    c_grid,
    folds: int,
    seed: int,
    workers: int = 1,
    standardize: bool = True,
) -> tuple[dict[float, float], dict[float, Solution]]:
    """Mean CV accuracy per C, and the fold-averaged solution per C (a warm start for the refit).

    Folds are independent, so `workers` threads fit them side by side (numpy's matmuls release
    the GIL); results are combined in fold order, so they do not depend on `workers`.
    """
    from sklearn.model_selection import StratifiedKFold

    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            paths = list(pool.map(lambda s: _fold_path(x, y, s[0], s[1], kind, c_grid, standardize), splits))
    else:
        paths = [_fold_path(x, y, tr, te, kind, c_grid, standardize) for tr, te in splits]
    correct = {C: sum(p[C][0] for p in paths) / folds for C in c_grid}
    mean_sol = {
        C: (sum(p[C][1][0] for p in paths) / folds, sum(p[C][1][1] for p in paths) / folds) for C in c_grid
    }
    return correct, mean_sol


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    kind: str = "logreg",
    c_grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
    standardize: bool = True,
) -> FittedHead:
    """Standardize, choose C by stratified k-fold CV on (x, y), refit on all of it.

    Args:
        x: (N, D) float features of the training split.
        y: (N,) integer labels 0..K-1 (every class present).
        kind: "logreg" (probabilities) or "svm" (scores).
        c_grid: inverse regularization strengths to try.
        seed: for the fold assignment (sklearn's StratifiedKFold, shuffled).
        standardize: fit on standardized features (folded back by `fold`); False: raw features.
    """
    from threadpoolctl import threadpool_limits

    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")
    # float32 halves the work of every L-BFGS step; the features are float32 anyway.
    xt, yt = np.asarray(x, dtype=np.float32), np.asarray(y).astype(np.int64)
    folds = cv_folds(yt)
    scores: dict[float, float] = {}
    warm: dict[float, Solution] = {}
    # Small problems are latency-bound: extra BLAS/OpenMP threads only spin (measured: 0.25 s with
    # one thread vs 3.6 s with two on a busy 2-core machine, 320 x 64 features).
    small = xt.shape[0] * xt.shape[1] * max(2, int(yt.max()) + 1) < 1e8
    with warnings.catch_warnings(), threadpool_limits(1 if small else None):
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in exp on a diverging line search
        if folds >= 2 and len(c_grid) > 1:
            # one BLAS thread per fold, folds side by side; big problems use BLAS threads instead
            workers = min(folds, os.cpu_count() or 1) if small else 1
            scores, warm = _cv_lbfgs(xt, yt, kind, c_grid, folds, seed, workers, standardize)
            best = max(c_grid, key=lambda c: (round(scores[c], 9), -abs(np.log10(c))))  # ties: nearest C=1
        else:
            folds = 0
            best = 1.0 if len(c_grid) != 1 else c_grid[0]
        xs, mean, scale = _standardize(xt, standardize)
        coef, intercept, converged = SOLVERS[kind](xs, yt, int(yt.max()) + 1, best, warm.get(best))
    head = FittedHead(
        kind=kind,
        coef=np.asarray(coef, dtype=np.float64),
        intercept=np.asarray(intercept, dtype=np.float64).reshape(-1),
        mean=np.asarray(mean, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
        C=float(best),
        cv_scores=scores,
        n_folds=folds,
        converged=converged,
    )
    say_convergence(head, len(xt))
    return head


def say_convergence(head: FittedHead, n: int) -> None:
    """A final fit that stopped before its tolerance is said (one line), never silently kept."""
    if not head.converged:
        log.warning(
            f"the {head.kind} head did not converge (C = {head.C:g}, {n} images): "
            "its accuracy may be a little lower than the optimum"
        )


def fold(head: FittedHead) -> Solution:
    """The head with its standardization folded in: float32 (W (K, D), b (K,)), scores = x @ W.T + b.

    `models.classifier.linear_layer(W, b)` makes it the saved model's nn.Linear.
    """
    w = head.coef / head.scale[None, :]  # (K', D)
    b = head.intercept - w @ head.mean  # (K',)
    if w.shape[0] == 1:  # binary: one score row -> two symmetric rows
        w = np.concatenate([-w / 2, w / 2])
        b = np.concatenate([-b / 2, b / 2])
    return w.astype(np.float32), b.astype(np.float32)


def scores_numpy(head: FittedHead, x: np.ndarray) -> np.ndarray:
    """(N, K) scores of the unfolded head, as sklearn computes them (the test reference)."""
    z = ((np.asarray(x, np.float64) - head.mean) / head.scale) @ head.coef.T + head.intercept
    return np.concatenate([-z / 2, z / 2], axis=1) if z.shape[1] == 1 else z


def smoothed_cross_entropy(z: np.ndarray, y: np.ndarray, label_smoothing: float = 0.0) -> float:
    """Mean cross-entropy of logits z (n, K) against labels smoothed as torch's
    `CrossEntropyLoss(label_smoothing=eps)`: target (1 - eps) on the label plus eps / K on every class."""
    z = np.asarray(z, np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(y)), y]
    return float(((1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=1)).mean())


def temperature(z: np.ndarray, y: np.ndarray, label_smoothing: float = 0.0) -> float:
    """T > 0 minimizing `smoothed_cross_entropy(z / T, y, label_smoothing)` (bounded search on log T).

    LP-FT's starting head is divided by it, so fine-tuning starts at the minimum of its own loss
    along the head's scale. A probe fitted with little regularization is near-certain on its
    training images; under label smoothing that costs a loss far above the minimum (measured on
    the fonts style-shift set of `benchmarks/transfer.py`: 2.06 at T = 1 against 0.71 at T = 4),
    and the gradients of that loss flow into the trunk in the first steps (validation accuracy
    fell from 0.75 to 0.56 in the first epoch). Dividing every logit by T keeps every prediction.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(z, np.float64)
    best = minimize_scalar(
        lambda log_t: smoothed_cross_entropy(z / np.exp(log_t), y, label_smoothing),
        bounds=(np.log(1e-2), np.log(1e3)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(best.x))
