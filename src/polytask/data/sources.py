"""Data sources beyond tables of numbers: NumPy arrays and images named in a table.

**Arrays** (``data.files.train: train.npz``, or a folder of ``.npy`` files): the input array under
``x`` (any shape: (N, F) features, (N, C, H, W) images, (N, L) token ids) and one array per task
under the task's ``target`` (default: its name), each with N rows. Missing labels are NaN (for
``allow_missing`` tasks); class labels are integer codes.

**Images named in a table** (``data.images: {column: path, size: [H, W], channels: 3}``): a
CSV/Parquet table whose ``column`` holds image file paths (relative to the table's folder, or
absolute) beside the task target columns; every image is read with Pillow, converted to
``channels`` (1: grey, 3: RGB), resized to ``size`` and scaled to [0, 1]: inputs (N, C, H, W)
for a CNN. The same settings, kept in ``preprocess.json``, read the images of ``polytask
predict``'s table. An "image folder" with one subfolder per class is such a table away:
:func:`image_folder_table` writes it (``polytask`` reads tables, so several tasks can label the
same images).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------- arrays
def is_array_source(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".npz" or path.is_dir()


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file or of a folder of ``.npy`` files (name → array)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; expected a .npz file or a folder of .npy files")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise DataError(f"folder {path} holds no .npy file; expected x.npy and one array per task target")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} cannot be read as NumPy arrays ({str(exc).splitlines()[0]}); expected a file written "
                        "by numpy.savez (or .npy files written by numpy.save), without pickled objects") from None


def arrays_dataset(arrays: Mapping[str, np.ndarray], tasks: Sequence[Task], allow_missing: Mapping[str, bool],
                   where: str) -> MultiOutputDataset:
    """A data set from named arrays: ``x`` and each task's target array (see the module docstring)."""
    if "x" not in arrays:
        raise DataError(f"{where} has no array 'x' (found {', '.join(arrays) or 'none'}); expected the inputs under 'x'")
    x = torch.from_numpy(np.ascontiguousarray(arrays["x"]))
    if x.dim() == 0:
        raise DataError(f"{where}: array 'x' is a single number; expected one row per example")
    if x.dtype == torch.float64:
        x = x.float()
    targets, masks = {}, {}
    for task in tasks:
        key = task.target if isinstance(task.target, str) else task.name
        if key not in arrays:
            raise DataError(f"{where} has no array '{key}' for task '{task.name}' (found {', '.join(arrays)}); expected "
                            f"one array per task, under its target name")
        y = np.asarray(arrays[key])
        if len(y) != len(x):
            raise DataError(f"{where}: array '{key}' of task '{task.name}' has {len(y)} rows; 'x' has {len(x)}")
        missing = np.isnan(y).reshape(len(y), -1).any(1) if np.issubdtype(y.dtype, np.floating) else np.zeros(len(y), bool)
        if missing.any() and not allow_missing.get(task.name, False):
            raise DataError(f"{where}: array '{key}' of task '{task.name}' has a missing value (NaN) at row "
                            f"{int(missing.nonzero()[0][0])}; set `allow_missing: true` for that task to mask them")
        values = torch.from_numpy(np.where(missing.reshape(-1, *[1] * (y.ndim - 1)), 0, y).astype(np.float32))
        targets[task.name] = values
        if missing.any():
            masks[task.name] = torch.from_numpy(~missing)
    return MultiOutputDataset(x, targets, masks)


# --------------------------------------------------------------------------------- images
def check_image_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    size, channels = spec.get("size"), spec.get("channels", 3)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise DataError(f"data.images.size must be [height, width] in pixels; found {size!r}")
    if channels not in (1, 3):
        raise DataError(f"data.images.channels must be 1 (grey) or 3 (RGB); found {channels!r}")
    return {"column": str(spec["column"]), "size": [int(s) for s in size], "channels": int(channels)}


def read_images(frame: pd.DataFrame, spec: Mapping[str, Any], base: Path, where: str) -> torch.Tensor:
    """The images a table's ``spec["column"]`` names, as a float tensor (N, C, H, W) in [0, 1]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise DataError("reading images needs Pillow: pip install pillow") from None
    from polytask.data.files import locate_row

    column, (height, width), channels = spec["column"], spec["size"], spec["channels"]
    if column not in frame.columns:
        raise DataError(f"{where} has no image column '{column}' (data.images.column); found "
                        f"{', '.join(map(str, frame.columns[:20]))}")
    out = np.empty((len(frame), channels, height, width), dtype=np.float32)
    for row, name in enumerate(frame[column].tolist()):
        if not isinstance(name, str) or not name:
            raise DataError(f"{where} column '{column}' has {name!r} at {locate_row(frame, row, where)}; expected an "
                            "image file path")
        path = Path(name) if Path(name).is_absolute() else base / name
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise DataError(f"{where} column '{column}' names {path} at {locate_row(frame, row, where)}, which does "
                            "not exist; expected image paths relative to the table's folder, or absolute") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{where} column '{column}': {path} at {locate_row(frame, row, where)} is not an image "
                            f"Pillow can read ({str(exc).splitlines()[0]})") from None
        out[row] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(out)


def image_folder_table(folder: str | Path, task: str = "label") -> pd.DataFrame:
    """A table of an image folder laid out as ``folder/CLASS/image.png``: columns ``path``
    (relative to ``folder``) and ``task`` (the class, as its folder's name)."""
    folder = Path(folder)
    rows = [(str(p.relative_to(folder)), p.parent.name) for p in sorted(folder.glob("*/*"))
            if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise DataError(f"{folder} holds no images in class subfolders (folder/CLASS/image{IMAGE_SUFFIXES[0]}); "
                        f"expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return pd.DataFrame(rows, columns=["path", task])
