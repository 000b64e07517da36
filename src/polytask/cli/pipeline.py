"""From a Config to finished runs: single-task baselines, the multi-task run, evaluation, prediction."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polytask.config.build import (
    build_model,
    check_registries,
    encoder_spec,
    load_data,
    restrict,
    trainer_kwargs,
)
from polytask.config.schema import Config, TaskConfig, load_config
from polytask.core.errors import ConfigError, DataError, ShapeError, closest
from polytask.core.task import Task
from polytask.data.dataset import TaskDatasets
from polytask.data.files import read_table
from polytask.data.tabular import TabularPreprocessor
from polytask.datasets import LoadedData
from polytask.train.checkpoint import CheckpointError, load_checkpoint
from polytask.train.rundir import RunDir
from polytask.train.trainer import Trainer


def resolved(cfg: Config, loaded: LoadedData, encoder: dict[str, Any]) -> Config:
    """The config with everything the data decided written out (tasks, encoder sizes)."""
    tasks = {t.name: TaskConfig(kind=t.kind, target=t.target, num_classes=t.num_classes, weight=t.weight,
                                metrics=list(t.metric_names), lr=t.lr, weight_decay=t.weight_decay,
                                allow_missing=(cfg.tasks or {}).get(t.name, TaskConfig()).allow_missing,
                                data=(cfg.tasks or {}).get(t.name, TaskConfig()).data, loss=t.loss.to_config())
             for t in loaded.tasks}
    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["tasks"] = {n: tc.model_dump(mode="json", exclude_none=True) for n, tc in tasks.items()}
    _absolute_paths(raw)
    raw["model"]["encoder"] = encoder
    return Config.model_validate(raw)


def _absolute_paths(raw: dict[str, Any]) -> None:
    """Data paths in the saved config are absolute, so eval/predict work from any folder."""
    files = [raw.get("data", {}).get("files") or {}]
    files += [(task or {}).get("data") or {} for task in (raw.get("tasks") or {}).values()]
    for group in files:
        for key, value in list(group.items()):
            if value is not None:
                group[key] = str(Path(value).resolve())


def prepare(cfg: Config) -> tuple[LoadedData, dict[str, Any], dict[str, Any], Config]:
    check_registries(cfg)
    loaded, prep = load_data(cfg)
    for split in ("train", "val", "test"):
        data = getattr(loaded, split)
        if data is not None:
            data.validate(loaded.tasks, where=f"{split} data")
    encoder = encoder_spec(cfg, loaded)
    state = prep.to_dict()
    if isinstance(loaded.train, TaskDatasets):  # what `predict` checks a .npy file against
        state["input_shapes"] = {t: list(ds.x.shape[1:]) for t, ds in loaded.train.datasets.items()}
    else:
        state["input_shape"] = list(loaded.input_shape)
    return loaded, encoder, state, resolved(cfg, loaded, encoder)


def previous_baselines(run: RunDir, tasks: list[Task]) -> dict[str, dict[str, float]]:
    """The single-task results an earlier segment of this run used: its single_task/ runs, else the
    baselines in its summary.json (empty when it had none)."""
    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    def finite(values: dict[str, Any]) -> dict[str, float]:
        return {k: math.nan if v is None else v for k, v in values.items()}  # strict JSON: null = NaN

    found = {t.name: read(run.path / "single_task" / t.name / "summary.json").get("tasks", {}).get(t.name) for t in tasks}
    if all(found.values()):
        return {name: finite(values) for name, values in found.items()}
    saved = read(run.path / "summary.json").get("baselines") or {}
    if all(saved.get(t.name) for t in tasks):
        return {t.name: finite(saved[t.name]) for t in tasks}
    return {}


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, baselines: bool = False,
          single_task_only: bool = False) -> dict[str, Any]:
    """Run what `polytask train` runs; returns the multi-task summary (or the baselines').

    A resumed run keeps the baselines it had (its single_task/ runs or its summary) without
    ``--baselines``. With ``overwrite``, the old run stays aside until the new one has written
    its first checkpoint and comes back if the new one fails before (see ``RunDir``).
    """
    loaded, encoder, prep, full = prepare(cfg)
    stems = loaded.encoder.get("_stems")
    kwargs = trainer_kwargs(cfg)
    run = RunDir(cfg.output_dir)
    # distillation without teachers given: the run's own single-task baselines are the teachers
    baselines = baselines or (cfg.distill is not None and cfg.distill.teachers is None and not single_task_only)
    kept = previous_baselines(run, loaded.tasks) if resume and not (baselines or single_task_only) else {}
    # Build and check the multi-task trainer once with nothing written, so that every error in
    # the config or data (encoder or method parameters, monitor, task names) comes before any
    # file of an existing run is touched. Baselines still to train stand in as empty ones.
    planned = kept or ({t.name: {} for t in loaded.tasks} if baselines else None)
    Trainer(build_model(cfg, loaded.tasks, encoder, stems), loaded.tasks, **kwargs, baselines=planned).check(
        loaded.train, loaded.val, loaded.test)
    if cfg.distill is not None and not single_task_only:
        from polytask.cli import distill

        distill.check(cfg, loaded, encoder, stems)
    # under torchrun only rank 0 touches the run directory (the Trainer waits for it before reading)
    main = os.environ.get("RANK", "0") == "0"
    if main:
        run.prepare(resume=resume, overwrite=overwrite)
    try:
        summary = _train(cfg, run, loaded, encoder, stems, kwargs, full, kept, resume=resume,
                         baselines=baselines, single_task_only=single_task_only)
    except BaseException:
        if main:
            run.rollback()  # an overwritten run comes back when the new one has no checkpoint yet
        raise
    if main:
        if not single_task_only:
            run.write_json("preprocess.json", prep)
        run.commit()
    return summary


def _train(cfg: Config, run: RunDir, loaded: LoadedData, encoder: dict[str, Any], stems: dict[str, int] | None,
           kwargs: dict[str, Any], full: Config, kept: dict[str, dict[str, float]], *, resume: bool,
           baselines: bool, single_task_only: bool) -> dict[str, Any]:
    stl: dict[str, dict[str, float]] = dict(kept)
    if baselines or single_task_only:
        for task in loaded.tasks:
            sub = RunDir(run.path / "single_task" / task.name)
            if resume and (sub.path / "summary.json").exists():
                saved = json.loads((sub.path / "summary.json").read_text())["tasks"][task.name]
                stl[task.name] = {k: math.nan if v is None else v for k, v in saved.items()}  # strict JSON: null = NaN
                continue
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, [task], encoder, {task.name: stems[task.name]} if stems else None)
            monitor = cfg.train.monitor if cfg.train.monitor.split("/")[0] in ("loss", task.name) else "loss"
            # one task: `equal`, which compares no gradients, so the multi-task run's engine.compare does not apply
            single = {**kwargs, "method": "equal", "loop": cfg.train.model_copy(update={"monitor": monitor}),
                      "engine": cfg.engine.model_copy(update={"compare": "auto"})}
            trainer = Trainer(model, [task], **single, output_dir=sub.path, resume=resume and sub.has_checkpoint())
            report = trainer.fit(restrict(loaded.train, task.name), restrict(loaded.val, task.name),
                                 restrict(loaded.test, task.name))
            stl[task.name] = report.metrics[task.name]
        if single_task_only:
            return {"baselines": stl}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, loaded.tasks, encoder, stems)
    data, extra = loaded.train, {}
    if cfg.distill is not None:  # the teachers' cached outputs ride in the data; the KD terms are objectives
        from polytask.cli.distill import student

        data, extra["objectives"], teacher_metrics = student(cfg, run.path, loaded, encoder, stems, model)
        stl = stl or teacher_metrics
    trainer = Trainer(model, loaded.tasks, **kwargs, **extra, baselines=stl or None, output_dir=cfg.output_dir,
                      resume=resume, config_text=full.to_yaml())
    return trainer.fit(data, loaded.val, loaded.test).summary


def _restore(run_dir: Path, checkpoint: str) -> tuple[Config, LoadedData | None, Trainer, dict[str, Any]]:
    run = RunDir(run_dir)
    if not (run.path / "config.yaml").exists():
        raise ConfigError(f"{run.path} is not a polytask run directory (no config.yaml)")
    cfg = load_config(run.path / "config.yaml")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last; found {checkpoint!r}")
    path = run.best if checkpoint == "best" else run.last
    state = load_checkpoint(path)
    from polytask.config.build import _task, apply_target_scaling

    assert cfg.model.encoder is not None
    encoder = {"name": cfg.model.encoder.name, **cfg.model.encoder.params}
    prep_path = run.path / "preprocess.json"
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    tasks = apply_target_scaling([_task(n, tc) for n, tc in (cfg.tasks or {}).items()], prep)
    stems = None
    if prep.get("per_task"):
        stems = {t: TabularPreprocessor.from_dict(s).out_features for t, s in prep["per_task"].items()}
    model = build_model(cfg, tasks, encoder, stems)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln or "Missing key" in ln
                 or "Unexpected key" in ln]
        shown = "; ".join(lines[:2]) + (f"; and {len(lines) - 2} more" if len(lines) > 2 else "")
        raise CheckpointError(
            f"checkpoint {path} does not fit the model that {run.path / 'config.yaml'} describes "
            f"({shown or str(exc).splitlines()[0]}); expected a checkpoint this run wrote: put the run's own "
            "checkpoints back, or train again") from None
    kwargs = trainer_kwargs(cfg)
    trainer = Trainer(model, tasks, **{**kwargs, "run": cfg.run.model_copy(update={"progress": False}), "callbacks": []})
    return cfg, None, trainer, prep


def evaluate(run_dir: Path, split: str = "test", checkpoint: str = "best", table: Path | None = None
             ) -> dict[str, dict[str, float]]:
    """Metrics per task on a split of the run's data, or on ``table`` (inputs and target columns)."""
    if table is not None or _from_python(run_dir):
        from polytask.runs import load

        if table is None:
            raise ConfigError(f"{run_dir} was trained from Python (model.json, no config.yaml), so its data splits are "
                              "unknown; expected --input FILE: a table with the inputs and each task's target column")
        return load(run_dir, checkpoint).evaluate(data=table)
    cfg, _, trainer, _ = _restore(run_dir, checkpoint)
    loaded, _ = load_data(cfg)
    data = getattr(loaded, split, None)
    if data is None:
        where = "data.files.test" if cfg.data.files is not None else "tasks.NAME.data.test for every task"
        raise ConfigError(f"the run's data has no '{split}' split; expected a test file ({where}, or a bundled dataset): "
                          f"add it to {Path(run_dir) / 'config.yaml'} to evaluate on it, or use --split val")
    data.validate(loaded.tasks, where=f"{split} data")
    return trainer.evaluate(data)


def _shape(shape: Any) -> str:
    return "(N, " + ", ".join(str(d) for d in shape) + ")"


def _read_array(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
        if not isinstance(array, np.ndarray):  # an .npz archive
            raise ValueError("it holds several arrays (.npz); expected one")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))
    except (OSError, ValueError, TypeError, EOFError) as exc:
        raise DataError(f"{path} cannot be read as a .npy array ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "expected one numeric array saved with numpy.save") from None


def predict(run_dir: Path, input_path: Path, output_path: Path | None, checkpoint: str = "best",
            task: str | None = None, id_column: str | None = None, probabilities: bool = False,
            threshold: float = 0.5) -> pd.DataFrame:
    """Predictions for the rows of a table or a .npy array; with ``task``, only that task's.

    The columns are :meth:`polytask.runs.Run.predict`'s: ``id`` (row numbers, or ``id_column``'s
    values), then per task its label (a label name where the run's data had names), value or
    0/1 labels, and the probability columns."""
    if _from_python(run_dir):  # the model from model.json; inputs as Run.predict reads them
        from polytask.runs import load

        out = load(run_dir, checkpoint).predict(input_path, id_column=id_column, task=task, probabilities=probabilities,
                                                threshold=threshold)
        if output_path is not None:
            out.to_csv(output_path, index=False)
        return out
    cfg, _, trainer, prep = _restore(run_dir, checkpoint)
    names = list(trainer.names)
    per_task = prep.get("per_task")
    if task is not None and task not in names:
        raise ConfigError(f"--task '{task}' is not a task of this run.{closest(task, names)} Tasks: {', '.join(names)}")
    if per_task and task is None:
        raise DataError(f"this run has per-task inputs (each of {', '.join(names)} reads its own columns); expected "
                        "--task NAME to say which task's inputs the file holds")
    suffix = input_path.suffix.lower()
    if suffix == ".npy":
        x = _read_array(input_path)
        expected = (prep.get("input_shapes") or {}).get(task or "") if per_task else prep.get("input_shape")
        if expected is None and per_task and task in per_task:
            expected = [TabularPreprocessor.from_dict(per_task[task]).out_features]
        elif expected is None and prep.get("features"):
            expected = [TabularPreprocessor.from_dict(prep["features"]).out_features]
        if expected is not None and list(x.shape[1:]) != list(expected):
            whose = f" of task '{task}'" if per_task else ""
            raise DataError(f"{input_path} holds an array of shape {tuple(x.shape)}; this run's model reads inputs{whose} "
                            f"of shape {_shape(expected)} (N examples): save an array of that shape, or pass the raw "
                            "rows as a CSV/Parquet table")
    elif prep.get("images"):  # a table naming image files, read as in training
        from polytask.data.sources import read_images

        frame = read_table(input_path)
        x = read_images(frame, prep["images"], input_path.parent, str(input_path))
    else:
        state = per_task[task] if per_task else prep.get("features")
        if state is None:
            if not prep:
                raise DataError(f"{Path(run_dir) / 'preprocess.json'} does not exist (the run has not finished), so "
                                "table rows cannot be encoded as in training; expected a finished run: resume it with "
                                "--resume, or pass a .npy array of the encoded inputs")
            shape = prep.get("input_shape")
            shown = f"a .npy file of shape {_shape(shape)}" if shape else "a .npy file of the encoded inputs"
            source = f"data.dataset: {cfg.data.dataset}" if cfg.data.dataset else "its data"
            raise DataError(f"this run's model reads arrays, not table rows ({source}"
                            f"{f', inputs of shape {tuple(shape)} per example' if shape else ''}); expected {shown}: "
                            "save the inputs with numpy.save and pass that file")
        frame = read_table(input_path)
        if id_column is not None and id_column not in frame.columns:
            from polytask.runs import _ids

            _ids(frame, id_column)  # the error naming the columns
        x = TabularPreprocessor.from_dict(state).transform(frame, where=str(input_path))
    try:
        preds = run_outputs(trainer, x, task)
    except (RuntimeError, ShapeError) as exc:
        raise DataError(f"the model cannot read the inputs of {input_path} (shape {tuple(x.shape)}): "
                        f"{str(exc).splitlines()[0]}; expected inputs shaped like the run's training inputs") from None
    from polytask.runs import Run, _ids

    run = Run(Path(run_dir), trainer.model, trainer.tasks, prep, cfg, checkpoint)
    ids = _ids(frame, id_column) if suffix != ".npy" else _ids(x, id_column)
    # with --task, the file holds that task's inputs: other tasks' heads would read them through its stem
    columns: dict[str, Any] = {id_column or "id": ids}
    for name, values in preds.items():
        if task is not None and name != task:
            continue
        columns.update(run._columns(trainer.model.tasks[name], values, probabilities, threshold))
    out = pd.DataFrame(columns)
    if output_path is not None:
        out.to_csv(output_path, index=False)
    return out


def run_outputs(trainer: Trainer, x: Any, task: str | None, batch_size: int = 1024) -> dict[str, Any]:
    """The model's raw outputs per task (values, logits) on the CPU, in batches."""
    trainer.model.eval()
    chunks: dict[str, list[Any]] = {t: [] for t in trainer.names}
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = trainer.model(x[start:start + batch_size].to(trainer.device), task=task)
            for name, value in out.items():
                chunks[name].append(value.float().cpu())
    return {t: torch.cat(v) for t, v in chunks.items() if v}


def _from_python(run_dir: Path) -> bool:
    """A run a Trainer wrote from Python: its model's recipe, no config."""
    return (Path(run_dir) / "model.json").exists() and not (Path(run_dir) / "config.yaml").exists()
