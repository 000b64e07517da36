"""Property-based fuzzing of config and data validation (hypothesis).

Random and deliberately invalid YAML, ``--set`` overrides, whole configs run through
``polytask train``, CSV tables and tensors are fed to polytask. The property is the same
everywhere: either the input is accepted (and a tiny training run works), or a polytask error
(a ``PolytaskError``; exit code 2 and ``error: ...`` on stderr for the CLI) says what is wrong,
naming the offending key, task or column, or what was expected. A ``TypeError``, ``KeyError``,
``RuntimeError``, pydantic ``ValidationError`` or a traceback from inside torch is a failure.

Every example is deterministic (``derandomize=True``). ``COUNTS`` tallies the examples per test
and how many were rejected (read them with a debugger or ``--pdb``; nothing asserts on totals,
which depend on which tests ran).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import string
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import polytask as pt
from polytask.cli.main import main
from polytask.config.schema import Config, load_config
from polytask.core.errors import PolytaskError
from polytask.data.dataset import MultiOutputDataset

pytestmark = pytest.mark.slow  # subprocesses / hundreds of generated examples

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

#: examples run per test, and how many of them were rejected with a polytask error
COUNTS: Counter[str] = Counter()
REJECTED: Counter[str] = Counter()

#: words of a message that says what was expected or what is wrong (besides naming the key)
CLEAR_WORDS = ("expect", "must", "unknown", "invalid", "required", "requires", "should", "not found",
               "does not exist", "not valid", "is not", "needs", "cannot", "give ")

TINY_TRAIN = {"epochs": 1, "batch_size": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def no_plots():
    """training.png takes ~1 s per epoch to draw; these tests are about validation, so draw nothing
    (the plot itself is tested with the trainer)."""
    import polytask.train.callbacks.builtin as builtin  # the Plots callback draws since the core was reshaped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtin, "plot_training", lambda path, rows, main_metrics: Path(path).write_bytes(b""))
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder for the module (hypothesis runs many examples per test; one tmp_path per test is not enough)."""
    return tmp_path_factory.mktemp("fuzz")


_serial = itertools.count()


def fresh(workdir: Path) -> Path:
    folder = workdir / f"ex{next(_serial)}"
    folder.mkdir()
    return folder


def tally(test: str, rejected: bool) -> None:
    COUNTS[test] += 1
    REJECTED[test] += int(rejected)
    event("rejected with a polytask error" if rejected else "accepted")


def assert_clear(message: str, names: tuple[str, ...] = ()) -> None:
    """A polytask error message names something offending or says what was expected."""
    assert "Traceback" not in message, message
    assert message.strip(), "empty error message"
    low = message.lower()
    named = [n for n in names if isinstance(n, str) and n and n.lower() in low]
    assert named or any(w in low for w in CLEAR_WORDS), f"unclear error message (names {names}): {message}"


def keys_in(value: Any) -> tuple[str, ...]:
    """Every mapping key (as text) inside a nested value, to look for in an error message."""
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append(str(key))
            out.extend(keys_in(item))
    elif isinstance(value, list):
        for item in value:
            out.extend(keys_in(item))
    return tuple(out)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_cli_outcome(code: int, out: str, err: str, names: tuple[str, ...]) -> bool:
    """Exit 0, or exit 2 with one ``error: ...`` message; returns whether it was rejected."""
    assert "Traceback" not in out + err, out + err
    if code == 0:
        return False
    assert code == 2, (code, out, err)
    assert err.startswith("error: "), err
    assert err.count("error: ") == 1, err
    assert_clear(err, names)
    return True


