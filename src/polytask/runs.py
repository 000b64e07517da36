"""A trained run back in Python: ``polytask.load(run_dir)`` and ``polytask.export(...)``.

>>> run = polytask.load("runs/adult")                  # doctest: +SKIP
>>> run.predict(frame)                                  # doctest: +SKIP
   id  income  income_probability  age_group  age_group_probability
>>> polytask.export(run, "adult.onnx")                  # doctest: +SKIP

A run trained from a YAML config (``polytask train``) is rebuilt from its ``config.yaml``,
``preprocess.json`` and checkpoint the way ``polytask eval``/``predict`` rebuild it (the same
functions, :mod:`polytask.cli.pipeline`). A run written by a :class:`polytask.Trainer` in Python
has no config to rebuild the model from: pass the model, built as it was for training
(``polytask.load(run_dir, model=model)``), and its weights are loaded into it.

This module sits with ``cli`` at the top of the layers: it reads configs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from polytask.config.schema import Config
from polytask.core.errors import ConfigError, DataError, InvalidParameterError, closest
from polytask.core.task import VISION_KINDS, Task
from polytask.data.files import read_table
from polytask.data.tabular import TabularPreprocessor
from polytask.models.base import MultiTaskModel
from polytask.models.encoders import Text
from polytask.models.export import example_input, export_model
from polytask.train.checkpoint import CheckpointError, load_checkpoint
from polytask.train.rundir import RunDir

Inputs = pd.DataFrame | np.ndarray | Tensor | str | Path


class Run:
    """A trained model with everything needed to use it: tasks, preprocessing, label names.

    Attributes:
        path: the run directory. checkpoint: ``best`` or ``last``, the weights loaded.
        model: the :class:`MultiTaskModel` (eval mode) with those weights.
        tasks: the run's :class:`Task` s, in the run's order.
        preprocessing: the run's ``preprocess.json`` (empty for a run without one): how table
            rows become inputs (``features`` or ``per_task``), label names (``labels``), input shape.
        config: the run's resolved config (None for a run trained from Python).
    """

    def __init__(self, path: Path, model: MultiTaskModel, tasks: Sequence[Task], preprocessing: Mapping[str, Any],
                 config: Config | None, checkpoint: str) -> None:
        self.path, self.model, self.tasks = path, model, list(tasks)
        self.preprocessing, self.config, self.checkpoint = dict(preprocessing), config, checkpoint
        self.model.eval()

    # ------------------------------------------------------------------------------ describing
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def labels(self) -> dict[str, list[str] | None]:
        """Per task, the class names the run's targets had (index i is class i), or None (numeric labels)."""
        saved = self.preprocessing.get("labels") or {}
        return {t: saved.get(t) for t in self.task_names}

    @property
    def per_task_inputs(self) -> bool:
        """Whether each task reads its own input columns (a model with per-task stems)."""
        return bool(self.preprocessing.get("per_task")) or bool(len(getattr(self.model, "stems", None) or ()))

    def __repr__(self) -> str:
        tasks = ", ".join(f"{t.name} ({t.kind})" for t in self.tasks)
        arch = getattr(type(self.model), "registry_name", type(self.model).__name__)
        return f"Run('{self.path}', {arch}, tasks: {tasks}, checkpoint={self.checkpoint})"

    # ------------------------------------------------------------------------------- inputs
    def _task_for_inputs(self, task: str | None) -> str | None:
        if task is not None and task not in self.task_names:
            raise ConfigError(f"task '{task}' is not a task of this run.{closest(task, self.task_names)} "
                              f"Tasks: {', '.join(self.task_names)}")
        if self.per_task_inputs and task is None:
            raise DataError(f"this run has per-task inputs (each of {', '.join(self.task_names)} reads its own columns); "
                            "expected task=NAME to say which task's inputs the data hold")
        return task

    def input_shape(self, task: str | None = None) -> list[int] | None:
        """The shape of one encoded input (without the batch dimension), where the run recorded it."""
        prep = self.preprocessing
        if self.per_task_inputs and task is not None:
            shape = (prep.get("input_shapes") or {}).get(task)
            state = (prep.get("per_task") or {}).get(task)
            if shape is None and state:
                shape = [TabularPreprocessor.from_dict(state).out_features]
            return list(shape) if shape is not None else None
        shape = prep.get("input_shape")
        if shape is None and prep.get("features"):
            shape = [TabularPreprocessor.from_dict(prep["features"]).out_features]
        return list(shape) if shape is not None else None

    def _dtype(self) -> torch.dtype:
        return torch.long if any(isinstance(m, Text) for m in self.model.modules()) else torch.float32

    def example(self, task: str | None = None, batch: int = 2) -> Tensor:
        """A batch of placeholder inputs of the run's input shape and dtype (what export traces)."""
        task = self._task_for_inputs(task)
        shape = self.input_shape(task)
        if shape is None:
            return example_input(self.model, task, batch)
        dtype = self._dtype()
        return (torch.ones if dtype == torch.long else torch.zeros)(batch, *shape, dtype=dtype)

    def encode(self, data: Inputs, *, task: str | None = None, id_column: str | None = None) -> Tensor:
        """Model inputs for ``data``: table rows (a DataFrame, or a CSV/Parquet file) through the
        run's preprocessing; an array, tensor or ``.npy`` file of encoded inputs as they are."""
        task = self._task_for_inputs(task)
        base = Path(data).parent if isinstance(data, (str, Path)) else Path.cwd()  # where relative image paths start
        data = _read(data)
        if isinstance(data, pd.DataFrame) and self.preprocessing.get("images"):
            from polytask.data.sources import read_images

            x = read_images(data, self.preprocessing["images"], base, "the input rows")
        elif isinstance(data, pd.DataFrame):
            x = self._encode_frame(data, task, id_column)
        else:
            x = data if isinstance(data, Tensor) else torch.tensor(np.asarray(data))  # a copy: arrays may be read-only
            if x.dim() == 0:
                raise DataError("inputs must hold one row per example; found a single number")
        x = x.to(self._dtype())
        expected = self.input_shape(task)
        if expected is not None and list(x.shape[1:]) != list(expected):
            whose = f" of task '{task}'" if task is not None and self.per_task_inputs else ""
            raise DataError(f"the inputs have shape {tuple(x.shape)}; this run's model reads inputs{whose} of shape "
                            f"(N, {', '.join(map(str, expected))}) (N examples): pass inputs of that shape, or the raw "
                            "table rows as a DataFrame")
        return x

    def _encode_frame(self, frame: pd.DataFrame, task: str | None, id_column: str | None) -> Tensor:
        prep = self.preprocessing
        per_task = prep.get("per_task")
        state = per_task.get(task) if per_task and task is not None else prep.get("features")
        if state:
            return TabularPreprocessor.from_dict(state).transform(frame, where="the input rows")
        if prep and prep.get("input_shape") and len(prep["input_shape"]) != 1:
            raise DataError(f"this run's model reads arrays of shape (N, {', '.join(map(str, prep['input_shape']))}), "
                            "not table rows; expected an array or tensor of encoded inputs")
        # a run without preprocessing (trained from Python on tensors): the numeric columns are the inputs
        values = frame.drop(columns=[id_column]) if id_column is not None and id_column in frame.columns else frame
        wrong = [str(c) for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
        if wrong:
            raise DataError(f"this run has no preprocess.json to encode table columns, so a DataFrame's columns are "
                            f"the model's inputs as they are; found non-numeric column(s) {wrong[:5]}: pass numbers, "
                            "or name the id column with id_column=")
        return torch.from_numpy(values.to_numpy(dtype=np.float32, copy=True))

    # ---------------------------------------------------------------------------- predicting
    def outputs(self, data: Inputs, *, task: str | None = None, batch_size: int = 1024) -> dict[str, Tensor]:
        """The model's raw outputs per task (values, logits) for ``data``, on the CPU."""
        return self._forward(self.encode(data, task=task), task, batch_size)

    def _forward(self, x: Tensor, task: str | None, batch_size: int) -> dict[str, Tensor]:
        if len(x) == 0:
            raise DataError("the inputs have no rows; expected at least one example")
        names = [task] if task is not None else self.task_names
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.model.eval()
        chunks: dict[str, list[Tensor]] = {t: [] for t in names}
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                try:
                    out = self.model(x[start:start + batch_size].to(device), tasks=names, task=task)
                except RuntimeError as exc:  # a run from Python records no input shape: the model finds out
                    raise DataError(f"the model cannot read inputs of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}; "
                                    "expected inputs shaped like the run's training inputs") from None
                for name in names:
                    chunks[name].append(out[name].float().cpu())
        return {t: torch.cat(v) for t, v in chunks.items()}

    def predict(self, data: Inputs, *, id_column: str | None = None, task: str | None = None,
                probabilities: bool = False, threshold: float = 0.5, batch_size: int = 1024) -> pd.DataFrame:
        """Predictions with ids and label names, one row per input row.

        Columns: ``id`` (the DataFrame's index, or row numbers for arrays and files), or the
        column ``id_column`` names, under its own name; then per task:

        * regression: ``TASK``, the predicted value;
        * binary: ``TASK``, the predicted label (a label name from the run's data, else 0/1;
          positive when the probability is at least ``threshold``), and ``TASK_probability``,
          the probability of the positive label (the second label name, in sorted order);
        * multiclass: ``TASK``, the predicted label name (else class index), ``TASK_probability``,
          its probability, and with ``probabilities`` ``TASK_probability_LABEL`` for every class;
        * multilabel: per label (its target column) ``TASK_LABEL`` (0/1) and ``TASK_LABEL_probability``.

        Args:
            data: a DataFrame or a CSV/Parquet file of raw rows (encoded as in training), or an
                array, tensor or ``.npy`` file of encoded inputs.
            id_column: a column of ``data`` that identifies its rows (kept in the output).
            task: for runs with per-task inputs, the task whose inputs ``data`` holds (only its
                predictions are given); otherwise restricts the output to that task.
        """
        frame = _read(data)
        ids = _ids(frame, id_column)
        x = self.encode(frame, task=task, id_column=id_column)
        raw = self._forward(x, task, batch_size)
        columns: dict[str, Any] = {id_column or "id": ids}
        for name, value in raw.items():
            columns.update(self._columns(self.model.tasks[name], value, probabilities, threshold))
        return pd.DataFrame(columns)

    def _columns(self, task: Task, value: Tensor, probabilities: bool, threshold: float) -> dict[str, Any]:
        names = self.labels.get(task.name)
        if task.kind in VISION_KINDS:  # one JSON value per image: its detections, or its map
            return {task.name: _vision_cells(task, value)}
        if task.kind == "regression":
            return {task.name: task.predict(value).numpy()}  # in the target's units
        if task.kind == "binary":
            p = torch.sigmoid(value)
            positive = (p >= threshold).long().numpy()
            label = np.asarray(names, dtype=object)[positive] if names else positive
            return {task.name: label, f"{task.name}_probability": p.numpy()}
        if task.kind == "multiclass":
            p = torch.softmax(value, dim=-1)
            best, index = p.max(dim=-1)
            classes = names or list(range(task.out_features))
            out: dict[str, Any] = {task.name: np.asarray(classes, dtype=object)[index.numpy()] if names else index.numpy(),
                                   f"{task.name}_probability": best.numpy()}
            if probabilities:
                out.update({f"{task.name}_probability_{c}": p[:, j].numpy() for j, c in enumerate(classes)})
            return out
        p = torch.sigmoid(value)  # multilabel: one 0/1 label per target column
        labels = list(task.target) if isinstance(task.target, tuple) else list(range(task.out_features))
        out = {}
        for j, label in enumerate(labels):
            out[f"{task.name}_{label}"] = (p[:, j] >= threshold).long().numpy()
            out[f"{task.name}_{label}_probability"] = p[:, j].numpy()
        return out

    def evaluate(self, split: str = "test", *, data: pd.DataFrame | str | Path | None = None,
                 batch_size: int = 1024) -> dict[str, dict[str, float]]:
        """Metrics per task (what ``polytask eval`` prints): on a split of the run's data (runs
        trained from a config), or on ``data``, a table of raw input rows with each task's target
        column (``Task.target``, else the task's name; multilabel: its label columns), in the
        target's own units and label names."""
        if data is None:
            if self.config is None:
                raise ConfigError(f"{self.path} has no config.yaml (a run trained from Python), so its data splits are "
                                  "unknown; expected data=: a table with the inputs and each task's target column "
                                  "(polytask eval RUN_DIR --input FILE)")
            from polytask.cli.pipeline import evaluate

            return evaluate(self.path, split, self.checkpoint)
        from polytask.data.dataset import MultiOutputDataset
        from polytask.data.files import targets_from
        from polytask.train.trainer import Trainer

        frame = _read(data)
        if not isinstance(frame, pd.DataFrame):
            raise DataError("evaluation data must be a table (DataFrame, CSV or Parquet) holding the inputs and each "
                            f"task's target column; found {type(frame).__name__}")
        if self.per_task_inputs:
            raise DataError("this run has per-task inputs; evaluate each task on its own table with "
                            "polytask.Trainer(...).evaluate, or evaluate a run trained from a config by its split")
        where = str(data) if isinstance(data, (str, Path)) else "the evaluation rows"
        targets, masks, columns = {}, {}, []
        for task in self.tasks:
            column = task.target or task.name
            columns += list(column) if isinstance(column, tuple) else [column]
            y, mask = targets_from(frame, task, column, self.labels.get(task.name), True, where)
            if task.target_scaling is not None:
                mean, std = task.target_scaling
                y = (y.double() - mean) / std
            targets[task.name] = y.float()
            if mask is not None and not bool(mask.all()):
                masks[task.name] = mask
        x = self.encode(frame.drop(columns=[c for c in columns if c in frame.columns]))
        trainer = Trainer(self.model, self.tasks, loop={"batch_size": batch_size}, run={"progress": False})
        return trainer.evaluate(MultiOutputDataset(x, targets, masks))

    def export(self, path: str | Path, format: str | None = None, **options: Any) -> Path:
        """:func:`export` this run (its labels and preprocessing go into the file's metadata)."""
        return export(self, path, format, **options)


def _read(data: Inputs) -> pd.DataFrame | np.ndarray | Tensor:
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.suffix.lower() == ".npy":
            from polytask.cli.pipeline import _read_array

            return _read_array(path)
        return read_table(path)
    if not isinstance(data, (pd.DataFrame, np.ndarray, Tensor)):
        raise DataError(f"inputs must be a DataFrame, an array, a tensor or a file path; found {type(data).__name__}")
    return data


def _ids(data: pd.DataFrame | np.ndarray | Tensor, id_column: str | None) -> np.ndarray:
    if not isinstance(data, pd.DataFrame):
        if id_column is not None:
            raise DataError(f"id_column='{id_column}' names a column, but the inputs are an array without columns; "
                            "expected a DataFrame (or a CSV/Parquet file) holding that column")
        return np.arange(len(data))
    if id_column is None:
        return data.index.to_numpy()
    if id_column not in data.columns:
        names = [str(c) for c in data.columns]
        raise DataError(f"id_column '{id_column}' is not a column of the inputs.{closest(id_column, names)} "
                        f"Columns: {', '.join(names[:20])}")
    return data[id_column].to_numpy()


def load(run_dir: str | Path, checkpoint: str = "best", *, model: MultiTaskModel | None = None) -> Run:
    """Load a trained run: its model with the ``best`` (or ``last``) weights, tasks and preprocessing.

    Args:
        run_dir: the run directory (``output_dir`` of the config or the Trainer).
        checkpoint: ``best`` (the weights of the best monitored epoch) or ``last``.
        model: for a run trained from Python (no ``config.yaml``), the model built as it was for
            training; the checkpoint's weights are loaded into it. With a config, None rebuilds it.
    """
    path = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise InvalidParameterError(f"checkpoint must be 'best' or 'last'; found {checkpoint!r}")
    if not path.is_dir():
        raise ConfigError(f"run directory {path} does not exist; expected the output_dir of a finished run")
    if model is None and not (path / "config.yaml").exists():
        recipe = path / "model.json"
        if not recipe.exists():
            raise ConfigError(f"{path} has neither config.yaml nor model.json (a run trained in Python with a model that is "
                              "not made of registered polytask parts only), so the model cannot be rebuilt from it; "
                              "expected the model built as for training: polytask.load(run_dir, model=model)")
        from polytask.models.spec import build_from_spec

        try:
            spec = json.loads(recipe.read_text())
        except ValueError as exc:
            raise ConfigError(f"{recipe} is not valid JSON ({exc}); expected the recipe the Trainer wrote") from None
        model = build_from_spec(spec)  # type: ignore[assignment]
    if model is None:
        from polytask.cli.pipeline import _restore

        cfg, _, trainer, prep = _restore(path, checkpoint)
        return Run(path, trainer.model, trainer.tasks, prep, cfg, checkpoint)
    if not isinstance(model, MultiTaskModel):
        raise InvalidParameterError(f"model must be a polytask MultiTaskModel; found {type(model).__name__}")
    run = RunDir(path)
    file = run.best if checkpoint == "best" else run.last
    state = load_checkpoint(file)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln or "Missing key" in ln
                 or "Unexpected key" in ln]
        raise CheckpointError(f"checkpoint {file} does not fit the model given ({'; '.join(lines[:2]) or str(exc)}); "
                              "expected the model built as it was for this run") from None
    prep_path = path / "preprocess.json"
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    tasks = [model.tasks[n] for n in model.task_names]
    return Run(path, model, tasks, prep, None, checkpoint)


