import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on a 2-core machine: one intra-op thread per worker (and in the processes its
    # tests start), or the two workers' thread pools fight over the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``pytest -n N --dist loadgroup`` (``make test``): a test file that defines a module-scoped
    fixture (a training run, a two-process launch shared by its tests) goes to one worker whole,
    so the fixture is built once; every other test is handed out alone, as ``--dist load`` does.
    (xdist 3.8's own loadgroup did not group even a statically marked module under pytest 9.2
    here, so the grouping is decided in this hook, by file.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    shares: dict[str, bool] = {}

    def shares_a_module_fixture(path: str) -> bool:
        if path not in shares:
            file = config.rootpath / path
            shares[path] = file.is_file() and 'scope="module"' in file.read_text()
        return shares[path]

    class ByModuleFixture(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if shares_a_module_fixture(path) else nodeid

    return ByModuleFixture(config, log)


def pytest_collection_modifyitems(items):
    """The slow tests first, so that a parallel run does not end waiting on one long test while
    the other worker idles (without xdist only the order changes)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny steps on a busy 2-core machine run much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