# ------------------------------------------------------------------------------ building blocks
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, -1.0, 0.0, 1e-300, 1e308, -1e308, 0.5, 1.5)
VALID_NAMES = {
    "method.name": ["static", "equal", "pcgrad", "mgda", "nash_mtl", "uncertainty", "dwa", "cagrad"],
    "sampler.name": ["proportional", "uniform", "temperature", "annealed", "round_robin"],
    "task_scheduler.name": ["all", "round_robin", "random_subset"],
    "model.architecture": ["hard_sharing", "mmoe", "task_branches", "cross_stitch", "ple"],
    "model.encoder.name": ["mlp", "cnn", "tabular", "text"],
    "data.dataset": ["adult", "multimnist"],
    "optim.optimizer": ["adam", "adamw", "sgd"],
    "optim.scheduler": ["none", "cosine", "step", "exponential"],
    "run.precision": ["32", "bf16", "16"],
    "train.loader_mode": ["sample", "max_size_cycle", "min_size", "sequential"],
    "train.monitor": ["loss", "delta_m", "y/rmse", "b/accuracy"],
    "engine.compare": ["auto", "shared", "last_shared", "features"],
    "engine.heads": ["auto", "weighted", "unweighted"],
}


def near_miss(name: str) -> st.SearchStrategy[str]:
    """Typos of a valid name: a character dropped, doubled, swapped or changed, or the case changed."""
    def edit(data: tuple[int, str, str]) -> str:
        pos, op, char = data
        if not name:
            return char
        i = pos % len(name)
        if op == "drop":
            return name[:i] + name[i + 1:]
        if op == "double":
            return name[:i] + name[i] + name[i:]
        if op == "swap" and len(name) > 1:
            j = min(i + 1, len(name) - 1)
            return name[:i] + name[j] + name[i] + name[j + 1:] if j != i else name + char
        if op == "upper":
            return name.upper()
        return name[:i] + char + name[i + 1:]
    return st.tuples(st.integers(0, 50), st.sampled_from(["drop", "double", "swap", "upper", "change"]),
                     st.sampled_from(list(string.ascii_lowercase + "_-. 0"))).map(edit)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
keys = st.one_of(text, st.sampled_from(["name", "kind", "train", "epochs", "lr", "data", "files", "weights", "1", ""]))


def scalars(small: bool) -> st.SearchStrategy[Any]:
    ints = st.integers(-3, 9) if small else st.one_of(st.integers(-3, 9), st.integers(-2**63, 2**63))
    return st.one_of(st.none(), st.booleans(), ints, st.sampled_from(SPECIAL_FLOATS),
                     st.floats(-10, 10) if small else st.floats(), text)


