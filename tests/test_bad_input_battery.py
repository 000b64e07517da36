"""The counted bad-input battery of issue 20: every bad input a new user meets, in one list.

Each case runs as a user would run it (``polytask …`` in-process, or the Python API) and is
classified:

* ``clear``: one ``error:`` line (exit code 2) or one polytask error whose message holds the
  case's needles (what is wrong and what is expected);
* ``unclear``: a polytask error without those needles;
* ``traceback``: any other exception escaping to the user;
* ``stated``: accepted on purpose, with a logged line that says so (the case's needles);
* ``silent``: the bad input was accepted without a word.

Every case must be ``clear`` (or ``stated``); ``test_battery_counts`` asserts 0 tracebacks and 0 silent
acceptances over the whole list and prints the counts per group. ``python tests/test_bad_input_battery.py``
prints the same table without pytest. The cases grow with every bad input found.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import polytask as pt
from polytask.cli.main import main
from polytask.core.errors import PolytaskError


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    run: Callable[[Path], object]  # given a fresh folder; returns normally when the input was accepted
    needles: tuple[str, ...]


CASES: list[Case] = []


def case(group: str, name: str, *needles: str) -> Callable[[Callable[[Path], object]], Callable[[Path], object]]:
    def add(fn: Callable[[Path], object]) -> Callable[[Path], object]:
        CASES.append(Case(group, name, fn, needles))
        return fn
    return add


# --------------------------------------------------------------------------- shared inputs
def table(n: int, seed: int = 0) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    f1, f2 = r.normal(size=n), r.normal(size=n)
    cat = r.choice(["a", "b", "c"], size=n)
    return pd.DataFrame({"f1": f1, "f2": f2, "cat": cat, "y_reg": 2 * f1 - f2, "y_bin": (f1 + f2 > 0).astype(int),
                         "y_cls": np.where(cat == "a", "red", np.where(f1 > 0, "green", "blue"))})


TASKS = {"reg": {"kind": "regression", "target": "y_reg"}, "bin": {"kind": "binary", "target": "y_bin"}}


def write_config(folder: Path, frame: pd.DataFrame | None = None, *, val: pd.DataFrame | None = None,
                 **changes: object) -> Path:
    """A small config on CSV files (1 epoch), with top-level keys replaced by ``changes``."""
    folder.mkdir(parents=True, exist_ok=True)
    (table(200) if frame is None else frame).to_csv(folder / "train.csv", index=False)
    files = {"train": str(folder / "train.csv")}
    if val is not None:
        val.to_csv(folder / "val.csv", index=False)
        files["val"] = str(folder / "val.csv")
    raw: dict = {"seed": 0, "output_dir": str(folder / "run"), "data": {"files": files}, "tasks": TASKS,
                 "model": {"encoder": {"name": "mlp", "hidden": [8]}}, "train": {"epochs": 1, "batch_size": 64},
                 "run": {"progress": False}}
    raw.update(changes)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def train(folder: Path, *extra: object, **changes: object) -> tuple[int, str, str]:
    return cli("train", write_config(folder, **changes), "--quiet", *extra)


_FINISHED: dict[str, Path] = {}


def finished_run(folder: Path) -> Path:
    """A private copy of one finished 1-epoch run (trained once per session)."""
    if "run" not in _FINISHED:
        base = Path(sys.modules[__name__].__dict__.get("_BASE_DIR") or folder.parent) / "battery-finished"
        code, _, err = train(base)
        assert code == 0, err
        _FINISHED["run"] = base
    target = folder / "copy"
    shutil.copytree(_FINISHED["run"], target)
    cfg = yaml.safe_load((target / "cfg.yaml").read_text())
    cfg["output_dir"] = str(target / "run")
    cfg["data"]["files"] = {"train": str(target / "train.csv")}
    (target / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return target


# ----------------------------------------------------------------- 1. data files (the CLI)
@case("data files", "header-only CSV", "no data rows", "only the header")
def _(d):
    return train(d, frame=table(5).iloc[:0])


@case("data files", "3-row CSV (no validation split possible)", "rows")
def _(d):
    return train(d, frame=table(3))


@case("data files", "a task with no labelled row", "no labelled row")
def _(d):
    frame = table(100).assign(y_reg=np.nan)
    return train(d, frame=frame, tasks={**TASKS, "reg": {**TASKS["reg"], "allow_missing": True}})


@case("data files", "a missing label without allow_missing", "allow_missing")
def _(d):
    frame = table(100)
    frame.loc[7, "y_reg"] = np.nan
    return train(d, frame=frame)


@case("data files", "a duplicate CSV column", "two columns named 'f1'")
def _(d):
    d.mkdir()
    text = table(50).to_csv(index=False).replace("f2", "f1", 1)
    (d / "dup.csv").write_text(text)
    cfg = write_config(d)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["files"]["train"] = str(d / "dup.csv")
    cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg, "--quiet")


@case("data files", "target column that does not exist", "y_rge")
def _(d):
    return train(d, tasks={**TASKS, "reg": {"kind": "regression", "target": "y_rge"}})


@case("data files", "a non-numeric regression target names the line", "line")
def _(d):
    frame = table(100).astype({"y_reg": object})
    frame.loc[11, "y_reg"] = "n/a"
    return train(d, frame=frame)


@case("data files", "binary target with three values", "bin")
def _(d):
    frame = table(100)
    frame.loc[3, "y_bin"] = 2
    return train(d, frame=frame)


@case("data files", "multiclass label out of range", "num_classes")
def _(d):
    frame = table(100).assign(y_k=lambda f: (f.f1 > 0).astype(int))
    frame.loc[5, "y_k"] = 9
    return train(d, frame=frame, tasks={"k": {"kind": "multiclass", "target": "y_k", "num_classes": 2}})


@case("data files", "infinite feature value", "inf")
def _(d):
    frame = table(100)
    frame.loc[4, "f1"] = np.inf
    return train(d, frame=frame)


@case("data files", "huge regression targets (1e30)", "1e+30")
def _(d):
    frame = table(100)
    frame.loc[2, "y_reg"] = 1e30
    return train(d, frame=frame)


@case("data files", "validation file without the target column", "y_bin")
def _(d):
    return train(d, val=table(60, 1).drop(columns=["y_bin"]))


@case("data files", "training file that does not exist", "does not exist")
def _(d):
    cfg = write_config(d)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["files"]["train"] = str(d / "nope.csv")
    cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg, "--quiet")


@case("data files", "a file of an unknown format", ".xlsx")
def _(d):
    cfg = write_config(d)
    (d / "t.xlsx").write_text("x")
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["files"]["train"] = str(d / "t.xlsx")
    cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg, "--quiet")


@case("data files", "features naming a missing column", "age")
def _(d):
    cfg = write_config(d)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["features"] = ["f1", "age"]
    cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg, "--quiet")


@case("data files", ".npz without an 'x' array", "has no array 'x'")
def _(d):
    d.mkdir()
    np.savez(d / "t.npz", reg=np.zeros(10))
    cfg = write_config(d)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["files"]["train"] = str(d / "t.npz")
    raw["tasks"] = {"reg": {"kind": "regression"}}
    cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg, "--quiet")


@case("data files", "an image path that does not exist", "does not exist", "line 2")
def _(d):
    frame = pd.DataFrame({"file": ["nope.png"] * 20, "y_bin": [0, 1] * 10})
    cfg = write_config(d, frame, tasks={"bin": {"kind": "binary", "target": "y_bin"}})
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["images"] = {"column": "file", "size": [8, 8]}
    raw["model"] = {"encoder": {"name": "cnn"}}
    cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg, "--quiet")


# ----------------------------------------------------------------------- 2. config (YAML)
def config_case(name: str, *needles: str, **changes: object) -> None:
    case("config", name, *needles)(lambda d: train(d, **changes))


config_case("unknown top-level key", "trian", trian={"epochs": 1})
config_case("static weights all zero", "weight", tasks={k: {**v, "weight": 0} for k, v in TASKS.items()},
            method={"name": "static"})
config_case("batch_size: true", "batch_size", train={"epochs": 1, "batch_size": True})
config_case("batch_size: 0", "batch_size", train={"epochs": 1, "batch_size": 0})
config_case("epochs: -1", "epochs", train={"epochs": -1})
config_case("negative learning rate", "lr", optim={"lr": -0.1})
config_case("unknown method with a typo", "pcgard", "pcgrad", method={"name": "pcgard"})
config_case("unknown method parameter", "alpah", method={"name": "cagrad", "alpah": 0.5})
config_case("method parameter out of range", "alpha", method={"name": "cagrad", "alpha": -1})
config_case("unknown architecture", "hard_shring", model={"architecture": "hard_shring", "encoder": {"name": "mlp"}})
config_case("unknown encoder", "mpl", model={"encoder": {"name": "mpl"}})
config_case("hidden: \"16\" (a string)", "list of positive ints", "[16]", model={"encoder": {"name": "mlp", "hidden": "16"}})
config_case("unknown task kind", "regresion", tasks={"reg": {"kind": "regresion", "target": "y_reg"}})
config_case("multiclass without num_classes on numeric floats", "num_classes",
            tasks={"reg": {"kind": "multiclass", "target": "y_reg"}})
config_case("unknown metric", "acuracy", tasks={**TASKS, "bin": {**TASKS["bin"], "metrics": ["acuracy"]}})
config_case("metric of another kind", "rmse", tasks={**TASKS, "bin": {**TASKS["bin"], "metrics": ["rmse"]}})
config_case("unknown loss", "hubber", tasks={**TASKS, "reg": {**TASKS["reg"], "loss": "hubber"}})
config_case("loss of another kind", "focal", tasks={**TASKS, "reg": {**TASKS["reg"], "loss": "focal"}})
config_case("unknown sampler", "temprature", sampler={"name": "temprature"})
config_case("unknown task scheduler", "bandti", task_scheduler={"name": "bandti"})
config_case("unknown loader mode", "max_cycle", train={"epochs": 1, "loader_mode": "max_cycle"})
config_case("monitor naming an unknown task", "monitor", train={"epochs": 1, "monitor": "rge/rmse"})
config_case("monitor delta_m without baselines", "delta_m", train={"epochs": 1, "monitor": "delta_m"})
config_case("unknown callback", "tensorbord", callbacks=[{"name": "tensorbord"}])
config_case("health policy typo", "skp", health={"policy": "skp"})
config_case("device that does not exist", "cuda", run={"device": "cuda:7", "progress": False})
config_case("fp16 on CPU", "precision", run={"precision": "16", "progress": False})
config_case("engine every for a loss method", "every", engine={"every": 5})
config_case("a moved key (train.lr)", "optim", train={"epochs": 1, "lr": 0.1})
config_case("data.options beside data.files", "options",
            data={"files": {"train": "x.csv"}, "options": {"encodin": "codes"}})
config_case("data.images without data.files", "`images` reads image paths from the tables in data.files",
            data={"dataset": "adult", "images": {"column": "f", "size": [8, 8]}})
config_case("task named like a module attribute", "keys", tasks={"keys": {"kind": "regression", "target": "y_reg"}})
config_case("compare: features on an architecture without a shared representation", "features",
            model={"architecture": "cross_stitch", "encoder": {"name": "mlp", "hidden": [8]}},
            method={"name": "mgda"}, engine={"compare": "features"})


@case("config", "duplicate YAML keys", "twice", "lr")
def _(d):
    d.mkdir()
    path = d / "cfg.yaml"
    path.write_text("data: {dataset: adult}\noptim:\n  lr: 0.1\n  lr: 0.2\n")
    return cli("train", path, "--quiet")


@case("config", "invalid YAML", "line")
def _(d):
    d.mkdir()
    path = d / "cfg.yaml"
    path.write_text("data: {dataset: adult\n")
    return cli("train", path, "--quiet")


@case("config", "config file that does not exist", "does not exist")
def _(d):
    return cli("train", d / "missing.yaml", "--quiet")


@case("config", "--set without =", "key=value")
def _(d):
    return cli("train", write_config(d), "--quiet", "--set", "train.epochs")


@case("config", "--set of an unknown key", "epoch")
def _(d):
    return cli("train", write_config(d), "--quiet", "--set", "train.epoch=2")


@case("config", "unknown bundled dataset", "adlut")
def _(d):
    d.mkdir()
    path = d / "cfg.yaml"
    path.write_text("data: {dataset: adlut}\n")
    return cli("train", path, "--quiet")


# --------------------------------------------------------------------- 3. run directories
@case("run directory", "output_dir under /proc", "choose another output_dir")
def _(d):
    return cli("train", write_config(d), "--quiet", "--set", "output_dir=/proc/polytask_battery")


@case("run directory", "output_dir is a file", "is a file")
def _(d):
    cfg = write_config(d)
    return cli("train", cfg, "--quiet", "--set", f"output_dir={d / 'train.csv'}")


@case("run directory", "training into an existing run without --resume/--overwrite", "--resume", "--overwrite")
def _(d):
    folder = finished_run(d)
    return cli("train", folder / "cfg.yaml", "--quiet")


@case("run directory", "--resume and --overwrite together", "--resume", "--overwrite")
def _(d):
    folder = finished_run(d)
    return cli("train", folder / "cfg.yaml", "--quiet", "--resume", "--overwrite")


@case("run directory", "--resume without a run", "does not exist", "without --resume")
def _(d):
    return cli("train", write_config(d), "--quiet", "--resume")


@case("run directory", "--resume with a changed model", "does not fit")
def _(d):
    folder = finished_run(d)
    return cli("train", folder / "cfg.yaml", "--quiet", "--resume", "--set", "model.encoder.hidden=[4]",
               "--set", "train.epochs=2")


@case("run directory", "eval of a folder that is no run", "not a polytask run directory")
def _(d):
    d.mkdir()
    return cli("eval", d)


@case("run directory", "eval of a missing split", "no 'test' split")
def _(d):
    return cli("eval", finished_run(d) / "run", "--split", "test")


@case("run directory", "eval with a checkpoint of another model", "does not fit the model")
def _(d):
    folder = finished_run(d)
    code, _, err = train(d / "other", model={"encoder": {"name": "mlp", "hidden": [4]}})
    assert code == 0, err
    shutil.copy(d / "other" / "run" / "checkpoints" / "best.pt", folder / "run" / "checkpoints" / "best.pt")
    return cli("eval", folder / "run", "--split", "val")


@case("run directory", "a tampered (pickled code) checkpoint", "failed the safe load")
def _(d):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    folder = finished_run(d)
    torch.save({"model": {}, "x": Evil()}, folder / "run" / "checkpoints" / "best.pt")
    return cli("eval", folder / "run", "--split", "val")


@case("run directory", "a truncated checkpoint", "best.pt")
def _(d):
    folder = finished_run(d)
    path = folder / "run" / "checkpoints" / "best.pt"
    path.write_bytes(path.read_bytes()[:100])
    return cli("eval", folder / "run", "--split", "val")


# ---------------------------------------------------------------------------- 4. predict
@case("predict", "wrong-shape .npy", "holds an array of shape (4, 3)")
def _(d):
    folder = finished_run(d)
    np.save(d / "x.npy", np.zeros((4, 3), dtype=np.float32))
    return cli("predict", folder / "run", "--input", d / "x.npy")


@case("predict", "a file that is not .npy", "cannot be read as a .npy array")
def _(d):
    folder = finished_run(d)
    (d / "junk.npy").write_bytes(b"nope")
    return cli("predict", folder / "run", "--input", d / "junk.npy")


@case("predict", "table without a feature column", "f2")
def _(d):
    folder = finished_run(d)
    table(5).drop(columns=["f2"]).to_csv(d / "p.csv", index=False)
    return cli("predict", folder / "run", "--input", d / "p.csv")


@case("predict", "unseen category value (a stated decision)", "'zzz'", "unseen category")
def _(d):
    folder = finished_run(d)
    table(5).assign(cat="zzz").to_csv(d / "p.csv", index=False)
    return cli("predict", folder / "run", "--input", d / "p.csv")


@case("predict", "--task that is not a task", "rge")
def _(d):
    folder = finished_run(d)
    table(5).to_csv(d / "p.csv", index=False)
    return cli("predict", folder / "run", "--input", d / "p.csv", "--task", "rge")


@case("predict", "--id-column that is not a column", "customer")
def _(d):
    folder = finished_run(d)
    table(5).to_csv(d / "p.csv", index=False)
    return cli("predict", folder / "run", "--input", d / "p.csv", "--id-column", "customer")


@case("predict", "an empty input table", "no data rows")
def _(d):
    folder = finished_run(d)
    table(5).iloc[:0].to_csv(d / "p.csv", index=False)
    return cli("predict", folder / "run", "--input", d / "p.csv")


# ---------------------------------------------------------------------------- 5. Python API
def model_and_tasks():
    tasks = [pt.Task("a", "regression"), pt.Task("b", "binary")]
    return pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[8]), tasks), tasks


def data(n: int = 40, x: torch.Tensor | None = None):
    x = torch.randn(n, 4) if x is None else x
    return pt.MultiOutputDataset(x, {"a": torch.randn(n), "b": (torch.rand(n) > 0.5).float()})


def fit(trainer_kwargs: dict | None = None, train=None, model=None, tasks=None):
    m, t = model_and_tasks()
    trainer = pt.Trainer(model or m, tasks or t, loop={"epochs": 1}, run={"progress": False}, **(trainer_kwargs or {}))
    return trainer.fit(data() if train is None else train)


@case("python", "Trainer(model, ['a', 'b']) with names, not Tasks", "polytask.Task objects")
def _(d):
    m, _ = model_and_tasks()
    return pt.Trainer(m, ["a", "b"])


@case("python", "uint8 image inputs", "uint8", "x.float() / 255")
def _(d):
    return fit(train=data(x=torch.randint(0, 255, (40, 4), dtype=torch.uint8)))


@case("python", "targets with another row count", "rows")
def _(d):
    return pt.MultiOutputDataset(torch.randn(10, 4), {"a": torch.randn(9)})


@case("python", "mask for a task without targets", "mask given for task 'c'")
def _(d):
    return pt.MultiOutputDataset(torch.randn(10, 4), {"a": torch.randn(10)}, {"c": torch.ones(10, dtype=torch.bool)})


@case("python", "data without a task's targets", "no targets for task 'b'")
def _(d):
    return fit(train=pt.MultiOutputDataset(torch.randn(40, 4), {"a": torch.randn(40)}))


@case("python", "a flat Trainer argument of wave 1 (epochs=)", "loop={'epochs'")
def _(d):
    m, t = model_and_tasks()
    return pt.Trainer(m, t, epochs=3)


@case("python", "a loop option with a typo", "batch_sise")
def _(d):
    m, t = model_and_tasks()
    return pt.Trainer(m, t, loop={"epochs": 1, "batch_sise": 3})


@case("python", "model tasks differ from trainer tasks", "differ")
def _(d):
    m, _ = model_and_tasks()
    return pt.Trainer(m, [pt.Task("a", "regression")])


@case("python", "duplicate task names", "unique", "['a']")
def _(d):
    return [pt.Task("a", "regression"), pt.Task("a", "binary")] and pt.models.HardSharing(
        pt.encoders.MLP(in_features=4, hidden=[8]), [pt.Task("a", "regression"), pt.Task("a", "binary")])


@case("python", "a torch Dataset item without targets", "expected (x, targets)")
def _(d):
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.randn(4)

    return fit(train=Items())


@case("python", "a stream without steps_per_epoch", "steps_per_epoch")
def _(d):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(8):
                yield torch.randn(4), {"a": torch.randn(()), "b": torch.tensor(1.0)}

    return fit(train=Stream())


@case("python", "a list as training data", "must be a MultiOutputDataset")
def _(d):
    return fit(train=[1, 2, 3])


@case("python", "load of a Python run without its model", "polytask.load(run_dir, model=model)")
def _(d):
    m, t = model_and_tasks()
    pt.Trainer(m, t, loop={"epochs": 1}, run={"progress": False}, output_dir=d / "run").fit(data())
    (d / "run" / "model.json").unlink(missing_ok=True)  # a run written before runs recorded their model
    return pt.load(d / "run")


@case("python", "predict with inputs of another width", "shape")
def _(d):
    m, t = model_and_tasks()
    pt.Trainer(m, t, loop={"epochs": 1}, run={"progress": False}, output_dir=d / "run").fit(data())
    return pt.load(d / "run", model=m).predict(np.zeros((3, 5), dtype=np.float32))


# ------------------------------------------------------------------------------ the battery
def classify(item: Case, folder: Path) -> tuple[str, str]:
    try:
        result = item.run(folder)
    except PolytaskError as exc:
        text = str(exc)
        return ("clear" if all(n in text for n in item.needles) else "unclear"), text
    except Exception as exc:  # noqa: BLE001  (what the battery measures: anything else reached the user)
        return "traceback", f"{type(exc).__name__}: {exc}"
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], int):
        code, out, err = result
        if code == 0:
            stated = ("warning: " in err or "info: " in err) and all(n in err for n in item.needles)
            return ("stated" if stated else "silent"), (err if stated else out)[-300:]
        text = err.strip()
        one_line = text.startswith("error: ") and "Traceback" not in text + out
        if not one_line:
            return "traceback", text[-300:]
        return ("clear" if all(n in text for n in item.needles) else "unclear"), text
    return "silent", repr(result)[:300]


@pytest.fixture(scope="module", autouse=True)
def _base(tmp_path_factory):
    module = sys.modules[__name__]
    module._BASE_DIR = str(tmp_path_factory.mktemp("battery"))  # type: ignore[attr-defined]
    yield
    _FINISHED.clear()


OUTCOMES: dict[str, tuple[str, str, str]] = {}


@pytest.mark.parametrize("item", CASES, ids=[f"{c.group}: {c.name}" for c in CASES])
def test_bad_input_is_one_clear_error(item: Case, tmp_path: Path, one_thread) -> None:
    outcome, text = classify(item, tmp_path / "case")
    OUTCOMES[f"{item.group}: {item.name}"] = (item.group, outcome, text)
    assert outcome in ("clear", "stated"), f"{outcome}: {text}\nexpected the message to hold {item.needles}"


def test_battery_counts(capsys) -> None:
    """Runs after the cases (same module): 0 tracebacks and 0 silent acceptances of all of them."""
    if len(OUTCOMES) < len(CASES):
        pytest.skip("the battery's cases did not all run in this session (a -k selection)")
    counts = Counter(outcome for _, outcome, _ in OUTCOMES.values())
    with capsys.disabled():
        print("\n" + report(OUTCOMES))
    assert counts["traceback"] == 0 and counts["silent"] == 0, report(OUTCOMES)


def report(outcomes: dict[str, tuple[str, str, str]]) -> str:
    groups = sorted({g for g, _, _ in outcomes.values()})
    kinds = ("clear", "stated", "unclear", "traceback", "silent")
    lines = [f"{'group':<16}" + "".join(f"{k:>11}" for k in kinds), "-" * 60]
    for group in [*groups, "all"]:
        got = Counter(o for g, o, _ in outcomes.values() if group in ("all", g))
        lines.append(f"{group:<16}" + "".join(f"{got[k]:>11}" for k in kinds))
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_bad_input_battery.py: the table alone
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        _BASE_DIR = tmp
        results = {}
        for i, item in enumerate(CASES):
            outcome, text = classify(item, Path(tmp) / f"case{i}")
            results[f"{item.group}: {item.name}"] = (item.group, outcome, text)
            if outcome not in ("clear", "stated"):
                print(f"{outcome:>9}  {item.group}: {item.name}: {text[:200]}")
        print(report(results))
