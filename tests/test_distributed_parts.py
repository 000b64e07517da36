"""Batch parts and look-ahead methods under DDP: two CPU processes (gloo) equal one process."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_parts_script  # noqa: E402
from test_distributed import assert_same_state, launch  # noqa: E402

pytestmark = pytest.mark.slow  # one torchrun launch of two processes


@pytest.fixture(scope="module")
def parts_results(tmp_path_factory):
    return launch("distributed_parts_script.py", tmp_path_factory)


@pytest.mark.parametrize("name", list(distributed_parts_script.METHODS))
def test_two_ranks_match_one_process(parts_results, name):
    torch.set_num_threads(1)
    single = distributed_parts_script.train(name)
    assert any(k.startswith("method.") for k in single) or name == "sdmgrad"
    assert_same_state(parts_results[name], single, name)
