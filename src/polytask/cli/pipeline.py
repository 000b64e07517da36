"""From a Config to finished runs: single-task baselines, the multi-task run, evaluation, prediction."""

from __future__ import annotations

import json
import math
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
from polytask.core.errors import ConfigError, DataError
from polytask.data.files import read_table
from polytask.data.tabular import TabularPreprocessor
from polytask.datasets import LoadedData
from polytask.train.checkpoint import load_checkpoint
from polytask.train.rundir import RunDir
from polytask.train.trainer import Trainer


def resolved(cfg: Config, loaded: LoadedData, encoder: dict[str, Any]) -> Config:
    """The config with everything the data decided written out (tasks, encoder sizes)."""
    tasks = {t.name: TaskConfig(kind=t.kind, target=t.target, num_classes=t.num_classes, weight=t.weight,
                                metrics=list(t.metric_names), lr=t.lr, weight_decay=t.weight_decay,
                                allow_missing=(cfg.tasks or {}).get(t.name, TaskConfig()).allow_missing,
                                data=(cfg.tasks or {}).get(t.name, TaskConfig()).data)
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
    return loaded, encoder, prep.to_dict(), resolved(cfg, loaded, encoder)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, baselines: bool = False,
          single_task_only: bool = False) -> dict[str, Any]:
    """Run what `polytask train` runs; returns the multi-task summary (or the baselines')."""
    loaded, encoder, prep, full = prepare(cfg)
    stems = loaded.encoder.get("_stems")
    kwargs = trainer_kwargs(cfg)
    # Build and check the multi-task trainer once with nothing written, so that every error in
    # the config or data (encoder or method parameters, monitor, task names) comes before any
    # file of an existing run is touched.
    Trainer(build_model(cfg, loaded.tasks, encoder, stems), loaded.tasks, **kwargs).check(
        loaded.train, loaded.val, loaded.test)
    run = RunDir(cfg.output_dir)
    run.check(resume=resume, overwrite=overwrite)
    if overwrite:
        run.clear()
    stl: dict[str, dict[str, float]] = {}
    if baselines or single_task_only:
        for task in loaded.tasks:
            sub = RunDir(cfg.output_dir / "single_task" / task.name)
            if resume and (sub.path / "summary.json").exists():
                saved = json.loads((sub.path / "summary.json").read_text())["tasks"][task.name]
                stl[task.name] = {k: math.nan if v is None else v for k, v in saved.items()}  # strict JSON: null = NaN
                continue
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, [task], encoder, {task.name: stems[task.name]} if stems else None)
            monitor = cfg.train.monitor if cfg.train.monitor.split("/")[0] in ("loss", task.name) else "loss"
            single = {**kwargs, "method": "equal", "loop": cfg.train.model_copy(update={"monitor": monitor})}
            trainer = Trainer(model, [task], **single, output_dir=sub.path, resume=resume and sub.last.exists())
            report = trainer.fit(restrict(loaded.train, task.name), restrict(loaded.val, task.name),
                                 restrict(loaded.test, task.name))
            stl[task.name] = report.metrics[task.name]
        if single_task_only:
            return {"baselines": stl}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, loaded.tasks, encoder, stems)
    trainer = Trainer(model, loaded.tasks, **kwargs, baselines=stl or None, output_dir=cfg.output_dir,
                      resume=resume, config_text=full.to_yaml())
    report = trainer.fit(loaded.train, loaded.val, loaded.test)
    run.write_json("preprocess.json", prep)
    return report.summary


def _restore(run_dir: Path, checkpoint: str) -> tuple[Config, LoadedData | None, Trainer, dict[str, Any]]:
    run = RunDir(run_dir)
    if not (run.path / "config.yaml").exists():
        raise ConfigError(f"{run.path} is not a polytask run directory (no config.yaml)")
    cfg = load_config(run.path / "config.yaml")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last; found {checkpoint!r}")
    state = load_checkpoint(run.best if checkpoint == "best" else run.last)
    from polytask.config.build import _task

    tasks = [_task(n, tc) for n, tc in (cfg.tasks or {}).items()]
    assert cfg.model.encoder is not None
    encoder = {"name": cfg.model.encoder.name, **cfg.model.encoder.params}
    prep_path = run.path / "preprocess.json"
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    stems = None
    if prep.get("per_task"):
        stems = {t: TabularPreprocessor.from_dict(s).out_features for t, s in prep["per_task"].items()}
    model = build_model(cfg, tasks, encoder, stems)
    model.load_state_dict(state["model"])
    kwargs = trainer_kwargs(cfg)
    trainer = Trainer(model, tasks, **{**kwargs, "run": cfg.run.model_copy(update={"progress": False}), "callbacks": []})
    return cfg, None, trainer, prep


def evaluate(run_dir: Path, split: str = "test", checkpoint: str = "best") -> dict[str, dict[str, float]]:
    cfg, _, trainer, _ = _restore(run_dir, checkpoint)
    loaded, _ = load_data(cfg)
    data = getattr(loaded, split, None)
    if data is None:
        raise ConfigError(f"the run's data has no '{split}' split")
    data.validate(loaded.tasks, where=f"{split} data")
    return trainer.evaluate(data)


def predict(run_dir: Path, input_path: Path, output_path: Path | None, checkpoint: str = "best",
            task: str | None = None) -> pd.DataFrame:
    cfg, _, trainer, prep = _restore(run_dir, checkpoint)
    suffix = input_path.suffix.lower()
    if suffix == ".npy":
        x = torch.from_numpy(np.load(input_path, allow_pickle=False)).float()
    else:
        frame = read_table(input_path)
        state = prep.get("features") or (prep.get("per_task") or {}).get(task or "")
        if state is None:
            raise DataError("this run has per-task inputs: pass --task to say which task's columns the file has")
        x = TabularPreprocessor.from_dict(state).transform(frame, where=str(input_path))
    preds = trainer.predict(x, task=task)
    labels = prep.get("labels") or {}
    columns: dict[str, Any] = {}
    for name, values in preds.items():
        if values.dim() == 2:
            for j in range(values.shape[1]):
                columns[f"{name}_{j}"] = values[:, j].numpy()
        elif labels.get(name) and trainer.model.tasks[name].kind == "multiclass":
            columns[name] = [labels[name][int(i)] for i in values]
        else:
            columns[name] = values.numpy()
    out = pd.DataFrame(columns)
    if output_path is not None:
        out.to_csv(output_path, index=False)
    return out
