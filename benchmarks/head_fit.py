"""head_fit: our head fit vs scikit-learn's, on the same real features.

Features: EfficientNet-Lite0 pooled features of sklearn's digits as images (from the feature
cache; extracted once). Reference: what naive_probe.py does — GridSearchCV(StandardScaler +
LogisticRegression(max_iter=2000), C in {0.001..10}, cv=3). Ours: finetune.heads.fit_head
(torch L-BFGS on sklearn's objective, warm-started along the C path, 3-fold CV).

    python benchmarks/head_fit.py
"""

from __future__ import annotations

import time

from common import digits_folder


def features():
    from finetune.anatomy import build_trunk
    from finetune.backbones import build
    from finetune.data import scan
    from finetune.features import FeatureIdentity, extract

    index = scan(digits_folder())
    bb = build("lite0")
    trunk = build_trunk(bb.model)
    ident = FeatureIdentity.of(bb, "pool", "avg", bb.preprocessing)
    f = extract(trunk, index, range(len(index.paths)), bb.preprocessing, identity=ident)
    tr, va = f.subset(index.indices("train")), f.subset(index.indices("val"))
    return tr.x, tr.labels, va.x, va.labels


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from finetune.heads import C_GRID, fit_head, fold, scores_numpy

    xtr, ytr, xva, yva = features()
    print(f"features: train {xtr.shape}, val {xva.shape}")
    t0 = time.perf_counter()
    grid = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": list(C_GRID)},
        cv=3,
    )
    grid.fit(xtr, ytr)
    t_ref = time.perf_counter() - t0
    acc_ref = float((grid.predict(xva) == yva).mean())

    t0 = time.perf_counter()
    head = fit_head(xtr, ytr)
    t_ours = time.perf_counter() - t0
    acc_ours = float((scores_numpy(head, xva).argmax(1) == yva).mean())
    del fold
    print(
        f"reference (sklearn GridSearchCV): {t_ref:6.2f} s  "
        f"C={grid.best_params_['logisticregression__C']}  val acc {acc_ref:.4f}"
    )
    print(f"ours (scipy L-BFGS, warm path):   {t_ours:6.2f} s  C={head.C:g}  val acc {acc_ours:.4f}")
    print(
        f"head_fit speed-up: {t_ref / t_ours:.1f}x (goal >= 5x); "
        f"accuracy difference {100 * (acc_ours - acc_ref):+.2f} pt (goal within 0.3)"
    )


if __name__ == "__main__":
    main()
