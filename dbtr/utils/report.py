"""Console tables of final metrics (rich), one row per branch."""

from __future__ import annotations

from typing import Any

# base / debiased: with SPARC (docs/sparc.md), the model's scores before it and its standardisation alone
BRANCH_SUFFIXES = (
    ("merged", ""),
    ("global", "_global"),
    ("local", "_local"),
    ("base", "_base"),
    ("debiased", "_debiased"),
)


def metrics_table(metrics: dict[str, Any], stage: str = "test", title: str | None = None):
    """A rich Table: rows = the branches present (merged, global, local, base, debiased), columns = mAP and
    F1 numbers present in ``metrics``."""
    from rich.table import Table

    columns = [c for c in ("mAP", "CF1@3", "OF1@3", "CF1@5", "OF1@5") if f"{stage}/{c}" in metrics]
    table = Table(title=title or f"{stage} metrics (%)")
    table.add_column("branch")
    for c in columns:
        table.add_column(c, justify="right")
    for branch, suffix in BRANCH_SUFFIXES:
        values = [metrics.get(f"{stage}/{c}{suffix}") for c in columns]
        if values and values[0] is not None:
            table.add_row(branch, *(f"{v:.2f}" if v is not None else "-" for v in values))
    return table


def print_metrics_table(metrics: dict[str, Any], stage: str = "test", title: str | None = None) -> None:
    from rich.console import Console

    Console().print(metrics_table(metrics, stage, title))
