"""knn: what `--head knn` costs against the logistic-regression head, on the same folder and split.

Both are `finetune run --strategy linear-probe` of EfficientNet-Lite0 (packaged weights, 224 px)
on sklearn's 1,797 digits (the demo's folder; the same seeded split), the second with
`--head knn`. The kNN head keeps the training features in the model: printed are the size of
model.safetensors and of the bank inside it, and the validation accuracy of both heads.

    python benchmarks/knn.py [FOLDER]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from common import digits_folder, finetune_cmd, timed


def one_run(data: Path, out: Path, *extra: str) -> tuple[Path, dict, float]:
    """(run folder, metrics.json, seconds) of one `finetune run` into the empty folder `out`."""
    seconds, _ = timed(finetune_cmd("run", str(data), "-o", str(out), *extra))
    (run,) = out.iterdir()
    return run, json.loads((run / "metrics.json").read_text()), seconds


def main() -> None:
    from safetensors import safe_open

    data = Path(sys.argv[1]) if len(sys.argv) > 1 else digits_folder()
    with tempfile.TemporaryDirectory() as tmp:
        # fill the feature cache; another seed (another split) so the logreg head below is fitted,
        # not read back from the cache's remembered heads
        timed(finetune_cmd("run", str(data), "-o", str(Path(tmp) / "warm"), "--seed", "1"))
        ref_run, ref, ref_s = one_run(data, Path(tmp) / "logreg")
        run, ours, s = one_run(data, Path(tmp) / "knn", "--head", "knn")
        ref_mb = (ref_run / "model.safetensors").stat().st_size / 1e6
        mb = (run / "model.safetensors").stat().st_size / 1e6
        with safe_open(str(run / "model.safetensors"), "numpy") as f:
            bank, onehot = f.get_tensor("head.bank"), f.get_tensor("head.onehot")
        bank_mb = (bank.nbytes + onehot.nbytes) / 1e6

    head = ours["head"]
    print(f"data: {data} ({ours['timing']['images']} images; bank {bank.shape[0]} x {bank.shape[1]} float32)")
    print(f"k = {head['k']} by {head['folds']}-fold CV; CV accuracy per k: {head['cv_accuracy']}")
    a, r = ours["val"]["accuracy"], ref["val"]["accuracy"]
    print(f"{'val accuracy':<22} knn {a:8.4f}     logreg {r:8.4f}     difference {a - r:+.4f}")
    print(f"{'model.safetensors MB':<22} knn {mb:8.1f}     logreg {ref_mb:8.1f}     ratio {mb / ref_mb:.2f}x")
    print(
        f"{'bank + labels MB':<22} knn {bank_mb:8.1f}     "
        f"(({bank.shape[1]} + {onehot.shape[1]}) x 4 bytes per training image)"
    )
    print(f"{'head fit s':<22} knn {ours['timing']['fit_s']:8.2f}     logreg {ref['timing']['fit_s']:8.2f}")
    print(f"{'whole run s (cached)':<22} knn {s:8.1f}     logreg {ref_s:8.1f}")


if __name__ == "__main__":
    main()