def junk(small: bool = False) -> st.SearchStrategy[Any]:
    return st.recursive(scalars(small), lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=8)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    import typing

    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the schema (tasks expanded for the tasks of the base config)."""
    out = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        out.append(path)
        if path == ("tasks",):
            from polytask.config.schema import TaskConfig

            for task in ("y", "b"):
                out.append(("tasks", task))
                out += field_paths(TaskConfig, ("tasks", task))
            continue
        sub = _submodel(field.annotation)
        if sub is not None:
            out += field_paths(sub, path)
    return out


PATHS = field_paths(Config)


def base_config(csv: str = "data.csv") -> dict[str, Any]:
    return {"seed": 0, "data": {"files": {"train": csv}},
            "tasks": {"y": {"kind": "regression"}, "b": {"kind": "binary"}},
            "model": {"architecture": "hard_sharing", "encoder": {"name": "mlp", "hidden": [8]}},
            "method": {"name": "equal"}, "train": dict(TINY_TRAIN), "run": {"progress": False}}


def set_path(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def get_path(raw: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(raw, dict) or part not in raw:
            return None
        raw = raw[part]
    return raw


@st.composite
def mutation(draw, small: bool) -> tuple[str, tuple[str, ...], Any]:
    """One change to a valid config: (what, key path, new value or key)."""
    kind = draw(st.sampled_from(["value", "value", "special", "rename", "delete", "registry", "params"]))
    if kind == "registry":
        field = draw(st.sampled_from(sorted(VALID_NAMES)))
        valid = VALID_NAMES[field]
        value = draw(st.one_of(st.sampled_from(valid), st.sampled_from(valid).flatmap(near_miss), text))
        return kind, tuple(field.split(".")), value
    if kind == "params":
        block = draw(st.sampled_from(["method", "sampler", "task_scheduler", "model.encoder", "model.options", "data.options"]))
        key = draw(st.one_of(keys, st.sampled_from(["weights", "temperature", "seed", "c", "num_experts", "hidden",
                                                     "in_features", "k", "alpha", "lr", "task_sizes", "every"])))
        return kind, (*block.split("."), key), draw(junk(small))
    path = draw(st.sampled_from(PATHS))
    if kind == "rename":
        return kind, path, draw(near_miss(path[-1]))
    if kind == "delete":
        return kind, path, None
    if kind == "special":
        return kind, path, draw(st.sampled_from(SPECIAL_FLOATS + (-1, 0, "", [], {}, None, True)))
    return kind, path, draw(junk(small))


def apply(raw: dict[str, Any], change: tuple[str, tuple[str, ...], Any]) -> tuple[str, ...]:
    """Apply a mutation in place; return the names the error message may cite."""
    kind, path, value = change
    if kind == "rename":
        parent = get_path(raw, path[:-1]) if len(path) > 1 else raw
        if isinstance(parent, dict):
            parent[value] = parent.pop(path[-1], None)
        return (*path, str(value))
    if kind == "delete":
        parent = get_path(raw, path[:-1]) if len(path) > 1 else raw
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        return path
    set_path(raw, path, value)
    return (*path, *(v for v in [value] if isinstance(v, str)), *keys_in(value))


def mutated(small: bool) -> st.SearchStrategy[list]:
    return st.lists(mutation(small), min_size=1, max_size=3)


# ------------------------------------------------------------------------- 1. random configs
def check_load(test: str, names: tuple[str, ...], **kwargs: Any) -> Config | None:
    try:
        cfg = load_config(**kwargs)
    except PolytaskError as exc:
        assert_clear(str(exc), names)
        tally(test, True)
        return None
    assert isinstance(cfg, Config)
    tally(test, False)
    return cfg


@settings(FUZZ, max_examples=300)
@given(raw=st.one_of(junk().filter(lambda v: v is not None), st.dictionaries(keys, junk(), max_size=6)))
def test_load_config_random_values(raw):
    """Arbitrary nested values as the whole config: a ConfigError (never a TypeError) unless valid."""
    check_load("load_config(raw=junk)", keys_in(raw), raw=raw)


@settings(FUZZ, max_examples=400)
@given(changes=mutated(small=False))
def test_load_config_mutated(changes):
    """A valid config with wrong types, NaN/inf, typo'd keys, unknown names or removed keys."""
    raw = base_config()
    names: tuple[str, ...] = ()
    for change in changes:
        names += apply(raw, change)
    check_load("load_config(raw=mutated)", names, raw=raw)


YAML_BITS = ["key: value", "data:", "  files:", "    train: a.csv", "tasks:", "- item", "[", "]", "{", "}", ": ", ":",
             "? ", "&anchor ", "*anchor", "*missing", "!!python/object:os.system ", "!!binary x", "%YAML 1.1", "---", "...",
             "\t", "  ", "\n", "'", '"', "|", ">", "#", "@", "`", "train: {epochs: -1}", "seed: .nan", "seed: .inf",
             "method: {name: pcgrad", "? [1, 2]\n: x", "<<: *a", "\x00", "\ufeff", "\x85", "é"]


@settings(FUZZ, max_examples=250)
@given(parts=st.lists(st.one_of(st.sampled_from(YAML_BITS), text), max_size=12),
       encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "garbage"]))
def test_load_config_garbage_yaml(parts, encoding, tmp_path_factory):
    """Garbage YAML text (and bytes that are not UTF-8) in a config file: a ConfigError."""
    folder = tmp_path_factory.getbasetemp() / "yaml"
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    content = "".join(parts)
    if encoding == "garbage":
        path.write_bytes(b"\xff\xfe\xfa" + content.encode("utf-8", "surrogatepass") + b"\x80\x81")
    else:
        path.write_bytes(content.encode(encoding, "replace"))
    check_load("load_config(path=garbage yaml)", (), path=path)


