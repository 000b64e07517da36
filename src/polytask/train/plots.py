"""training.png: per-task loss, main metric and weight per epoch, train and validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from polytask.train.checkpoint import atomic_write


def plot_training(path: Path, rows: Sequence[Mapping], main_metrics: Mapping[str, str]) -> None:
    """Draw from metrics rows (epoch, split, task, metric, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(main_metrics)
    columns = ["loss", "main", "weight"]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(12, 2.8 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        for c, column in enumerate(columns):
            metric = main_metrics[task] if column == "main" else column
            ax = axes[r][c]
            for split, style in (("train", "-"), ("val", "--")):
                points = sorted((row["epoch"], row["value"]) for row in rows
                                if row["task"] == task and row["split"] == split and row["metric"] == metric)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3, label=split)
            ax.set_title(f"{task}: {metric}")
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=80))
    plt.close(fig)
