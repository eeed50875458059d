"""head_fit: our head fit vs scikit-learn's, on the same real features.

Features: EfficientNet-Lite0 pooled features of sklearn's digits as images (from the feature
cache; extracted once). Two references, in the same run:

- the fair one: `LogisticRegressionCV(Cs=C_GRID, cv=StratifiedKFold(3, shuffle=True))` on
  standardized features: sklearn's own warm-started path over the same C grid and folds;
- what naive_probe.py does: GridSearchCV(StandardScaler + LogisticRegression(max_iter=2000)).

Ours: finetune.probe.heads.fit_head (scipy L-BFGS on sklearn's objective, warm-started along
the C path, 3 folds side by side on one BLAS thread each).

    python benchmarks/head_fit.py
"""

from __future__ import annotations

import time

from common import digits_folder


def features():
    from finetune.data.index import scan
    from finetune.features.cache import FeatureIdentity
    from finetune.features.extract import extract
    from finetune.models.anatomy import build_trunk
    from finetune.models.backbone import build

    index = scan(digits_folder())
    bb = build("lite0")
    trunk = build_trunk(bb.model)
    ident = FeatureIdentity.of(bb, "pool", "avg", bb.preprocessing)
    f = extract(trunk, index, range(len(index.paths)), bb.preprocessing, identity=ident)
    tr, va = f.subset(index.indices("train")), f.subset(index.indices("val"))
    return tr.x, tr.labels, va.x, va.labels


def main() -> None:
    from common import row
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from finetune.probe.heads import C_GRID, fit_head, scores_numpy

    xtr, ytr, xva, yva = features()
    print(f"features: train {xtr.shape}, val {xva.shape}")

    t0 = time.perf_counter()
    head = fit_head(xtr, ytr)
    t_ours = time.perf_counter() - t0
    acc_ours = float((scores_numpy(head, xva).argmax(1) == yva).mean())

    t0 = time.perf_counter()
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    cv = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(C_GRID), cv=folds, max_iter=2000))
    cv.fit(xtr, ytr)
    t_cv = time.perf_counter() - t0
    acc_cv = float((cv.predict(xva) == yva).mean())
    c_cv = float(cv[-1].C_[0])

    t0 = time.perf_counter()
    grid = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": list(C_GRID)},
        cv=3,
    )
    grid.fit(xtr, ytr)
    t_grid = time.perf_counter() - t0
    acc_grid = float((grid.predict(xva) == yva).mean())

    print(
        f"ours (scipy L-BFGS, warm path):       {t_ours:6.2f} s  C={head.C:g}  val acc {acc_ours:.4f}"
        f"  converged={head.converged}"
    )
    print(f"LogisticRegressionCV (fair baseline): {t_cv:6.2f} s  C={c_cv:g}  val acc {acc_cv:.4f}")
    print(
        f"GridSearchCV (naive_probe's way):     {t_grid:6.2f} s  "
        f"C={grid.best_params_['logisticregression__C']}  val acc {acc_grid:.4f}"
    )
    print(row("fit s vs LogisticRegressionCV", t_ours, t_cv, "s", "lower"))
    print(row("fit s vs GridSearchCV", t_ours, t_grid, "s", "lower"))
    print(
        f"accuracy difference vs LogisticRegressionCV: {100 * (acc_ours - acc_cv):+.2f} pt (goal within 0.3)"
    )


if __name__ == "__main__":
    main()
