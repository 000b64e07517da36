"""The YAML configuration: a validated schema (unknown keys rejected with the closest name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polytask.config.yaml_io import DuplicateKeyError, UniqueKeyLoader, safe_load_unique
from polytask.core.errors import ConfigError, closest
from polytask.train.options import EngineOptions, HealthOptions, LoopOptions, OptimOptions, RunOptions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Named(BaseModel):
    """A registry entry by name plus its keyword parameters (checked against the entry)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


NAMED_KEYS = {("method",), ("sampler",), ("task_scheduler",), ("model", "encoder")}
"""Keys that take a registry entry, written ``{name: NAME, **params}`` or just ``NAME``."""


def named(value: Any) -> Any:
    """``method: pcgrad`` means ``method: {name: pcgrad}`` (a registry entry with no parameters)."""
    return {"name": value} if isinstance(value, str) else value


class Files(Strict):
    train: Path
    val: Path | None = None
    test: Path | None = None


class ImagesConfig(Strict):
    """Images named in a table's column (see polytask.data.sources)."""

    column: str
    size: list[int] = Field(min_length=2, max_length=2)
    channels: Literal[1, 3] = 3

    @field_validator("size")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"size must be [height, width], positive pixels; found {value}")
        return value


class DataConfig(Strict):
    dataset: str | None = None
    files: Files | None = None
    images: ImagesConfig | None = None
    features: list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.dataset is not None and self.files is not None:
            raise ValueError("give either `dataset` or `files`, not both")
        if self.dataset is None and self.options:
            raise ValueError(f"`options` ({', '.join(map(str, self.options))}) are parameters of a bundled `dataset` "
                             "(see `polytask list datasets`); data from files take none, so they would be ignored: "
                             "remove data.options")
        if self.images is not None and self.files is None:
            raise ValueError("`images` reads image paths from the tables in data.files; give data.files (a CSV/Parquet "
                             "table with the image column and the targets)")
        if self.images is not None and self.features is not None:
            raise ValueError("`features` picks table columns as inputs, but with `images` the images are the inputs: "
                             "remove data.features")
        if self.dataset is not None and self.features is not None:
            raise ValueError(f"`features` picks input columns of data `files`; the bundled dataset '{self.dataset}' "
                             "has its own inputs, so it would be ignored: remove data.features")
        return self


class TaskConfig(Strict):
    kind: Literal["regression", "binary", "multiclass", "multilabel", "segmentation", "dense_regression", "detection",
                  "generation"] | None = None
    target: str | list[str] | None = None  # a column; for multilabel, one 0/1 column per label
    num_classes: int | None = None
    weight: float = Field(1.0, ge=0)
    metrics: list[str] | None = None
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    allow_missing: bool = False
    # regression: learn (y − mean)/std fitted on the training rows; metrics and predictions stay in y's units
    standardize: bool = True
    data: Files | None = None
    loss: str | dict[str, Any] | None = None  # a loss name, or {name: focal, gamma: 2.0}; default per kind


class HeadConfig(Strict):
    hidden: list[int] = Field(default_factory=list)
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelConfig(Strict):
    architecture: str = "hard_sharing"
    encoder: Named | None = None
    head: HeadConfig = Field(default_factory=HeadConfig)
    stem_dim: int = Field(64, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)  # the architecture's keyword parameters

    _encoder_name = field_validator("encoder", mode="before")(named)


class FeatureDistillConfig(Strict):
    weight: float | dict[str, float] = 1.0  # factor of each TASK:feat term (one, or per task)
    lr: float | None = Field(None, gt=0)  # the adaptors' own optimiser settings (default: optim's)
    weight_decay: float | None = Field(None, ge=0)


class DistillConfig(Strict):
    """Knowledge distillation from single-task teachers (see docs/distillation.md)."""

    # None: this run's single_task/ runs (trained first when absent); a folder written by
    # `polytask teachers` (holding single_task/TASK); or {task: run directory}
    teachers: Path | dict[str, Path] | None = None
    tasks: list[str] | None = None  # the tasks to distil (default: every task)
    temperature: float | dict[str, float] = 1.0
    anneal: str | float | dict[str, Any] = "linear"  # λ schedule of λ·y + (1 − λ)·teacher, or a fixed λ
    weight: float | dict[str, float] = 1.0  # factor of each TASK:kd term
    features: FeatureDistillConfig | None = None  # also distil the teachers' representations (adaptors)
    cache: Path | None = None  # default: OUTPUT_DIR/teachers/cache.pt (or the teachers folder's)
    checkpoint: Literal["best", "last"] = "best"


