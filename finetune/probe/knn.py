"""The k-nearest-neighbour head: cosine similarity to the training features, as DINO evaluates features.

    knn = fit_knn(x_train, y_train, seed=0)     # FittedKNN: normalized bank, labels, k chosen by CV
    knn.k, knn.cv_scores                        # e.g. 5, {1: 0.94, 3: 0.95, 5: 0.96, ...}
    p = knn_proba(knn, x)                       # (N, K): share of the k neighbours in each class
    model = Classifier(trunk, KNNHead(*knn_tensors(knn), knn.k))   # the saved artifact's head

Each feature vector is L2-normalized; an image's neighbours are the k training images of
highest cosine similarity, each with one vote (uniform weights). Its scores are the share of
the votes per class: scikit-learn's `KNeighborsClassifier(n_neighbors=k, metric="cosine",
algorithm="brute").predict_proba`, which the tests compare against. k is chosen from `K_GRID`
(capped by the smallest cross-validation training fold) by scikit-learn's `GridSearchCV` over
StratifiedKFold folds of the training split (the folds of `heads.cv_folds`); ties go to the
smaller k. With fewer than two images in some class there is no cross-validation: k = 1.

The training features are part of the artifact: the saved model holds the normalized bank
(N, D) and the one-hot labels (N, K) as float32, (D + K) * 4 bytes per training image. On the
1,797 digits with lite0 (D = 1280, 1,438 training images) that is 7.4 MB: model.safetensors is
21.1 MB against 13.7 MB with logistic regression, for a validation accuracy of 0.955 (k = 5)
against 0.981 (`benchmarks/knn.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

K_GRID = (1, 3, 5, 10, 20)


@dataclass(frozen=True)
class FittedKNN:
    """The training features (L2-normalized), their labels, and the k chosen by cross-validation."""

    bank: np.ndarray  # (N, D) float32, rows of unit length
    labels: np.ndarray  # (N,) int64
    n_classes: int
    k: int
    cv_scores: dict[int, float] = field(default_factory=dict)  # k -> mean CV accuracy
    n_folds: int = 0  # 0: k fixed (too few images per class for CV)
    kind: str = "knn"


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of unit L2 length, float32 (an all-zero row stays zero, as torch's F.normalize)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def k_candidates(n_train: int, k_grid: tuple[int, ...] = K_GRID) -> list[int]:
    """The grid's k that a training set (or fold) of `n_train` images can take (at least k = 1)."""
    return [k for k in k_grid if k <= n_train] or [1]


def fit_knn(x: np.ndarray, y: np.ndarray, k_grid: tuple[int, ...] = K_GRID, seed: int = 0) -> FittedKNN:
    """Normalize the training features and choose k by stratified cross-validation on them.

    Args:
        x: (N, D) features of the training split.
        y: (N,) integer labels 0..K-1 (every class present).
        k_grid: numbers of neighbours to try.
        seed: for the fold assignment (sklearn's StratifiedKFold, shuffled), as the linear heads.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    from finetune.probe.heads import cv_folds

    bank = normalize(x)
    y = np.asarray(y).astype(np.int64)
    folds = cv_folds(y)
    scores: dict[int, float] = {}
    if folds >= 2:
        smallest_fold = len(y) - int(np.ceil(len(y) / folds))  # training rows of the smallest CV fold
        grid = k_candidates(smallest_fold, k_grid)
        search = GridSearchCV(
            KNeighborsClassifier(metric="cosine", algorithm="brute"),
            {"n_neighbors": grid},
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            refit=False,
        )
        search.fit(bank, y)
        k = int(search.best_params_["n_neighbors"])  # the first best in grid order: the smaller k
        scores = {int(g): float(s) for g, s in zip(grid, search.cv_results_["mean_test_score"])}
    else:
        folds, k = 0, 1
    return FittedKNN(bank, y, int(y.max()) + 1, k, scores, folds)


def onehot(knn: FittedKNN) -> np.ndarray:
    """(N, K) float32 one-hot rows of the bank's labels: what the saved head votes with."""
    out = np.zeros((len(knn.labels), knn.n_classes), np.float32)
    out[np.arange(len(knn.labels)), knn.labels] = 1.0
    return out


def knn_tensors(knn: FittedKNN) -> tuple[np.ndarray, np.ndarray]:
    """(bank (N, D), one-hot labels (N, K)) float32: `models.classifier.KNNHead`'s buffers."""
    return np.ascontiguousarray(knn.bank, np.float32), onehot(knn)


def knn_proba(knn: FittedKNN, x: np.ndarray) -> np.ndarray:
    """(M, K) float32: the share of each class among the k most cosine-similar training images.

    The same arithmetic as the saved `KNNHead` (normalize, one matmul, top-k, mean of one-hot
    rows), in numpy, so the probe scores its validation split without torch.
    """
    sim = normalize(x) @ knn.bank.T  # (M, N)
    top = np.argpartition(-sim, knn.k - 1, axis=1)[:, : knn.k]  # (M, k) the k nearest, any order
    return onehot(knn)[top].mean(axis=1).astype(np.float32)  # (M, K)
