"""The QM9, Yeast and diamonds loaders: shapes, label ranges, deterministic splits, clear errors."""

import dataclasses

import numpy as np
import pytest
import torch

from polytask import DataError
from polytask.datasets import load
from polytask.datasets import qm9 as qm9_module
from polytask.datasets.diamonds import GRADES
from polytask.datasets.download import cache_dir
from polytask.datasets.yeast import YEAST_FILE


def _rows(data):
    return len(data.train) + len(data.val) + len(data.test)


def test_yeast_shapes_and_labels():
    data = load("yeast")
    assert [t.name for t in data.tasks] == [f"class{i}" for i in range(1, 15)]
    assert _rows(data) == 2417 and data.input_shape == (103,)
    assert (len(data.val), len(data.test)) == (362, 362)
    labels = torch.stack([data.train.targets[t.name] for t in data.tasks], dim=1)
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    # MULAN's yeast: 4.24 labels per gene; class12 and class13 hold about 75 % of the genes, class14 1.4 %
    assert 4.0 < float(labels.sum(1).mean()) < 4.5
    assert float(labels[:, 13].mean()) < 0.03 and float(labels[:, 11].mean()) > 0.7
    assert abs(float(data.train.x.mean())) < 1e-5 and abs(float(data.train.x.std()) - 1) < 0.01


def test_yeast_split_is_seeded():
    first, again, other = load("yeast", seed=3), load("yeast", seed=3), load("yeast", seed=4)
    assert torch.equal(first.test.x, again.test.x)
    assert torch.equal(first.test.targets["class1"], again.test.targets["class1"])
    assert not torch.equal(first.test.x, other.test.x)


def test_yeast_missing_package_names_the_install_command():
    absent = dataclasses.replace(YEAST_FILE, package="polytask_no_such_package")
    with pytest.raises(DataError, match=r"pip install --no-deps river"):
        absent.path(download=False)


def test_diamonds_tasks_and_ranges():
    data = load("diamonds")
    assert [t.name for t in data.tasks] == ["price", "cut", "color", "clarity"]
    assert _rows(data) == 53940 and data.input_shape == (6,)
    for name, levels in GRADES.items():
        codes = torch.cat([data.train.targets[name], data.test.targets[name]])
        assert codes.dtype == torch.long and int(codes.min()) == 0 and int(codes.max()) == len(levels) - 1
    task = {t.name: t for t in data.tasks}
    assert task["cut"].num_classes == 5 and task["color"].num_classes == 7 and task["clarity"].num_classes == 8
    price = data.train.targets["price"]
    assert float(price.min()) == 326 and float(price.max()) == 18823  # dollars, as in ggplot2
    # cut is ordered worst to best: "Ideal" (index 4) is the most common grade (40 %)
    assert int(torch.bincount(data.train.targets["cut"]).argmax()) == 4


def test_diamonds_rows_subset_and_split_are_seeded():
    first, again = load("diamonds", rows=500, seed=1), load("diamonds", rows=500, seed=1)
    assert _rows(first) == 500
    assert torch.equal(first.val.targets["price"], again.val.targets["price"])
    assert not torch.equal(first.val.targets["price"], load("diamonds", rows=500, seed=2).val.targets["price"])
    with pytest.raises(DataError, match=r"`rows` of dataset 'diamonds' must be an int in \[100, 53940\]"):
        load("diamonds", rows=5)


def test_coulomb_eigenvalues_of_two_molecules_by_hand():
    # H2 at 0.74 Å: C = [[0.5, 1/0.74], [1/0.74, 0.5]] -> 0.5 ± 1/0.74; a padding atom adds a 0
    # eigenvalue. A lone C atom: ½ · 6^2.4.
    charges = np.array([[1.0, 1.0, 0.0], [6.0, 0.0, 0.0]])
    positions = np.zeros((2, 3, 3))
    positions[0, 1, 0] = 0.74
    values = qm9_module.coulomb_eigenvalues(charges, positions)
    assert values[0] == pytest.approx([0.5 + 1 / 0.74, 0.5 - 1 / 0.74, 0.0], abs=1e-12)
    assert values[1] == pytest.approx([0.5 * 6 ** 2.4, 0.0, 0.0], abs=1e-9)


@pytest.mark.slow
def test_qm9_twelve_targets_cached_descriptors():
    # the machine's cache (~/.cache/polytask): the first run computes the descriptors (~20 s on
    # two cores), later runs only read them back
    data = load("qm9", rows=3000, seed=5)
    cached = list(cache_dir().glob(f"qm9_descriptors_{qm9_module._checksum(_files())}.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert [t.name for t in data.tasks] == list(qm9_module.TARGETS) and len(data.tasks) == 12
    assert _rows(data) == 3000 and data.input_shape == (34,)
    features, targets = qm9_module.descriptors()
    assert features.shape == (130831, 34) and targets.shape == (130831, 12)
    # atom counts (last five columns) add up to the 18.03 atoms per molecule of QM9
    assert features[:, 29:].sum(1).mean() == pytest.approx(18.0325, abs=1e-3)
    # methane first: U0 = -40.47893 Ha, 4 H and 1 C
    assert targets[0, list(qm9_module.TARGETS).index("u0")] == pytest.approx(-40.47893)
    assert features[0, 29:].tolist() == [4, 1, 0, 0, 0]
    again = load("qm9", rows=3000, seed=5)
    assert torch.equal(data.test.targets["gap"], again.test.targets["gap"])
    assert cached[0].stat().st_mtime_ns == stamp  # read back, not written again


def _files():
    return [f.path() for f in (*qm9_module.PART_FILES, qm9_module.POLARIZABILITY_FILE)]
