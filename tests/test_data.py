import pytest
import torch
from scipy import stats

import polytask as pt
from polytask import DataError
from polytask.data import SAMPLERS, MultiOutputDataset, TaskDatasets


def test_batches_cover_all_rows_once():
    ds = MultiOutputDataset(torch.arange(10.0).unsqueeze(1), {"a": torch.arange(10.0)})
    seen = torch.cat([b.x[:, 0] for b in ds.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(10))


def test_validation_errors_name_task():
    x = torch.randn(4, 2)
    with pytest.raises(DataError, match="targets of task 'a' have 3 rows"):
        MultiOutputDataset(x, {"a": torch.zeros(3)})
    ds = MultiOutputDataset(x, {"a": torch.zeros(4)})
    with pytest.raises(DataError, match="no targets for task 'b'"):
        ds.validate([pt.Task("b", kind="binary")])
    bad_x = MultiOutputDataset(torch.tensor([[0.0], [float("nan")]]), {"a": torch.zeros(2)})
    with pytest.raises(DataError, match="NaN"):
        bad_x.validate([pt.Task("a", kind="binary")])


def test_masked_nan_targets_are_accepted():
    y = torch.tensor([1.0, float("nan"), 0.0])
    ds = MultiOutputDataset(torch.randn(3, 2), {"a": y}, {"a": torch.tensor([True, False, True])})
    ds.validate([pt.Task("a", kind="binary")])
    assert not torch.isnan(ds.targets["a"]).any()


def test_task_datasets_sizes_and_errors():
    sets = {"a": MultiOutputDataset(torch.randn(5, 2), {"a": torch.zeros(5)}),
            "b": MultiOutputDataset(torch.randn(9, 3), {"b": torch.zeros(9)})}
    data = TaskDatasets(sets)
    assert data.sizes == {"a": 5, "b": 9}
    with pytest.raises(DataError, match="no targets for 'c'"):
        TaskDatasets({"c": sets["a"]})


@pytest.mark.parametrize("name, params, expected", [
    ("proportional", {}, [100 / 11100, 1000 / 11100, 10000 / 11100]),
    ("uniform", {}, [1 / 3] * 3),
    ("temperature", {"temperature": 2.0}, None),
])
def test_sampler_frequencies_chi_square(name, params, expected):
    sizes = {"small": 100, "mid": 1000, "big": 10000}
    sampler = SAMPLERS.create(name, **params)
    sampler.setup(sizes)
    if expected is None:
        root = torch.tensor([100.0, 1000.0, 10000.0]) ** 0.5
        expected = (root / root.sum()).tolist()
    assert sampler.probabilities(0, 1).tolist() == pytest.approx(expected)
    gen = torch.Generator().manual_seed(0)
    draws = [sampler.sample(gen) for _ in range(10000)]
    observed = [draws.count(t) for t in sizes]
    _, p_value = stats.chisquare(observed, [10000 * e for e in expected])
    assert p_value > 0.001


def test_a_batch_by_index_select_equals_indexing():
    """`batch` gathers rows with index_select (a third of x[index]'s cost): the same tensors, for
    images and masks too, and any other index (a bool mask, a list) still indexes."""
    import polytask as pt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, 4, 4, generator=g)
    data = pt.MultiOutputDataset(x, {"a": torch.randn(20, generator=g), "b": torch.randint(0, 3, (20,), generator=g)},
                                 {"a": torch.rand(20, generator=g) > 0.5})
    index = torch.randperm(20, generator=g)[:7]
    got = data.batch(index)
    assert torch.equal(got.x, x[index]) and got.x.is_contiguous()
    assert all(torch.equal(got.targets[k], data.targets[k][index]) for k in ("a", "b"))
    assert torch.equal(got.masks["a"], data.masks["a"][index])
    by_mask = data.batch(torch.arange(20) % 2 == 0)
    assert torch.equal(by_mask.x, x[::2])
