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


def plot_gradients(path: Path, rows: Sequence[Mapping]) -> None:
    """gradients.png: per-task gradient norms, pairwise task cosines and the total norm per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("task_norm", "per-task gradient norm on θ", True), ("cosine", "task-gradient cosine", False),
              ("total_norm", "total gradient norm", True))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for ax, (kind, title, log) in zip(axes, panels):
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["kind"] == kind:
                series.setdefault(row["name"], []).append((row["step"], row["value"]))
        for name, points in sorted(series.items())[:12]:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
        if log and series:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        if 1 < len(series) <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=80))
    plt.close(fig)