class Config(Strict):
    seed: int = 0
    output_dir: Path = Path("runs/run")
    data: DataConfig
    tasks: dict[str, TaskConfig] | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: Named = Field(default_factory=lambda: Named(name="static"))
    sampler: Named = Field(default_factory=lambda: Named(name="proportional"))
    task_scheduler: Named = Field(default_factory=lambda: Named(name="all"))
    train: LoopOptions = Field(default_factory=LoopOptions)
    optim: OptimOptions = Field(default_factory=OptimOptions)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    health: HealthOptions = Field(default_factory=HealthOptions)
    run: RunOptions = Field(default_factory=RunOptions)
    callbacks: list[Named] = Field(default_factory=list)
    distill: DistillConfig | None = None

    @field_validator("method", "sampler", "task_scheduler", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return named(value)

    @field_validator("callbacks", mode="before")
    @classmethod
    def _named_callbacks(cls, value: Any) -> Any:
        return [named(item) for item in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _task_files(self) -> Config:
        source = "data.files" if self.data.files is not None else "data.dataset" if self.data.dataset else None
        given = [name for name, task in (self.tasks or {}).items() if task.data is not None]
        if source and given:
            raise ValueError(f"tasks.{given[0]}.data: per-task files are read only when `data` has neither `files` nor "
                             f"`dataset`; found {source} too, which gives every task's data (so tasks.{given[0]}.data "
                             "would be ignored): keep one of them")
        if source is None and given:
            tests = [name for name in given if self.tasks[name].data.test is not None]  # type: ignore[index, union-attr]
            if tests and len(tests) != len(given):
                missing = [name for name in given if name not in tests]
                raise ValueError(f"tasks.{tests[0]}.data.test is given but tasks.{missing[0]}.data.test is not; a test "
                                 "split needs a file for every task: add the missing ones or remove the others")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _fields_at(loc: tuple, root: type[BaseModel] | None = None) -> list[str]:
    """Valid keys of the model reached by following ``loc`` from ``root`` (default ``Config``)."""
    model: Any = root or Config
    for part in loc:
        if isinstance(part, int) or model is None:
            return []
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            # a dict of TaskConfig: the key is a task name
            return list(TaskConfig.model_fields) if model is dict else []
        annotation = field.annotation
        model = _model_of(annotation)
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    import typing

    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is dict:
            return dict
        for inner in typing.get_args(arg):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def format_errors(error: ValidationError, root: type[BaseModel] | None = None) -> str:
    """One line per problem; unknown keys with the closest valid key of their section of ``root``
    (default ``Config``)."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "config"
        if item["type"] == "extra_forbidden":
            parent = loc[:-1]
            valid = _fields_at(parent, root) if not (parent[:1] == ("tasks",) and len(parent) == 2) else list(TaskConfig.model_fields)
            lines.append(f"unknown key '{where}'.{closest(str(loc[-1]), valid)} Valid keys here: {', '.join(valid)}")
        else:
            found = item.get("input")
            shown = "" if isinstance(found, dict) or item["type"] == "value_error" else f"; found {found!r}"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{message}{shown}" if not loc else f"{where}: {message}{shown}")  # whole-config checks name their keys
    return "invalid config:\n  " + "\n  ".join(lines)


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as YAML) to the raw config mapping."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=1); found {assignment!r}")
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if isinstance(child, str) and tuple(parts[:depth + 1]) in NAMED_KEYS:  # `method: pcgrad`, then --set method.x=…
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.load(value, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value must be valid YAML; found {value!r} ({exc.__class__.__name__})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                raw: dict[str, Any] | None = None) -> Config:
    """Read YAML (or take ``raw``), apply ``--set`` overrides, validate."""
    raw = read_raw(path, overrides, raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def read_raw(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config mapping of a YAML file (or ``raw``) with the ``--set`` overrides applied, not yet validated."""
    if raw is None:
        if path is None:
            raise ConfigError("no config given")
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            # bytes: PyYAML decodes UTF-8/16 and reports bad bytes; a key given twice is an error
            raw = safe_load_unique(p.read_bytes(), f"config file {p}") or {}
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of keys; found {type(raw).__name__}")
    raw = dict(raw)
    for assignment in overrides:
        set_override(raw, assignment)
    return raw