@settings(FUZZ, max_examples=250)
@given(sets=st.lists(st.one_of(
    st.tuples(st.sampled_from([".".join(p) for p in PATHS]), st.one_of(text, st.sampled_from(YAML_BITS))),
    st.tuples(text, text)).map(lambda kv: f"{kv[0]}={kv[1]}") | text, min_size=1, max_size=3))
def test_load_config_overrides(sets):
    """``--set KEY=VALUE`` with random keys and unparsable values."""
    names = tuple(itertools.chain.from_iterable(s.partition("=")[0].split(".") for s in sets))
    check_load("load_config(overrides=random)", names, raw=base_config(), overrides=sets)


def small_table(folder: Path) -> Path:
    r = np.random.default_rng(0)
    n = 24
    path = folder / "data.csv"
    pd.DataFrame({"f1": r.normal(size=n), "c": r.choice(["u", "v"], n), "y": r.normal(size=n),
                  "b": r.integers(0, 2, n), "k": r.integers(0, 3, n)}).to_csv(path, index=False)
    return path


@pytest.mark.slow  # 120 short CLI trainings
@settings(FUZZ, max_examples=120)
@given(changes=mutated(small=True))
def test_cli_train_mutated(changes, workdir, no_plots):
    """``polytask train`` on mutated configs with a tiny CSV: exit 0, or exit 2 with a clear message."""
    folder = fresh(workdir)
    raw = base_config(str(small_table(folder)))
    names: tuple[str, ...] = ()
    for change in changes:
        names += apply(raw, change)
    epochs = get_path(raw, ("train", "epochs"))
    if isinstance(raw.get("train"), dict) and (epochs is None or (type(epochs) is int and epochs > 1)):
        raw["train"]["epochs"] = 1  # valid epoch counts only cost time; invalid ones stay to be rejected
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    code, out, err = run_cli("train", path, "--quiet", "--set", f"output_dir={folder / 'run'}")
    tally("cli train(mutated config)", assert_cli_outcome(code, out, err, names))


# ------------------------------------------------------------------------ 2. random tables
COLUMN_NAMES = st.one_of(st.sampled_from(["y", "b", "k", "x", "f1", "label", "Y", "y ", " y", "1", "", "nan", "a,b", 'q"t', "é"]),
                         st.text(string.ascii_letters + string.digits + "_ ,;\"'", max_size=6))
CELL = {
    "float": st.floats(-5, 5),
    "float_bad": st.one_of(st.floats(-5, 5), st.sampled_from([math.nan, math.inf, -math.inf])),
    "int": st.integers(-3, 4),
    "bool": st.booleans(),
    "str": st.sampled_from(["a", "b", "c", "", "nan", "None", "1", "0", "true", " ", "x,y", 'q"']),
    "mixed": st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(allow_nan=True), st.sampled_from(["a", "1"])),
    "label": st.sampled_from([0, 1]),
}


@st.composite
def frames(draw) -> pd.DataFrame:
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 12, 12]))
    names = draw(st.lists(COLUMN_NAMES, min_size=2, max_size=5))
    columns = {}
    for name in names:
        dtype = draw(st.sampled_from(["float", "float", "float_bad", "int", "bool", "str", "mixed", "label", "label"]))
        columns[name] = draw(st.lists(CELL[dtype], min_size=n, max_size=n))
    return pd.DataFrame(columns)