def export(run_or_model: Run | MultiTaskModel | str | Path, path: str | Path, format: str | None = None, *,
           example: Tensor | None = None, task: str | None = None, checkpoint: str = "best", verify: bool = True,
           opset: int | None = None) -> Path:
    """Write a trained model to ``path`` as ONNX, TorchScript or safetensors; returns the path.

    Args:
        run_or_model: a :class:`Run` (from :func:`load`), a run directory (loaded with
            ``checkpoint``) or a :class:`MultiTaskModel`.
        path: the file to write. format: ``onnx``, ``torchscript`` or ``safetensors``; None: from
            the suffix of ``path`` (``.onnx``, ``.pt``/``.ts``, ``.safetensors``), else ONNX.
        example: a batch (≥ 2) of encoded inputs to trace with (default: placeholders of the
            run's input shape); its shape except the batch dimension is fixed in the file.
        task: for runs with per-task inputs, the task whose inputs (and output) to export.
        verify: run the written ONNX/TorchScript file on a batch of another size against the
            PyTorch model; an :class:`ExportError` if they differ.

    ONNX: input ``input``, one output per task named after it (the model's raw outputs: values
    or logits), a free batch dimension. TorchScript: ``forward(x) -> {task: output}``.
    safetensors: the state dict; :func:`polytask.models.export.load_weights` loads it into a
    freshly built model. Each file carries a JSON description (tasks, input, outputs; for a run
    also label names and preprocessing). Needs ``pip install 'polytask[export]'``.
    """
    if isinstance(run_or_model, (str, Path)):
        run_or_model = load(run_or_model, checkpoint)
    if isinstance(run_or_model, Run):
        run = run_or_model
        task = run._task_for_inputs(task)
        metadata = {"run": str(run.path), "checkpoint": run.checkpoint, "labels": run.labels,
                    "preprocess": run.preprocessing}
        return export_model(run.model, path, format, example=run.example(task) if example is None else example,
                            task=task, metadata=metadata, verify=verify, opset=opset)
    if isinstance(run_or_model, MultiTaskModel):
        return export_model(run_or_model, path, format, example=example, task=task, verify=verify, opset=opset)
    raise InvalidParameterError(f"export needs a loaded run, a run directory or a MultiTaskModel; found "
                                f"{type(run_or_model).__name__}")

def _vision_cells(task: Task, value: Tensor) -> list[str]:
    """Per image, detection: ``[[x1, y1, x2, y2, score, class], ...]`` (best first); segmentation:
    the class map as nested lists (rows); dense_regression: the value map, 4 decimals."""
    found = task.predict(value)
    if task.kind == "detection":
        return [json.dumps([[round(v, 2) for v in row[:5]] + [int(row[5])] for row in image if row[5] >= 0])
                for image in found.tolist()]
    if task.kind == "segmentation":
        return [json.dumps(image) for image in found.tolist()]
    return [json.dumps(image) for image in found.round(decimals=4).tolist()]
