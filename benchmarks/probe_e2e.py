"""probe_e2e: `finetune run --strategy linear-probe` (cache off) vs the hand-written naive_probe.py.

Both run as whole processes on the same train/ val/ folder (digits as PNG by default, split
once so both see the same split), alternating, 3 times each; medians are compared. Goal: our
wall time <= 1/3 of the reference's, validation accuracy within 0.5 pt.

    python benchmarks/probe_e2e.py [FOLDER] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REFERENCE, digits_folder, finetune_cmd, median, parse_kv, row, split_folder, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = split_folder(args.folder or digits_folder())
    ours_t, ref_t, ours_acc, ref_acc = [], [], [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            dt, _ = timed(
                finetune_cmd("run", str(folder), "--strategy", "linear-probe", "--no-cache", "--out", out)
            )
            (run_dir,) = Path(out).iterdir()
            ours_acc.append(json.loads((run_dir / "metrics.json").read_text())["val"]["accuracy"])
        ours_t.append(dt)
        dt, text = timed([sys.executable, str(REFERENCE), str(folder)])
        ref_t.append(dt)
        ref_acc.append(float(parse_kv(text.strip().splitlines()[-1])["val_acc"]))
        print(
            f"round {r + 1}: ours {ours_t[-1]:.1f} s (acc {ours_acc[-1]:.4f}), "
            f"reference {ref_t[-1]:.1f} s (acc {ref_acc[-1]:.4f})",
            flush=True,
        )
    print(f"folder {folder}")
    print(row("probe_e2e wall s (median)", median(ours_t), median(ref_t), "s", better="lower"))
    print(row("val accuracy", median(ours_acc), median(ref_acc), "acc"))
    print(f"accuracy difference: {100 * (median(ours_acc) - median(ref_acc)):+.2f} pt")


if __name__ == "__main__":
    main()
