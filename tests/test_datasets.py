import gzip

import pytest
import torch

from polytask import DataError
from polytask.datasets import fetch, load, sha256
from polytask.datasets.base import PackagedFile


@pytest.fixture(scope="module")
def adult():
    return load("adult")


def test_adult_tasks_and_leakage(adult):
    assert [t.name for t in adult.tasks] == ["income", "marital"]
    assert len(adult.train) + len(adult.val) + len(adult.test) == 48842
    assert 0.2 < adult.train.targets["income"].mean() < 0.3
    assert 0.3 < adult.train.targets["marital"].mean() < 0.36
    features = adult.preprocessor["numeric"] + adult.preprocessor["categorical"]
    assert "relationship" not in features and "marital-status" not in features


def test_adult_hours_task_removes_its_column():
    data = load("adult", tasks=["income", "hours"])
    assert "hours-per-week" not in data.preprocessor["numeric"]
    assert abs(float(data.train.targets["hours"].mean())) < 0.05


def test_adult_per_task_sizes():
    data = load("adult", task_sizes={"income": 3000, "marital": 300})
    assert data.train.sizes == {"income": 3000, "marital": 300}


def test_multimnist_real_digits():
    data = load("multimnist", train_size=200, val_size=50, test_size=50)
    assert data.input_shape == (1, 36, 36)
    assert data.train.targets["left"].max() <= 9 and 0.0 <= float(data.train.x.min())
    assert float(data.train.x.max()) <= 1.0 and float(data.train.x.mean()) > 0.05


def test_unknown_dataset_and_task():
    with pytest.raises(Exception, match="Did you mean 'adult'"):
        load("adlt")
    with pytest.raises(DataError, match="no task 'incme'.*Did you mean 'income'"):
        load("adult", tasks=["incme"])


def test_fetch_checks_sha256(tmp_path):
    src = tmp_path / "source.csv.gz"
    with gzip.open(src, "wt") as handle:
        handle.write("1,2,3\n")
    digest = sha256(src)
    got = fetch(src.as_uri(), "copy.csv.gz", digest, directory=tmp_path / "cache")
    assert got.read_bytes() == src.read_bytes()
    assert fetch("file:///nonexistent", "copy.csv.gz", digest, directory=tmp_path / "cache") == got  # cached
    with pytest.raises(DataError, match="expected 0000"):
        fetch(src.as_uri(), "other.csv.gz", "0" * 64, directory=tmp_path / "cache")
    assert not (tmp_path / "cache" / "other.csv.gz").exists()
    assert not list((tmp_path / "cache").glob("*.part"))


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYTASK_DATA", str(tmp_path))
    missing = PackagedFile("no_such_package_xyz", "d/f.csv", (tmp_path / "absent.csv").as_uri(), "0" * 64,
                           "pip install --no-deps no-such-package")
    with pytest.raises(DataError, match="pip install --no-deps no-such-package"):
        missing.path()
    assert torch.tensor(1)  # the error leaves nothing behind
    assert not list(tmp_path.glob("*.part"))
