"""NumPy arrays (.npz, folders of .npy) and images named in a table as YAML data sources."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw

from polytask.cli.main import main
from polytask.core.errors import DataError
from polytask.data.sources import image_folder_table, read_arrays

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 6)).astype(np.float32)
    reg = (3 * x[:, 0] - x[:, 1]).astype(np.float64)
    reg[::10] = np.nan  # missing labels
    return {"x": x, "reg": reg, "cls": (x[:, 2] > 0).astype(np.int64) + (x[:, 3] > 0.5)}


def config(folder: Path, data: dict, tasks: dict, **extra: object) -> Path:
    raw = {"seed": 0, "output_dir": str(folder / "run"), "data": data, "tasks": tasks,
           "train": {"epochs": 4, "batch_size": 32}, "optim": {"lr": 0.01}, "run": {"progress": False}, **extra}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


ARRAY_TASKS = {"reg": {"kind": "regression", "allow_missing": True}, "cls": {"kind": "multiclass"}}


def test_npz_files_train_and_predict(tmp_path):
    np.savez(tmp_path / "train.npz", **arrays(400, 0))
    np.savez(tmp_path / "test.npz", **arrays(100, 1))
    cfg = config(tmp_path, {"files": {"train": str(tmp_path / "train.npz"), "test": str(tmp_path / "test.npz")}},
                 ARRAY_TASKS)
    code, out, err = cli("train", cfg, "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["tasks"]["reg"]["r2"] > 0.8 and summary["tasks"]["cls"]["accuracy"] > 0.7
    np.save(tmp_path / "new.npy", arrays(5, 2)["x"])
    code, out, err = cli("predict", tmp_path / "run", "--input", tmp_path / "new.npy")
    assert code == 0, err
    assert out.splitlines()[0] == "id,reg,cls,cls_probability" and len(out.splitlines()) == 6


def test_a_folder_of_npy_files_is_a_source(tmp_path):
    for split, n, seed in (("train", 300, 0), ("val", 80, 1)):
        (tmp_path / split).mkdir()
        for name, value in arrays(n, seed).items():
            np.save(tmp_path / split / f"{name}.npy", value)
    assert sorted(read_arrays(tmp_path / "train")) == ["cls", "reg", "x"]
    cfg = config(tmp_path, {"files": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")}}, ARRAY_TASKS)
    code, _, err = cli("train", cfg, "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["split"] == "val"


def shapes(folder: Path, n: int, seed: int) -> pd.DataFrame:
    """Images of a circle or a square of a random size: tasks shape (binary) and size (regression)."""
    r = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind, size = r.choice(["circle", "square"]), int(r.integers(6, 14))
        image = Image.new("RGB", (32, 32), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        cx, cy = r.integers(size, 32 - size, size=2)
        box = (cx - size, cy - size, cx + size, cy + size)
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=(255, 255, 255))
        name = f"img/{seed}_{i}.png"
        image.save(folder / name)
        rows.append({"file": name, "shape": kind, "size": size})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_images_named_in_a_table_train_and_predict(tmp_path):
    shapes(tmp_path, 240, 0).to_csv(tmp_path / "train.csv", index=False)
    shapes(tmp_path, 60, 1).to_csv(tmp_path / "val.csv", index=False)
    cfg = config(tmp_path, {"files": {"train": str(tmp_path / "train.csv"), "val": str(tmp_path / "val.csv")},
                            "images": {"column": "file", "size": [24, 24], "channels": 1}},
                 {"shape": {"kind": "binary"}, "size": {"kind": "regression"}},
                 model={"encoder": {"name": "cnn", "channels": [8, 16], "out_features": 32}},
                 # 12 epochs: after 8 the shape task had been learnt or not by the seed and the rounding
                 # (one seed in three failed, with either of torch's Adam kernels); after 12, every one of 8 runs
                 train={"epochs": 12, "batch_size": 32})
    code, out, err = cli("train", cfg, "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks"]["shape"]["accuracy"] > 0.75, summary  # majority class: about 0.5
    assert summary["tasks"]["size"]["r2"] > 0.5, summary
    prep = json.loads((tmp_path / "run" / "preprocess.json").read_text())
    assert prep["images"] == {"column": "file", "size": [24, 24], "channels": 1}
    shapes(tmp_path, 4, 2).drop(columns=["shape", "size"]).to_csv(tmp_path / "new.csv", index=False)
    code, out, err = cli("predict", tmp_path / "run", "--input", tmp_path / "new.csv")
    assert code == 0, err
    pred = pd.read_csv(io.StringIO(out))
    assert list(pred.columns) == ["id", "shape", "shape_probability", "size"] and set(pred["shape"]) <= {"circle", "square"}


def test_an_image_folder_becomes_a_table(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("L", (4, 4)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    frame = image_folder_table(tmp_path, task="animal")
    assert frame.to_dict("list") == {"path": ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"],
                                     "animal": ["cat", "cat", "dog", "dog"]}
    with pytest.raises(DataError, match="holds no images"):
        image_folder_table(tmp_path / "cat")


@pytest.mark.parametrize(("change", "needles"), [
    ("no-x", ["has no array 'x'", "found reg, cls"]),
    ("short-target", ["array 'cls' of task 'cls' has 10 rows", "'x' has 400"]),
    ("nan-label", ["missing value (NaN) at row 0", "allow_missing"]),
    ("pickled", ["cannot be read as NumPy arrays"]),
    ("features", ["data.images and data.features do not apply"]),
])
def test_bad_arrays_are_one_clear_error(tmp_path, change, needles):
    values = arrays(400, 0)
    tasks = ARRAY_TASKS
    data: dict = {"files": {"train": str(tmp_path / "train.npz")}}
    if change == "no-x":
        values.pop("x")
    elif change == "short-target":
        values["cls"] = values["cls"][:10]
    elif change == "nan-label":
        tasks = {**ARRAY_TASKS, "reg": {"kind": "regression"}}
    elif change == "features":
        data["features"] = ["a"]
    if change == "pickled":
        np.savez(tmp_path / "train.npz", x=np.array([{"a": 1}], dtype=object))
    else:
        np.savez(tmp_path / "train.npz", **values)
    code, out, err = cli("train", config(tmp_path, data, tasks), "--quiet")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "run").exists()


def test_bad_image_tables_are_one_clear_error(tmp_path):
    frame = shapes(tmp_path, 20, 0)
    broken = frame.copy()
    broken.loc[3, "file"] = "img/missing.png"
    broken.to_csv(tmp_path / "t.csv", index=False)
    images = {"column": "file", "size": [16, 16], "channels": 1}
    tasks = {"shape": {"kind": "binary"}}
    code, _, err = cli("train", config(tmp_path, {"files": {"train": str(tmp_path / "t.csv")}, "images": images}, tasks))
    assert code == 2 and "missing.png" in err and "does not exist" in err and "line 5" in err, err
    (tmp_path / "img" / "bad.png").write_text("not a png")
    broken.loc[3, "file"] = "img/bad.png"
    broken.to_csv(tmp_path / "t.csv", index=False)
    code, _, err = cli("train", config(tmp_path, {"files": {"train": str(tmp_path / "t.csv")}, "images": images}, tasks))
    assert code == 2 and "is not an image Pillow can read" in err, err
    code, _, err = cli("train", config(tmp_path, {"dataset": "adult", "images": images}, None))
    assert code == 2 and "`images` reads image paths from the tables in data.files" in err, err
    code, _, err = cli("train", config(tmp_path, {"files": {"train": str(tmp_path / "t.csv")},
                                                  "images": {**images, "size": [16, 0]}}, tasks))
    assert code == 2 and "size must be [height, width]" in err, err
