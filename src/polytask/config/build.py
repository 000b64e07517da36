"""Turn a validated Config into data, tasks, a model and Trainer arguments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from polytask.config.schema import Config, Files, TaskConfig
from polytask.core.errors import ConfigError, DataError, InvalidParameterError, closest
from polytask.core.losses import LOSSES
from polytask.core.task import Task, infer_num_classes, standardize_targets
from polytask.data.dataset import MultiOutputDataset, TaskDatasets
from polytask.data.files import infer_classes_from_column, label_vocabulary, read_table, table_dataset
from polytask.data.samplers import SAMPLERS
from polytask.data.sources import is_array_source
from polytask.data.tabular import TabularPreprocessor
from polytask.datasets import DATASETS, LoadedData
from polytask.datasets.base import split_indices
from polytask.methods.base import METHODS
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.encoders import ENCODERS
from polytask.scheduling import TASK_SCHEDULERS
from polytask.train.callbacks import CALLBACKS
from polytask.train.callbacks.base import callback_class
from polytask.train.trainer import resolve_device

ARCHITECTURE_RESERVED = ("encoder", "encoder_factory", "tasks", "heads", "stems", "head_hidden", "head_dropout")
"""Architecture parameters the builder fills from other config keys (not from model.options)."""


@dataclass
class Preprocessing:
    """How raw inputs become tensors, saved as preprocess.json in the run directory."""

    features: dict[str, Any] | None  # TabularPreprocessor state (one for all tasks)
    per_task: dict[str, dict[str, Any]] | None = None
    labels: dict[str, list[str] | None] | None = None
    targets: dict[str, list[float]] | None = None  # (mean, std) of standardised regression targets
    images: dict[str, Any] | None = None  # data.images: the column naming image files, their size and channels

    def to_dict(self) -> dict[str, Any]:
        out = {"features": self.features, "per_task": self.per_task, "labels": self.labels, "targets": self.targets}
        return out | ({"images": self.images} if self.images is not None else {})


def check_registries(cfg: Config) -> None:
    """Fail early, before any file is touched, on unknown names and parameters."""
    for registry, block, reserved in ((METHODS, cfg.method, ()), (SAMPLERS, cfg.sampler, ()),
                                      (TASK_SCHEDULERS, cfg.task_scheduler, ())):
        registry.get(block.name)
        registry.check_params(block.name, block.params, reserved)
    for callback in cfg.callbacks:  # a registered name, or a user's class by import path (module:Class)
        callback_class(callback.name)
        if ":" not in callback.name:
            CALLBACKS.check_params(callback.name, callback.params)
    check_device(cfg.run.device)
    for name, tc in (cfg.tasks or {}).items():
        if tc.loss is not None:  # the name and parameters; whether it fits the kind is checked when the task is built
            try:
                loss, params = LOSSES.split(tc.loss, name)
                LOSSES.entry(loss)
                LOSSES.check_params(loss, params, name)
            except InvalidParameterError as exc:
                raise ConfigError(f"tasks.{name}.loss: {exc}") from None
    ARCHITECTURES.check_params(cfg.model.architecture, cfg.model.options, ARCHITECTURE_RESERVED)
    if cfg.model.encoder is not None:
        ENCODERS.get(cfg.model.encoder.name)
    if cfg.data.dataset is not None:
        DATASETS.get(cfg.data.dataset)
    elif cfg.data.files is None and not (cfg.tasks and all(t.data for t in cfg.tasks.values())):
        raise ConfigError("data: give `dataset` (a bundled name), `files`, or `data` for every task")


def check_device(device: str) -> None:
    """``train.device``: ``auto`` or a torch device string whose backend is available here."""
    try:
        resolve_device(device)
    except InvalidParameterError as exc:
        raise ConfigError(f"run.device: {exc}") from None


def _task(name: str, tc: TaskConfig, base: Task | None = None, train: pd.DataFrame | None = None) -> Task:
    kind = tc.kind or (base.kind if base else None)
    if kind is None:
        raise ConfigError(f"tasks.{name}.kind is required (regression, binary, multiclass or multilabel)")
    if base is not None and tc.kind is not None and tc.kind != base.kind:
        raise ConfigError(f"tasks.{name}.kind: the bundled task is {base.kind}; found {tc.kind}")
    num_classes = tc.num_classes if tc.num_classes is not None else (base.num_classes if base else None)
    target: str | tuple[str, ...] = tc.target if isinstance(tc.target, str) else tuple(tc.target or ()) or name
    if isinstance(target, tuple):
        if kind != "multilabel":
            raise ConfigError(f"tasks.{name}.target: a list of columns is only for multilabel tasks; {name} is {kind}")
        if num_classes is not None and num_classes != len(target):
            raise ConfigError(f"tasks.{name}.num_classes is {num_classes} but `target` lists {len(target)} columns")
        num_classes = len(target)
    elif kind == "multilabel" and base is None:
        raise ConfigError(f"tasks.{name}.target: a multilabel task reads one 0/1 column per label; "
                          "give the list of columns, e.g. target: [label_a, label_b]")
    if kind == "multiclass" and num_classes is None and train is not None and isinstance(target, str):
        num_classes = infer_classes_from_column(train, name, target)  # logged on the `polytask` logger
    metrics = tuple(tc.metrics) if tc.metrics else (base.metrics if base else None)
    loss = tc.loss if tc.loss is not None else (base.loss if base else None)
    return Task(name, kind=kind, num_classes=num_classes, weight=tc.weight, metrics=metrics, lr=tc.lr,
                weight_decay=tc.weight_decay, target=target, loss=loss,
                size=base.size if base is not None else None)  # a bundled vision task's image size


def load_data(cfg: Config) -> tuple[LoadedData, Preprocessing]:
    """The data and tasks a config describes, regression targets standardised on the training
    rows (``tasks.NAME.standardize``, on by default; the scaling is kept in preprocess.json)."""
    loaded, prep = _load_data(cfg)
    wanted = [t for t in loaded.tasks if (cfg.tasks or {}).get(t.name, TaskConfig()).standardize]
    scaled = {t.name: t for t in standardize_targets(wanted, loaded.train, loaded.val, loaded.test)}
    loaded.tasks = [scaled.get(t.name, t) for t in loaded.tasks]
    prep.targets = {t.name: list(t.target_scaling) for t in loaded.tasks if t.target_scaling is not None} or None
    return loaded, prep


def apply_target_scaling(tasks: list[Task], prep: dict[str, Any]) -> list[Task]:
    """The tasks of a saved run with the target scaling its preprocess.json recorded."""
    import dataclasses

    saved = prep.get("targets") or {}
    return [dataclasses.replace(t, target_scaling=tuple(saved[t.name])) if t.name in saved else t for t in tasks]


def _load_data(cfg: Config) -> tuple[LoadedData, Preprocessing]:
    if cfg.data.dataset is not None:
        names = list(cfg.tasks) if cfg.tasks else None
        options = dict(cfg.data.options)
        DATASETS.check_params(cfg.data.dataset, options, ())
        loaded = DATASETS.create(cfg.data.dataset, tasks=names, seed=cfg.seed, **options)
        if cfg.tasks:
            loaded.tasks = [_task(t.name, cfg.tasks[t.name], t) for t in loaded.tasks]
        return loaded, Preprocessing(loaded.preprocessor)
    if not cfg.tasks:
        raise ConfigError("`tasks` are required when data come from files (name, kind and target column)")
    if cfg.data.files is not None:
        return _from_files(cfg, cfg.data.files)
    return _from_task_files(cfg)


def _splits(cfg: Config, files: Files) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    train = read_table(files.train)
    test = read_table(files.test) if files.test else None
    if files.val is not None:
        return train, read_table(files.val), test
    tr, va, _ = split_indices(len(train), (cfg.data.val_fraction, 0.0), cfg.seed, source=f"data file {files.train}")
    return train.iloc[tr.numpy()], train.iloc[va.numpy()], test


def _feature_columns(cfg: Config, frame: pd.DataFrame, targets: list[str]) -> list[str]:
    if cfg.data.features is not None:
        return list(cfg.data.features)
    return [c for c in frame.columns if c not in targets]


def _from_arrays(cfg: Config, files: Files) -> tuple[LoadedData, Preprocessing]:
    """``data.files`` naming .npz files (or folders of .npy files): inputs under ``x``, a target array per task."""
    from polytask.data.sources import arrays_dataset, read_arrays

    assert cfg.tasks is not None
    for split in ("val", "test"):
        other = getattr(files, split)
        if other is not None and not is_array_source(other):
            raise ConfigError(f"data.files.train is NumPy arrays ({files.train}) but data.files.{split} is {other}; "
                              "expected the same kind of source for every split")
    arrays = read_arrays(files.train)
    if "x" not in arrays:
        raise DataError(f"{files.train} has no array 'x' (found {', '.join(arrays) or 'none'}); expected the inputs "
                        "under 'x'")
    tasks = []
    for name, tc in cfg.tasks.items():
        key = tc.target if isinstance(tc.target, str) else name
        if key not in arrays:
            raise DataError(f"{files.train} has no array '{key}' for task '{name}' (found {', '.join(arrays)}); "
                            "expected one array per task, under its target name")
        if tc.kind == "multiclass" and tc.num_classes is None:
            known = arrays[key][~np.isnan(arrays[key])] if np.issubdtype(arrays[key].dtype, np.floating) else arrays[key]
            tc = tc.model_copy(update={"num_classes": infer_num_classes(name, known, f"{files.train}:{key}")})
        tasks.append(_task(name, tc))
    missing = {name: tc.allow_missing for name, tc in cfg.tasks.items()}
    train = arrays_dataset(arrays, tasks, missing, str(files.train))
    if files.val is not None:
        val = arrays_dataset(read_arrays(files.val), tasks, missing, str(files.val))
    else:
        tr, va, _ = split_indices(len(train), (cfg.data.val_fraction, 0.0), cfg.seed, source=f"data file {files.train}")
        train, val = train.subset(tr), train.subset(va)
    test = arrays_dataset(read_arrays(files.test), tasks, missing, str(files.test)) if files.test else None
    shape = tuple(train.x.shape[1:])
    encoder = ({"name": "cnn", "in_channels": shape[0]} if len(shape) == 3 else
               {"name": "mlp", "in_features": int(np.prod(shape)), "hidden": [128, 64]})
    return LoadedData("arrays", tasks, train, val, test, None, encoder), Preprocessing(None)


def _from_files(cfg: Config, files: Files) -> tuple[LoadedData, Preprocessing]:
    assert cfg.tasks is not None
    if is_array_source(files.train):
        if cfg.data.images is not None or cfg.data.features is not None:
            raise ConfigError(f"data.files.train is NumPy arrays ({files.train}): the inputs are its 'x' array, so "
                              "data.images and data.features do not apply; remove them")
        return _from_arrays(cfg, files)
    if cfg.data.images is not None:
        return _from_image_table(cfg, files)
    train, val, test = _splits(cfg, files)
    tasks = [_task(name, tc, train=train) for name, tc in cfg.tasks.items()]  # num_classes inferred from `train`
    columns = {t.name: t.target or t.name for t in tasks}
    used = [c for cols in columns.values() for c in ([cols] if isinstance(cols, str) else cols)]
    prep = TabularPreprocessor.fit(train, _feature_columns(cfg, train, used))
    labels = {t.name: label_vocabulary(train, t, columns[t.name]) for t in tasks}
    missing = {name: tc.allow_missing for name, tc in cfg.tasks.items()}
    build = lambda frame, where: table_dataset(frame, tasks, columns, prep, labels, missing, where)  # noqa: E731
    tasks = _with_inferred_classes(tasks, labels)
    loaded = LoadedData("files", tasks, build(train, str(files.train)), build(val, "validation data"),
                        build(test, str(files.test)) if test is not None else None, prep.to_dict(),
                        {"name": "mlp", "in_features": prep.out_features, "hidden": [128, 64]})
    return loaded, Preprocessing(prep.to_dict(), labels=labels)


def _from_image_table(cfg: Config, files: Files) -> tuple[LoadedData, Preprocessing]:
    """Tables whose ``data.images.column`` names image files: the images are the inputs."""
    from polytask.data.sources import check_image_spec, read_images

    assert cfg.tasks is not None and cfg.data.images is not None
    spec = check_image_spec(cfg.data.images.model_dump())
    train, val, test = _splits(cfg, files)
    tasks = [_task(name, tc, train=train) for name, tc in cfg.tasks.items()]
    columns = {t.name: t.target or t.name for t in tasks}
    labels = {t.name: label_vocabulary(train, t, columns[t.name]) for t in tasks}
    missing = {name: tc.allow_missing for name, tc in cfg.tasks.items()}
    tasks = _with_inferred_classes(tasks, labels)

    def build(frame: pd.DataFrame, source: Path, where: str) -> Any:
        images = read_images(frame, spec, Path(source).parent, where)
        return table_dataset(frame, tasks, columns, None, labels, missing, where, x=images)

    loaded = LoadedData("image_table", tasks, build(train, files.train, str(files.train)),
                        build(val, files.val or files.train, "validation data"),
                        build(test, files.test, str(files.test)) if test is not None and files.test else None, None,
                        {"name": "cnn", "in_channels": spec["channels"]})
    return loaded, Preprocessing(None, labels=labels, images=spec)


def _from_task_files(cfg: Config) -> tuple[LoadedData, Preprocessing]:
    assert cfg.tasks is not None
    train_sets, val_sets, test_sets, per_task, labels = {}, {}, {}, {}, {}
    tasks: list[Task] = []
    for name, tc in cfg.tasks.items():
        files = tc.data
        if files is None:
            raise ConfigError(f"tasks.{name}.data is required when tasks have their own data sets")
        train, val, test = _splits(cfg, files)
        task = _task(name, tc, train=train)  # num_classes inferred from this task's own training data
        tasks.append(task)
        column = task.target or task.name
        prep = TabularPreprocessor.fit(train, _feature_columns(cfg, train, [column] if isinstance(column, str) else list(column)))
        labels[task.name] = label_vocabulary(train, task, column)
        allow = {task.name: cfg.tasks[task.name].allow_missing}
        train_sets[task.name] = table_dataset(train, [task], {task.name: column}, prep, labels, allow, str(files.train))
        val_sets[task.name] = table_dataset(val, [task], {task.name: column}, prep, labels, allow, f"validation data of '{task.name}'")
        if test is not None:  # the schema asks for a test file for every task or for none
            test_sets[task.name] = table_dataset(test, [task], {task.name: column}, prep, labels, allow, str(files.test))
        per_task[task.name] = prep.to_dict()
    tasks = _with_inferred_classes(tasks, labels)
    widths = {name: TabularPreprocessor.from_dict(s).out_features for name, s in per_task.items()}
    loaded = LoadedData("task_files", tasks, TaskDatasets(train_sets), TaskDatasets(val_sets),
                        TaskDatasets(test_sets) if test_sets else None, None,
                        {"name": "mlp", "in_features": cfg.model.stem_dim, "hidden": [128, 64], "_stems": widths})
    return loaded, Preprocessing(None, per_task=per_task, labels=labels)


def _with_inferred_classes(tasks: list[Task], labels: dict[str, list[str] | None]) -> list[Task]:
    out = []
    for t in tasks:
        vocab = labels.get(t.name)
        if t.kind == "binary" and vocab is not None and len(vocab) != 2:
            raise DataError(f"binary task '{t.name}' has {len(vocab)} distinct labels {vocab[:5]}; expected 2")
        out.append(t)
    return out


def encoder_spec(cfg: Config, loaded: LoadedData) -> dict[str, Any]:
    """The encoder's name and parameters: the data's default, updated with the config's."""
    default = {k: v for k, v in loaded.encoder.items() if not k.startswith("_")}
    if cfg.model.encoder is None:
        return default
    spec = {"name": cfg.model.encoder.name, **cfg.model.encoder.params}
    if spec["name"] == default.get("name"):
        spec = {**default, **spec}
    elif spec["name"] == "mlp":
        spec.setdefault("in_features", int(torch.tensor(loaded.input_shape).prod()))
    elif spec["name"] in ("cnn", "resnet") and len(loaded.input_shape) == 3:
        spec.setdefault("in_channels", loaded.input_shape[0])
    elif spec["name"] == "cnn_map" and len(loaded.input_shape) == 3:  # the feature map's size follows the images'
        spec.setdefault("in_channels", loaded.input_shape[0])
        spec.setdefault("image_size", list(loaded.input_shape[1:]))
    return spec


