"""The folded nn.Linear must reproduce scikit-learn's head exactly (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from finetune.heads import cv_folds, fit_head, fold, stratified_folds


def _blobs(n_classes: int, n: int = 40, d: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, d))
    y = np.repeat(np.arange(n_classes), n)
    x = centers[y] + rng.normal(0, 2.5, (len(y), d)) + 5.0  # offset: the scaler matters
    x[:, 0] *= 40  # very different feature scales
    return x.astype(np.float32), y


def _scores(folded: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the saved model's nn.Linear computes, run through torch (the artifact's own path)."""
    from finetune.model import linear_layer

    with torch.no_grad():
        return linear_layer(*folded)(torch.from_numpy(x)).numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(z), dim=1).numpy()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_logreg_matches_sklearn_probabilities(n_classes):
    x, y = _blobs(n_classes)
    head = fit_head(x, y, kind="logreg", c_grid=(0.1,), solver="sklearn")
    # Independent reference: sklearn fitted from scratch with the same C.
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x), y)
    p_ref = ref.predict_proba(scaler.transform(x))
    p_ours = _softmax(_scores(fold(head), x))
    assert p_ours.shape == (len(x), n_classes)
    np.testing.assert_allclose(p_ours, p_ref, atol=1e-4)
    assert (p_ours.argmax(1) == ref.predict(scaler.transform(x))).mean() >= 0.99


@pytest.mark.parametrize("n_classes", [2, 3])
def test_folded_svm_matches_sklearn_decisions(n_classes):
    x, y = _blobs(n_classes, seed=1)
    head = fit_head(x, y, kind="svm", c_grid=(1.0,))
    scaler = StandardScaler().fit(x)
    ref = LinearSVC(C=1.0, max_iter=5000, random_state=0).fit(scaler.transform(x), y)
    scores = _scores(fold(head), x)
    agree = (scores.argmax(1) == ref.predict(scaler.transform(x))).mean()
    assert agree >= 0.99
    if n_classes == 2:  # two rows -w/2, +w/2: their difference is sklearn's decision function
        z_ref = ref.decision_function(scaler.transform(x))  # liblinear at its default tol 1e-4
        np.testing.assert_allclose(scores[:, 1] - scores[:, 0], z_ref, atol=1e-3 * np.abs(z_ref).max())


def test_binary_fold_has_two_symmetric_rows():
    x, y = _blobs(2)
    w, b = fold(fit_head(x, y, c_grid=(1.0,)))
    assert w.shape == (2, x.shape[1]) and w.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(w[0], -w[1])
    np.testing.assert_array_equal(b[0], -b[1])


def test_c_is_chosen_by_cross_validation_and_fixed_when_too_few():
    x, y = _blobs(3)
    head = fit_head(x, y, c_grid=(0.001, 1.0))
    assert head.n_folds == 3 and set(head.cv_scores) == {0.001, 1.0}
    assert max(head.cv_scores, key=head.cv_scores.get) == head.C
    # One image of a class in train: no CV possible, C = 1 said aloud by the caller.
    y1 = y.copy()
    y1[y1 == 2] = 1
    y1[0] = 2
    assert cv_folds(y1) == 1
    assert fit_head(x, y1).n_folds == 0 and fit_head(x, y1).C == 1.0


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("C", [0.01, 1.0])
def test_torch_lbfgs_solves_sklearns_objective(n_classes, C):
    """Our L-BFGS head and sklearn's LogisticRegression (solved tightly) are the same model.

    Ours stops at a gradient tolerance of 1e-5 (sklearn's default is 1e-4), so probabilities
    agree to 1e-3; the folding itself is exact (test above, 1e-4).
    """
    x, y = _blobs(n_classes, seed=3)
    ours = fit_head(x, y, kind="logreg", c_grid=(C,), solver="lbfgs")
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(scaler.transform(x), y)
    assert ours.coef.shape == ref.coef_.shape  # binary: one row, like sklearn
    p_ours = _softmax(_scores(fold(ours), x))
    np.testing.assert_allclose(p_ours, ref.predict_proba(scaler.transform(x)), atol=1e-3)


def test_torch_and_sklearn_cross_validation_pick_comparable_c():
    x, y = _blobs(3, n=60, seed=5)
    a = fit_head(x, y, solver="lbfgs")
    b = fit_head(x, y, solver="sklearn")
    for c in a.cv_scores:
        assert abs(a.cv_scores[c] - b.cv_scores[c]) <= 0.02, (c, a.cv_scores, b.cv_scores)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("C", [0.01, 1.0])
def test_lbfgs_svm_solves_linearsvcs_objective(n_classes, C):
    """Our squared-hinge L-BFGS and liblinear's primal solver (tight) give the same scores."""
    x, y = _blobs(n_classes, seed=4)
    ours = fit_head(x, y, kind="svm", c_grid=(C,))
    scaler = StandardScaler().fit(x)
    ref = LinearSVC(C=C, dual=False, tol=1e-10, max_iter=100000).fit(scaler.transform(x), y)
    assert ours.coef.shape == ref.coef_.shape
    z_ref = ref.decision_function(scaler.transform(x)).reshape(len(x), -1)
    z_ours = (scaler.transform(x) @ ours.coef.T + ours.intercept).reshape(len(x), -1)
    np.testing.assert_allclose(z_ours, z_ref, atol=2e-3 * np.abs(z_ref).max())


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("labels", ["uneven", "strings-order"])
def test_stratified_folds_are_sklearns(seed, labels):
    """Fold for fold the samples sklearn's StratifiedKFold(shuffle=True) would choose."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=83, p=[0.4, 0.3, 0.15, 0.1, 0.05])  # uneven classes, shuffled order
    if labels == "strings-order":
        y = (4 - y) * 3  # labels first seen in another order than sorted: sklearn encodes by appearance
    ours = stratified_folds(y, 3, seed)
    for k, (_, test) in enumerate(StratifiedKFold(3, shuffle=True, random_state=seed).split(y, y)):
        np.testing.assert_array_equal(np.flatnonzero(ours == k), test)


def test_head_fit_imports_neither_torch_nor_sklearn():
    """A cached re-run fits its head without the two slowest imports (a subprocess sees the truth)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from finetune.heads import fit_head, fold; "
        "rng = np.random.default_rng(0); x = rng.normal(size=(60, 5)); y = np.repeat([0, 1, 2], 20); "
        "x[:, 0] += y; fold(fit_head(x, y)); fold(fit_head(x, y, kind='svm')); "
        "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
