"""cached: a re-run of `finetune run` with a warm feature cache vs the first run, whole processes.

The first run starts from an empty cache (a fresh FINETUNE_CACHE, so the ONNX export is
included, as a first run on a new machine); the re-run is the same command. Also prints the
extraction phase alone (from metrics.json) and checks the cache ignores a head/C-grid change.
Goals: whole process <= 1/8 (issue 16), extraction phase >= 50x faster.

    python benchmarks/cached.py [FOLDER]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import digits_folder, finetune_cmd, row, timed


def run_once(folder: Path, out: Path, cache: str, *extra: str) -> tuple[float, dict]:
    before = set(out.iterdir()) if out.exists() else set()
    dt, _ = timed(finetune_cmd("run", str(folder), "--out", str(out), *extra), env={"FINETUNE_CACHE": cache})
    (run_dir,) = set(out.iterdir()) - before
    return dt, json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", type=Path)
    args = ap.parse_args()
    folder = args.folder or digits_folder()
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "runs", str(Path(tmp) / "cache")
        first_t, first = run_once(folder, out, cache)
        again_t, again = run_once(folder, out, cache)
        svm_t, svm = run_once(folder, out, cache, "--set", "head='svm'", "--set", "c_grid=[0.01, 0.1]")
    print(f"folder {folder} ({first['timing']['images']} images)")
    print(row("whole process s", again_t, first_t, "s", better="lower"))
    print(
        row(
            "extraction phase s",
            again["timing"]["extract_s"],
            first["timing"]["extract_s"],
            "s",
            better="lower",
        )
    )
    print(
        f"re-run cache hits {again['timing']['cache_hits']} of {again['timing']['images']}; "
        f"accuracy {again['val']['accuracy']:.4f} (first {first['val']['accuracy']:.4f})"
    )
    print(
        f"svm head + other C grid on the warm cache: {svm_t:.1f} s, "
        f"cache hits {svm['timing']['cache_hits']}, "
        f"accuracy {svm['val']['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
