"""One self-contained static HTML page from one or more run directories.

Sections: the config, per-task metrics (Δm against the single-task baselines when summary.json
has them), learning curves (metrics.csv), task weights over time (steps.csv), gradient conflict
and task affinity heatmaps (diagnostics/, written by the ``diagnostics`` callback; conflict falls
back to the health monitor's cosines in gradients.csv), gradient health (gradients.csv and the
health events), grouping advice from the affinity, and a side-by-side comparison of the runs.
Plots are matplotlib PNGs inlined as data URIs: the page needs no server, no network and no
script. A section whose logs are missing says which setting writes them; the page still renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.core.errors import DataError, InvalidParameterError

#: (anchor, title) of every section, in page order
SECTIONS = (("config", "Config"), ("metrics", "Per-task metrics"), ("curves", "Learning curves"),
            ("weights", "Task weights over time"), ("conflict", "Gradient conflict"), ("affinity", "Task affinity (TAG)"),
            ("grouping", "Grouping advice"), ("health", "Gradient health"), ("comparison", "Comparison of runs"))

ENABLE = {
    "config": "config.yaml is written by `polytask train` (or Trainer(config_text=...))",
    "metrics": "summary.json is written at the end of training (Trainer.fit); rerun or finish the run",
    "curves": "metrics.csv is written at every epoch end by the CSV logger (any Trainer run with an output_dir)",
    "weights": "steps.csv is written at every epoch end by the CSV logger (any Trainer run with an output_dir)",
    "conflict": ("add the diagnostics callback (`callbacks: [diagnostics]`) with a gradient method (e.g. `method: mgda`), "
                 "or set `health.every: N` so that a Gramian is computed every N steps"),
    "affinity": "add the diagnostics callback with lookahead affinity: `callbacks: [{name: diagnostics, affinity_every: 10}]`",
    "health": "set `health.every: N` (e.g. 10) to log gradient norms and task cosines every N steps",
}


@dataclass
class RunLogs:
    """What a run directory holds (None where a file is absent)."""

    path: Path
    name: str
    config: str | None = None
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] | None = None
    steps: list[dict[str, Any]] | None = None
    gradients: list[dict[str, Any]] | None = None
    diagnostics: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)


def _read_csv(path: Path) -> list[dict[str, Any]] | None:
    import csv

    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows, start=2):
        for key in ("value", "loss", "weight"):
            if key in row and row[key] not in (None, ""):
                try:
                    row[key] = float(row[key])
                except ValueError:
                    raise DataError(f"{path}: row {number}, column `{key}` is {row[key]!r}; expected a number") from None
        for key in ("epoch", "step"):
            if key in row and row[key] not in (None, ""):
                try:
                    row[key] = int(row[key])
                except ValueError:
                    raise DataError(f"{path}: row {number}, column `{key}` is {row[key]!r}; expected an integer") from None
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); the run's file is damaged") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object; found {type(data).__name__}")
    return data


def read_run(path: str | Path) -> RunLogs:
    """A run directory's logs; a missing folder or one that holds no run is one clear error."""
    path = Path(path)
    if not path.exists():
        raise InvalidParameterError(f"run directory '{path}' does not exist; pass the output_dir of a polytask run")
    if not path.is_dir():
        raise InvalidParameterError(f"'{path}' is a file, not a run directory")
    known = ("summary.json", "metrics.csv", "steps.csv", "config.yaml", "checkpoints")
    if not any((path / name).exists() for name in known):
        raise InvalidParameterError(f"'{path}' holds no polytask run (none of {', '.join(known)}); pass the output_dir "
                                    "of a run that trained at least one epoch")
    name = path.resolve().name
    return RunLogs(path=path, name=name,
                   config=(path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None,
                   summary=_read_json(path / "summary.json"), metrics=_read_csv(path / "metrics.csv"),
                   steps=_read_csv(path / "steps.csv"), gradients=_read_csv(path / "gradients.csv"),
                   diagnostics=_read_json(path / "diagnostics" / "summary.json"),
                   files=sorted(p.name for p in path.iterdir() if not p.name.startswith(".")))


# ---------------------------------------------------------------------------------- drawing
def _pyplot():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        from polytask.core.errors import MissingDependencyError
        raise MissingDependencyError("the report draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _img(fig: Any, alt: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _heatmap(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str], title: str, *, xlabel: str, ylabel: str) -> str:
    plt = _pyplot()
    import numpy as np

    values = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    # the colours span the off-diagonal (transfer) values; the diagonal (1 for cosines, self-affinity) saturates
    off = values[np.isfinite(values) & ~np.eye(len(tasks), dtype=bool)]
    finite = off if off.size else values[np.isfinite(values)]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    size = 1.2 + 0.9 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(values, cmap="RdBu", vmin=-scale or -1, vmax=scale or 1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            text = "–" if not math.isfinite(values[i, j]) else f"{values[i, j]:.3g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if math.isfinite(values[i, j]) and abs(values[i, j]) > 0.6 * scale else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _img(fig, title)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.4g}"
        return html.escape("–" if v is None else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _missing(section: str, run: RunLogs, what: str | None = None) -> str:
    return (f'<p class="missing" data-missing="{section}"><b>{html.escape(run.name)}</b>: '
            f'{html.escape(what or "no logs for this section")}. To get it: {html.escape(ENABLE[section])}.</p>')


# ---------------------------------------------------------------------------------- sections
def _config(run: RunLogs) -> str:
    if run.config is None:
        return _missing("config", run, "no config.yaml")
    head = f"{html.escape(run.name)}: config.yaml ({len(run.config.splitlines())} lines, click to open)"
    return f"<details><summary>{head}</summary><pre>{html.escape(run.config)}</pre></details>"


def _higher_is_better(metric: str) -> bool | None:
    """The metric's direction; None for one this install does not know (no Δ is shown for it)."""
    from polytask.metrics.registry import METRICS

    if metric == "loss":
        return False
    return METRICS.higher_is_better(metric) if metric in METRICS.names() else None


def _metrics(run: RunLogs) -> str:
    summary = run.summary
    if summary is None or not isinstance(summary.get("tasks"), Mapping):
        return _missing("metrics", run, "no summary.json")
    baselines = summary.get("baselines") or {}
    main = summary.get("main_metrics") or {}
    rows = []
    for task, values in summary["tasks"].items():
        for metric, value in values.items():
            base = baselines.get(task, {}).get(metric)
            change = None
            direction = _higher_is_better(metric)
            if isinstance(base, (int, float)) and base and isinstance(value, (int, float)) and direction is not None:
                change = (1 if direction else -1) * (value - base) / abs(base) * 100
            rows.append([task, metric + (" (main)" if main.get(task) == metric else ""), value, base,
                         None if change is None else f"{change:+.2f} %"])
    out = f"<h3>{html.escape(run.name)} (split: {html.escape(str(summary.get('split')))}, method: " \
          f"{html.escape(str(summary.get('method')))})</h3>"
    out += _table(["task", "metric", "value", "single-task baseline", "Δ vs baseline"], rows)
    if summary.get("delta_m") is not None:
        out += f'<p class="delta-m">Δm over the main metrics: <b>{float(summary["delta_m"]):+.2f} %</b></p>'
    else:
        out += ('<p class="note">No Δm: this run has no single-task baselines (train with <code>polytask train CONFIG '
                '--baselines</code>).</p>')
    return out


def _curves(run: RunLogs) -> str:
    rows, main = run.metrics, (run.summary or {}).get("main_metrics") or {}
    if not rows:
        return _missing("curves", run, "no metrics.csv")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    plt = _pyplot()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 2.4 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        metric = main.get(task) or next((m["metric"] for m in rows if m["task"] == task and m["metric"] != "loss"), "loss")
        for c, name in enumerate(("loss", metric)):
            ax = axes[r][c]
            for split, style in (("train", "-"), ("val", "--")):
                pts = sorted((m["epoch"], m["value"]) for m in rows if m["task"] == task and m["split"] == split
                             and m["metric"] == name and isinstance(m["value"], float))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=split)
            ax.set_title(f"{task}: {name}", fontsize=9)
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return f"<h3>{html.escape(run.name)}</h3>" + _img(fig, f"learning curves of {run.name}")


def _weights(run: RunLogs) -> str:
    rows = run.steps
    if not rows:
        return _missing("weights", run, "no steps.csv")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3))
    for task in tasks:
        pts = sorted((r["step"], r["weight"]) for r in rows if r["task"] == task and isinstance(r["weight"], float))
        window = max(1, len(pts) // 100)  # a moving mean keeps thousands of steps readable
        xs = [p[0] for p in pts][window - 1:]
        ys = [sum(p[1] for p in pts[i - window + 1:i + 1]) / window for i in range(window - 1, len(pts))]
        ax.plot(xs, ys, label=task, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("applied weight")
    ax.legend(fontsize=8)
    return f"<h3>{html.escape(run.name)}</h3>" + _img(fig, f"task weights of {run.name}")


def _conflict(run: RunLogs) -> str:
    diag = (run.diagnostics or {}).get("conflict") or {}
    overall = diag.get("overall") or {}
    if overall.get("steps"):
        tasks = diag["tasks"]
        where = "the last shared layer" if diag.get("compare") == "last_shared" else "all shared parameters θ"
        out = f"<h3>{html.escape(run.name)}: {overall['steps']} steps with a Gramian, gradients on {where}</h3>"
        out += _heatmap(overall["mean_cosine"], tasks, "mean task-gradient cosine", xlabel="task", ylabel="task")
        epochs = diag.get("per_epoch") or {}
        rows = [[int(e) + 1, v.get("conflict_fraction"), *[(v.get("norm_ratio") or {}).get(t) for t in tasks], v.get("steps")]
                for e, v in sorted(epochs.items(), key=lambda kv: int(kv[0]))]
        out += _table(["epoch", "conflicting pairs", *[f"norm ratio {t}" for t in tasks], "steps"], rows)
        return out
    cos = [r for r in (run.gradients or []) if r.get("kind") == "cosine" and isinstance(r.get("value"), float)]
    if cos:
        pairs: dict[tuple[str, str], list[float]] = {}
        for r in cos:
            a, _, b = r["name"].partition("~")
            pairs.setdefault((a, b), []).append(r["value"])
        tasks = list(dict.fromkeys([p for ab in pairs for p in ab]))
        matrix: list[list[float | None]] = [[1.0 if a == b else None for b in tasks] for a in tasks]
        for (a, b), values in pairs.items():
            matrix[tasks.index(a)][tasks.index(b)] = matrix[tasks.index(b)][tasks.index(a)] = sum(values) / len(values)
        fraction = sum(v < 0 for values in pairs.values() for v in values) / sum(len(v) for v in pairs.values())
        steps = len({r["step"] for r in cos})
        return (f"<h3>{html.escape(run.name)}: from the health monitor's cosines ({steps} logged steps)</h3>"
                + _heatmap(matrix, tasks, "mean task-gradient cosine (gradients.csv)", xlabel="task", ylabel="task")
                + f'<p>Conflicting pairs (cosine &lt; 0): {fraction:.1%} of the logged pair-steps.</p>')
    return _missing("conflict", run, "no Gramian was logged")


def _affinity_matrix(run: RunLogs) -> tuple[list[str], list[list[float | None]], dict[str, Any]] | None:
    aff = (run.diagnostics or {}).get("affinity") or {}
    overall = aff.get("overall") or {}
    if not overall.get("steps"):
        return None
    return aff["tasks"], overall["mean"], aff


def _affinity(run: RunLogs) -> str:
    found = _affinity_matrix(run)
    if found is None:
        return _missing("affinity", run, "no affinity was measured")
    tasks, matrix, aff = found
    seconds = aff.get("seconds")
    train = (run.summary or {}).get("train_seconds")
    cost = f", {seconds:.1f} s of {train:.1f} s training" if isinstance(seconds, float) and isinstance(train, float) else ""
    out = (f"<h3>{html.escape(run.name)}: mean over {aff['overall']['steps']} affinity steps (every {aff.get('every')} "
           f"steps{cost})</h3>")
    out += _heatmap(matrix, tasks, "Z source → target = 1 − L_target(θ′_source) / L_target(θ)", xlabel="target task",
                    ylabel="source task (stepped on)")
    return out


def _grouping(run: RunLogs) -> str:
    from polytask.diagnostics.grouping import best_grouping

    found = _affinity_matrix(run)
    source = "TAG affinity"
    if found is None:
        conflict = ((run.diagnostics or {}).get("conflict") or {})
        if (conflict.get("overall") or {}).get("steps"):
            found, source = (conflict["tasks"], conflict["overall"]["mean_cosine"], {}), "mean gradient cosine"
    if found is None:
        return _missing("affinity", run, "no affinity or conflict matrix to group from")
    tasks, matrix, _ = found
    try:
        rows = []
        for b in range(1, len(tasks) + 1):
            g = best_grouping(matrix, tasks, b)
            rows.append([b, " | ".join(", ".join(group) for group in g.groups), g.total])
    except InvalidParameterError as exc:
        return f'<p class="missing" data-missing="grouping"><b>{html.escape(run.name)}</b>: {html.escape(str(exc))}</p>'
    return (f"<h3>{html.escape(run.name)}: best split into at most B groups ({source})</h3>"
            + _table(["B", "groups", "total score"], rows)
            + "<p class=\"note\">Write one config per group: <code>polytask inspect RUN_DIR --groups B --write-configs DIR"
              "</code>.</p>")


def _health(run: RunLogs) -> str:
    rows = run.gradients
    events = (run.summary or {}).get("health_events") or []
    if not rows:
        out = _missing("health", run, "no gradients.csv")
    else:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3))
        total = sorted((r["step"], r["value"]) for r in rows if r["kind"] == "total_norm")
        axes[0].plot([p[0] for p in total], [p[1] for p in total], lw=1)
        axes[0].set_title("total gradient norm", fontsize=9)
        tasks = list(dict.fromkeys(r["name"] for r in rows if r["kind"] == "task_norm"))
        for task in tasks:
            pts = sorted((r["step"], r["value"]) for r in rows if r["kind"] == "task_norm" and r["name"] == task)
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=task)
        axes[1].set_title("per-task gradient norm on θ", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            if ax.lines and all(p > 0 for line in ax.lines for p in line.get_ydata()):
                ax.set_yscale("log")
        if tasks:
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        out = f"<h3>{html.escape(run.name)}</h3>" + _img(fig, f"gradient health of {run.name}")
    if events:
        out += _table(["step", "kind", "message"], [[e.get("step"), e.get("kind"), e.get("message")] for e in events])
    elif run.summary is not None:
        out += "<p>No health events (no non-finite, exploding or vanishing gradient was reported).</p>"
    return out


def _comparison(runs: Sequence[RunLogs]) -> str:
    if len(runs) < 2:
        return ('<p class="note" data-missing="comparison">One run given: pass several run directories '
                '(<code>polytask report RUN_A RUN_B ...</code>) to compare them side by side.</p>')
    tasks = list(dict.fromkeys(t for r in runs for t in ((r.summary or {}).get("tasks") or {})))
    header = ["run", "method", "epochs", "train s", *[f"{t} ({_main(runs, t)})" for t in tasks], "Δm"]
    rows = []
    for r in runs:
        s = r.summary or {}
        rows.append([r.name, s.get("method"), s.get("epochs_run"), s.get("train_seconds"),
                     *[((s.get("tasks") or {}).get(t) or {}).get(_main(runs, t)) for t in tasks],
                     None if s.get("delta_m") is None else f"{float(s['delta_m']):+.2f} %"])
    out = _table(header, rows, "comparison")
    plotted = [r for r in runs if r.metrics]
    if plotted and tasks:
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3), squeeze=False)
        for c, task in enumerate(tasks):
            metric = _main(runs, task)
            ax = axes[0][c]
            for r in plotted:
                split = "val" if any(m["split"] == "val" for m in r.metrics) else "train"  # type: ignore[union-attr]
                pts = sorted((m["epoch"], m["value"]) for m in r.metrics  # type: ignore[union-attr]
                             if m["task"] == task and m["split"] == split and m["metric"] == metric)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{r.name} ({split})")
            ax.set_title(f"{task}: {metric}", fontsize=9)
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        out += _img(fig, "main metric per epoch, every run")
    return out


