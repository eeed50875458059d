"""What a person looks at: the run summary printed after training, tables and plots.

    print_run_summary(result)      # accuracy, per-class table, where the run folder is
"""

from __future__ import annotations

from typing import Any


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def per_class_table(metrics: dict, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, row in metrics.get("per_class", {}).items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    return table


def print_run_summary(result: Any) -> None:
    """Skipped files, the headline metrics and the per-class table of a finished run."""
    console = _console()
    m = result.metrics
    skipped = result.config.data.get("skipped", 0)
    ignored = result.config.data.get("ignored", 0)
    if skipped or ignored:
        console.print(
            f"data: {skipped} file(s) skipped, {ignored} ignored — full list in {result.run_dir / 'problems.json'}"
        )
    for split in ("val", "test"):
        if split in m and m[split].get("n"):
            s = m[split]
            console.print(
                f"{split} accuracy: {s['accuracy']:.4f}  (balanced {s['balanced_accuracy']:.4f}, "
                f"macro-F1 {s['macro_f1']:.4f}, n={s['n']})"
            )
    headline = m.get("headline", "val")
    if headline in m and len(m[headline].get("per_class", {})) <= 50:
        console.print(per_class_table(m[headline], f"per class ({headline})"))
    console.print(f"run folder: {result.run_dir}")