@st.composite
def task_specs(draw, columns: list[str]) -> dict[str, dict[str, Any]]:
    """One or two tasks: mostly well-formed (valid names, matching num_classes, existing targets), sometimes not."""
    tasks = {}
    for i in range(draw(st.integers(1, 2))):
        sane = draw(st.integers(0, 4)) > 0
        target = draw(st.sampled_from(columns) if sane else st.one_of(st.sampled_from(columns), COLUMN_NAMES))
        name = f"t{i}" if sane else draw(st.one_of(st.sampled_from(["t0", "y", "b"]), COLUMN_NAMES))
        kind = draw(st.sampled_from(["regression", "binary", "multiclass", "multilabel"]))
        spec: dict[str, Any] = {"kind": kind, "target": target}
        if sane:
            if kind in ("multiclass", "multilabel"):
                spec["num_classes"] = draw(st.integers(2, 5))
        else:
            classes = draw(st.sampled_from([None, 1, 2, 3, -1]))
            if classes is not None or kind in ("multiclass", "multilabel"):
                spec["num_classes"] = classes
        if draw(st.booleans()):
            spec["allow_missing"] = True
        tasks[name] = spec
    return tasks


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_cli_train_random_tables(data, workdir, no_plots):
    """Random tables (odd column names, strings/bools/NaN/inf/None, 0 to 12 rows) as CSV or Parquet
    with random task kinds and targets: training works, or the error names the task or column."""
    frame = data.draw(frames())
    columns = [str(c) for c in frame.columns]
    tasks = data.draw(task_specs(columns))
    folder = fresh(workdir)
    fmt = data.draw(st.sampled_from(["csv", "csv", "parquet"]))
    path = folder / f"train.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        try:
            frame.to_parquet(path, index=False)
        except Exception:  # mixed object columns are not writable as Parquet: use CSV
            path = folder / "train.csv"
            frame.to_csv(path, index=False)
    raw = {"data": {"files": {"train": str(path)}}, "tasks": tasks, "model": {"encoder": {"name": "mlp", "hidden": [4]}},
           "train": {**TINY_TRAIN, "batch_size": 4}, "run": {"progress": False}, "output_dir": str(folder / "run")}
    if data.draw(st.booleans()):
        raw["data"]["files"]["val"] = str(path)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True))
    code, out, err = run_cli("train", config, "--quiet")
    names = (*tasks, *(t["target"] for t in tasks.values()), *columns, "column", "task", "data file", "rows")
    tally("cli train(random table)", assert_cli_outcome(code, out, err, names))


# ------------------------------------------------------------------------ 2b. random tensors
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.int8,
          torch.bool, torch.complex64]
VALUES = st.one_of(st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5, 3.0, 7.0, math.nan, math.inf, -math.inf, 1e30]),
                   st.integers(-2, 4).map(float))


@st.composite
def tensors(draw, n: int, width: int | None = None) -> torch.Tensor:
    shape_kind = draw(st.sampled_from(["n", "n", "nk", "scalar", "short", "long", "nkk"]))
    k = width if width is not None else draw(st.integers(1, 4))
    shape = {"n": (n,), "nk": (n, k), "scalar": (), "short": (max(n - 1, 0),), "long": (n + 1,), "nkk": (n, k, 2)}[shape_kind]
    size = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(VALUES, min_size=size, max_size=size))
    dtype = draw(st.sampled_from(DTYPES))
    data = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        return data.to(dtype)
    return torch.nan_to_num(data, nan=0.0, posinf=9.0, neginf=-9.0).to(dtype)


@st.composite
def valid_targets(draw, task: pt.Task, n: int) -> torch.Tensor:
    """Well-formed labels for ``task`` (so that some data sets pass and get trained on)."""
    dtype = draw(st.sampled_from([torch.float32, torch.int64]))
    if task.kind == "regression":
        return torch.tensor(draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n)), dtype=torch.float32)
    high = task.num_classes if task.kind == "multiclass" else 2
    width = (task.num_classes,) if task.kind == "multilabel" else ()
    return torch.randint(0, high, (n, *width), generator=torch.Generator().manual_seed(n)).to(dtype)


@st.composite
def tasks_strategy(draw) -> list[pt.Task]:
    out = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["regression", "binary", "multiclass", "multilabel"]))
        classes = draw(st.integers(2, 4)) if kind in ("multiclass", "multilabel") else None
        out.append(pt.Task(f"task{i}", kind=kind, num_classes=classes))
    return out