def _main(runs: Sequence[RunLogs], task: str) -> str:
    for r in runs:
        metric = ((r.summary or {}).get("main_metrics") or {}).get(task)
        if metric:
            return metric
    return "loss"


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1em;color:#444}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.85em}
.missing{background:#fff4e0;border-left:4px solid #e8a33d;padding:.5em .8em}.note{color:#555}
img.plot{max-width:100%;display:block;margin:.4em 0}nav a{margin-right:1em}
"""


def render(runs: Sequence[RunLogs]) -> str:
    """The page as a string."""
    if not runs:
        raise InvalidParameterError("the report needs at least one run directory")
    builders = {"config": _config, "metrics": _metrics, "curves": _curves, "weights": _weights, "conflict": _conflict,
                "affinity": _affinity, "grouping": _grouping, "health": _health}
    parts = []
    for anchor, title in SECTIONS:
        body = _comparison(runs) if anchor == "comparison" else "".join(builders[anchor](r) for r in runs)
        parts.append(f'<section id="{anchor}" data-section="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>')
    names = ", ".join(html.escape(r.name) for r in runs)
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in SECTIONS)
    listing = _table(["run", "directory", "files"], [[r.name, str(r.path), ", ".join(r.files)] for r in runs])
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>polytask report: {names}</title><style>{STYLE}</style></head><body>"
            f"<h1>polytask report: {names}</h1><nav>{nav}</nav>{listing}{''.join(parts)}</body></html>")


def _atomic_write_text(path: Path, text: str) -> None:
    """Temporary file in the same folder, fsync, rename: a crash leaves the old page or the new one.
    (``train.checkpoint`` has the same helper; diagnostics sits below train and does not import it.)"""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; a report is read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Read every run (errors before anything is written), render, write ``output`` atomically."""
    runs = [read_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs of the same folder name stay apart in the tables
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path})"
    page = render(runs)
    output = Path(output)
    if output.is_dir():
        raise InvalidParameterError(f"report output '{output}' is a folder; give a file name such as report.html")
    _atomic_write_text(output, page)
    return output
