"""The folded nn.Linear must reproduce scikit-learn's head exactly (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from finetune.probe.heads import FittedHead, cv_folds, fit_head, fold, smoothed_cross_entropy, temperature


def _blobs(n_classes: int, n: int = 40, d: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, d))
    y = np.repeat(np.arange(n_classes), n)
    x = centers[y] + rng.normal(0, 2.5, (len(y), d)) + 5.0  # offset: the scaler matters
    x[:, 0] *= 40  # very different feature scales
    return x.astype(np.float32), y


def _scores(folded: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the saved model's nn.Linear computes, run through torch (the artifact's own path)."""
    from finetune.models.classifier import linear_layer

    with torch.no_grad():
        return linear_layer(*folded)(torch.from_numpy(x)).numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(z), dim=1).numpy()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_logreg_matches_sklearn_probabilities(n_classes):
    x, y = _blobs(n_classes)
    # Independent reference: sklearn's own fit, folded by us into one nn.Linear.
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x), y)
    head = FittedHead("logreg", ref.coef_, ref.intercept_, scaler.mean_, scaler.scale_, 0.1)
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
    ours = fit_head(x, y, kind="logreg", c_grid=(C,))
    assert ours.converged
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(scaler.transform(x), y)
    assert ours.coef.shape == ref.coef_.shape  # binary: one row, like sklearn
    p_ours = _softmax(_scores(fold(ours), x))
    np.testing.assert_allclose(p_ours, ref.predict_proba(scaler.transform(x)), atol=1e-3)


def test_cross_validation_scores_are_sklearns():
    """Per C, the CV accuracy of our warm-started path equals sklearn's cross_val_score on the same folds."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    x, y = _blobs(3, n=60, seed=5)
    ours = fit_head(x, y, seed=2)
    folds = StratifiedKFold(3, shuffle=True, random_state=2)
    for c, score in ours.cv_scores.items():
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        ref = float(cross_val_score(pipe, x, y, cv=folds).mean())
        assert abs(score - ref) <= 0.02, (c, score, ref)


def test_raw_features_head_matches_sklearn_without_a_scaler():
    """standardize=False (LP-FT's starting head): sklearn's logistic regression on the raw features."""
    x, y = _blobs(3, seed=6)
    x = x / 40  # raw features of moderate scale, as a network's pooled outputs
    head = fit_head(x, y, c_grid=(1.0,), standardize=False)
    assert np.all(head.mean == 0) and np.all(head.scale == 1)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000).fit(x, y)
    np.testing.assert_allclose(_softmax(_scores(fold(head), x)), ref.predict_proba(x), atol=1e-3)


def test_a_head_that_stops_early_says_so(caplog):
    """scipy's own convergence flag is kept and logged, never ignored."""
    import finetune.probe.heads as H

    x, y = _blobs(4, seed=8)
    caplog.set_level("WARNING", logger="finetune")
    real = H.SOLVERS["logreg"]
    try:
        H.SOLVERS["logreg"] = lambda *a, **k: real(*a, **{**k, "max_iter": 2})
        head = fit_head(x, y, c_grid=(10.0,))
    finally:
        H.SOLVERS["logreg"] = real
    assert not head.converged and "did not converge" in caplog.text


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


def test_head_fit_does_not_import_torch():
    """A cached re-run fits its head without torch (a subprocess sees the truth)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from finetune.probe.heads import fit_head, fold; "
        "rng = np.random.default_rng(0); x = rng.normal(size=(60, 5)); y = np.repeat([0, 1, 2], 20); "
        "x[:, 0] += y; fold(fit_head(x, y)); fold(fit_head(x, y, kind='svm')); "
        "print(sorted(m for m in ('torch',) if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_smoothed_cross_entropy_is_torchs_label_smoothed_loss():
    rng = np.random.default_rng(0)
    z, y = rng.normal(0, 5, (40, 6)), rng.integers(0, 6, 40)
    for eps in (0.0, 0.1, 0.3):
        ref = torch.nn.CrossEntropyLoss(label_smoothing=eps)(torch.from_numpy(z), torch.from_numpy(y))
        assert smoothed_cross_entropy(z, y, eps) == pytest.approx(float(ref), abs=1e-9)


@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_temperature_finds_the_minimum_of_the_fine_tuning_loss_along_the_heads_scale(scale):
    """The LP-FT head is divided by T: checked against a dense grid of T on torch's own loss."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    z = rng.normal(0, 1, (300, 5))
    z[np.arange(300), y] += 2.0  # mostly right, as a probe on its training features
    z *= scale  # 30: near-certain logits (an unregularized probe); 0.05: a timid one
    t = temperature(z, y, label_smoothing=0.1)
    grid = np.exp(np.linspace(np.log(1e-2), np.log(1e3), 2001))
    zt, yt, loss = torch.from_numpy(z), torch.from_numpy(y), torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = [float(loss(zt / g, yt)) for g in grid]
    best = grid[int(np.argmin(losses))]
    assert smoothed_cross_entropy(z / t, y, 0.1) <= min(losses) + 1e-6
    assert t == pytest.approx(best, rel=0.02)
    assert (t > 1) == (scale > 1)  # near-certain logits are cooled, timid ones sharpened
    assert np.array_equal((z / t).argmax(1), z.argmax(1))