@settings(FUZZ, max_examples=300)
@given(task=tasks_strategy().map(lambda ts: ts[-1]), data=st.data())
def test_check_targets_random_tensors(task, data):
    """``Task.check_targets`` on NaN, inf, out-of-range labels, wrong shapes and dtypes, empty tensors."""
    y = data.draw(tensors(data.draw(st.integers(0, 6)), task.num_classes))
    try:
        task.check_targets(y)
    except PolytaskError as exc:
        assert task.name in str(exc), str(exc)
        assert_clear(str(exc), (task.name,))
        tally("Task.check_targets", True)
        return
    tally("Task.check_targets", False)
    assert torch.isfinite(y.float()).all()


@settings(FUZZ, max_examples=250)
@given(tasks=tasks_strategy(), data=st.data())
def test_dataset_validate_random_tensors(tasks, data):
    """``MultiOutputDataset`` + ``validate`` on random inputs, targets and masks; a valid set trains one step.

    Half of the examples start from a well-formed data set and corrupt one part of it (the inputs, one
    task's targets or mask, or a task left without targets): the error must then name that task."""
    n = data.draw(st.integers(0, 6))
    seeded = torch.Generator().manual_seed(n)
    clean = data.draw(st.booleans())
    x = torch.randn(n, 3, generator=seeded) if clean else data.draw(st.one_of(tensors(n, 3), st.just(torch.randn(n, 3))))
    targets: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for task in tasks:
        if clean:
            targets[task.name] = data.draw(valid_targets(task, n))
            if data.draw(st.integers(0, 3)) == 0:
                masks[task.name] = torch.rand(n, generator=seeded) > 0.3
            continue
        if data.draw(st.integers(0, 9)) == 0:
            continue  # a task without targets
        good = data.draw(st.booleans())
        targets[task.name] = data.draw(valid_targets(task, n) if good else tensors(n, task.num_classes))
        if data.draw(st.integers(0, 3)) == 0:
            masks[task.name] = data.draw(tensors(n, 1))
    if data.draw(st.integers(0, 5)) == 0:
        targets[data.draw(st.sampled_from(["task9", "Task0", "tsk0"]))] = torch.zeros(n)
    culprit = None
    if clean and data.draw(st.integers(0, 2)) > 0:
        culprit = data.draw(st.sampled_from([t.name for t in tasks]))
        part = data.draw(st.sampled_from(["targets", "targets", "mask", "drop"]))
        if part == "drop":
            del targets[culprit]
            masks.pop(culprit, None)
        elif part == "mask":
            masks[culprit] = data.draw(tensors(n, 1))
        else:
            targets[culprit] = data.draw(tensors(n, next(t for t in tasks if t.name == culprit).num_classes))
    names = (*[t.name for t in tasks], *targets, "inputs", "x")
    try:
        ds = MultiOutputDataset(x, targets, masks)
        ds.validate(tasks)
    except PolytaskError as exc:
        assert_clear(str(exc), names)
        assert any(name in str(exc) for name in names), str(exc)
        if culprit is not None and "inputs" not in str(exc):
            assert f"'{culprit}'" in str(exc), (culprit, str(exc))
        tally("MultiOutputDataset.validate", True)
        return
    tally("MultiOutputDataset.validate", False)
    if x.dtype != torch.float32 or x.dim() != 2 or len(x) == 0:
        return  # train only on the float inputs the MLP takes
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=3, hidden=[4]), tasks)
    trainer = pt.Trainer(model, tasks, loop={"epochs": 1, "batch_size": 4, "steps_per_epoch": 1}, run={"progress": False})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(ds)
    except PolytaskError as exc:
        assert_clear(str(exc), names)
        tally("Trainer.fit(validated tensors)", True)
        return
    tally("Trainer.fit(validated tensors)", False)