def build_model(cfg: Config, tasks: list[Task], encoder: dict[str, Any], stems: dict[str, int] | None = None
                ) -> MultiTaskModel:
    params = {k: v for k, v in encoder.items() if k != "name"}
    name = cfg.model.architecture
    ARCHITECTURES.check_params(name, cfg.model.options, ARCHITECTURE_RESERVED)
    accepted = ARCHITECTURES.parameters(name)
    kwargs: dict[str, Any] = {"tasks": tasks, **cfg.model.options}
    ENCODERS.check_params(encoder["name"], params)
    required = [k for k, p in ENCODERS.parameters(encoder["name"]).items() if p.default is p.empty and k not in params]
    if required:
        raise ConfigError(
            f"encoder '{encoder['name']}' needs {', '.join(required)}, which these data do not provide; set them under "
            "model.encoder (for `tabular` on adult: data.options.encoding: codes gives its columns)")
    if "encoder_factory" in accepted:  # several copies of the encoder (towers, columns, experts)
        kwargs["encoder_factory"] = lambda: ENCODERS.create(encoder["name"], **params)
    else:
        kwargs["encoder"] = ENCODERS.create(encoder["name"], **params)
    for key, value in (("head_hidden", cfg.model.head.hidden), ("head_dropout", cfg.model.head.dropout)):
        if key in accepted:
            kwargs[key] = value
    if stems:
        if "stems" not in accepted:
            raise ConfigError(f"architecture '{name}' takes one input for all tasks; tasks with their own input "
                              "columns (per-task stems) need architecture: hard_sharing")
        kwargs["stems"] = {t: nn.Linear(width, cfg.model.stem_dim) for t, width in stems.items()}
    return ARCHITECTURES.get(name)(**kwargs)


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The Trainer's arguments: the config's sections, passed as the validated objects they are."""
    return dict(method={"name": cfg.method.name, **cfg.method.params},
                sampler={"name": cfg.sampler.name, **cfg.sampler.params},
                task_scheduler={"name": cfg.task_scheduler.name, **cfg.task_scheduler.params},
                loop=cfg.train, optim=cfg.optim, engine=cfg.engine, health=cfg.health, run=cfg.run,
                callbacks=[{"name": c.name, **c.params} for c in cfg.callbacks], seed=cfg.seed)


def restrict(data: MultiOutputDataset | TaskDatasets | None, task: str) -> MultiOutputDataset | TaskDatasets | None:
    """The same data with only one task's targets (for single-task baselines)."""
    if data is None:
        return None
    if isinstance(data, TaskDatasets):
        return TaskDatasets({task: data.datasets[task]})
    masks = {task: data.masks[task]} if task in data.masks else None
    return MultiOutputDataset(data.x, {task: data.targets[task]}, masks)


def unknown_task(name: str, tasks: list[Task]) -> ConfigError:
    names = [t.name for t in tasks]
    return ConfigError(f"unknown task '{name}'.{closest(name, names)} Tasks: {', '.join(names)}")
