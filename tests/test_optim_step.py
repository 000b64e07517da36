"""`AdamStep`: torch's Adam / AdamW update without torch's per-step Python, to the bit, or nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import polytask as pt
from polytask.train import optim_step
from polytask.train.optim_step import AdamStep

SHAPES = [(6, 5), (6,), (1, 6), (1,)]


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _twins(kind: type, groups: int = 1, dtypes=(torch.float32,), **settings):
    """Two optimisers over equal copies of the same parameters."""
    made = []
    for _ in range(2):
        params = [p for i, dtype in enumerate(dtypes) for p in _params(i, dtype)]
        if groups == 1:
            made.append((params, kind(params, **settings)))
        else:  # the second group at its own rate and decay
            half = len(params) // 2
            made.append((params, kind([{"params": params[:half]},
                                       {"params": params[half:], "lr": 0.03, "weight_decay": 0.1}], **settings)))
    return made


def _grads(params, step: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g, dtype=p.dtype)


def _step_both(torch_side, ours, fast: AdamStep, step: int, skip: int | None = None) -> bool:
    """The same gradients to both sides; torch's ``step()`` on one, ``fast`` (else torch's) on the
    other. Whether ``fast`` took the step."""
    for params, _ in (torch_side, ours):
        _grads(params, step, skip)
    torch_side[1].step()
    done = fast()
    if not done:
        ours[1].step()
    return done


def _assert_same(a, b) -> None:
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(pa, pb, strict=True):
        sa, sb = oa.state.get(x, {}), ob.state.get(y, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


SETTINGS = [
    {"fused": True},
    {"fused": True, "amsgrad": True, "weight_decay": 0.01},
    {"fused": True, "maximize": True, "betas": (0.8, 0.95), "eps": 1e-6},
    {"foreach": True, "amsgrad": True},
    {},  # torch's default on the CPU: its loop over the parameters
]


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("groups", [1, 2])
def test_the_update_and_state_are_torchs_to_the_bit(kind, settings, groups):
    torch_side, ours = _twins(kind, groups, lr=0.01, **settings)
    fast = AdamStep(ours[1])
    taken = []
    for step in range(6):
        skip = 1 if step in (2, 3) else None  # a parameter without a gradient: torch skips it, state and all
        taken.append(_step_both(torch_side, ours, fast, step, skip))
        _assert_same(torch_side, ours)
    assert taken == [False, True, True, True, True, True]  # the first step makes the state: torch's own


def test_mixed_dtypes_in_a_group_take_torchs_functional_form():
    torch_side, ours = _twins(torch.optim.Adam, dtypes=(torch.float32, torch.float64), lr=0.01, fused=True)
    fast = AdamStep(ours[1])
    for step in range(4):
        _step_both(torch_side, ours, fast, step)
        _assert_same(torch_side, ours)


def _started(kind=torch.optim.Adam, **settings):
    params = _params()
    optimizer = kind(params, lr=0.01, **settings)
    _grads(params, 0)
    optimizer.step()
    _grads(params, 1)
    return params, optimizer


def _refused(optimizer) -> None:
    before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    assert AdamStep(optimizer)() is False
    after = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_refused_where_a_step_hook_would_run():
    _, optimizer = _started()
    handle = optimizer.register_step_pre_hook(lambda *a: None)
    _refused(optimizer)
    handle.remove()
    handle = optimizer.register_step_post_hook(lambda *a: None)
    _refused(optimizer)
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda *a: None)
    try:
        _refused(optimizer)
    finally:
        handle.remove()
    assert AdamStep(optimizer)()


def test_refused_for_other_optimisers_and_settings():
    class MyAdam(torch.optim.Adam):
        pass

    _refused(_started(MyAdam)[1])
    _refused(_started(torch.optim.SGD)[1])
    for setting in ("differentiable", "capturable"):
        _, optimizer = _started()
        optimizer.param_groups[0][setting] = True  # (torch's own step refuses a leaf when differentiable)
        _refused(optimizer)
    params, optimizer = _started()
    optimizer.step = lambda closure=None: None  # a step of the user's own
    _refused(optimizer)
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.01)
    assert AdamStep(optimizer)() and not optimizer.state  # no gradient: nothing to do, as torch's step does nothing
    _grads(params, 0)
    _refused(optimizer)  # no state yet: torch's step makes it


def test_refused_for_sparse_gradients_and_complex_parameters():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    optimizer = torch.optim.SparseAdam(embedding.parameters())
    _refused(optimizer)
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    optimizer = torch.optim.Adam([z], lr=0.01)
    z.grad = torch.randn(3, dtype=torch.complex64)
    optimizer.step()
    z.grad = torch.randn(3, dtype=torch.complex64)
    _refused(optimizer)


def test_a_learning_rate_schedule_sees_the_steps_and_no_warning():
    torch_side, ours = _twins(torch.optim.Adam, lr=0.01, fused=True)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for _, o in (torch_side, ours)]
    fast = AdamStep(ours[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" among them
        for step in range(6):
            _step_both(torch_side, ours, fast, step)
            for schedule in schedules:
                schedule.step()
            _assert_same(torch_side, ours)
    assert torch_side[1].param_groups[0]["lr"] == ours[1].param_groups[0]["lr"] == 0.01 / 8


def test_loaded_state_replaces_the_kept_one():
    torch_side, ours = _twins(torch.optim.Adam, lr=0.01, fused=True)
    fast = AdamStep(ours[1])
    for step in range(3):
        _step_both(torch_side, ours, fast, step)
    saved = torch_side[1].state_dict()
    for side in (torch_side, ours):
        side[1].load_state_dict(copy.deepcopy(saved))  # (loading shares the saved tensors)
    for step in range(3, 6):
        assert _step_both(torch_side, ours, fast, step)
        _assert_same(torch_side, ours)


def test_the_trainer_trains_as_with_torchs_step(monkeypatch):
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    data = pt.data.MultiOutputDataset(x, {"a": x[:, 0], "b": (x[:, 1] > 0).float()})

    original = AdamStep.__call__

    def fit(fast: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = pt.models.HardSharing(pt.encoders.MLP(in_features=5, hidden=[8]), tasks)
        trainer = pt.Trainer(model, tasks, loop={"epochs": 2, "batch_size": 32}, optim={"scheduler": "cosine"},
                             run={"progress": False}, seed=0)
        calls = []

        def counted(self: AdamStep) -> bool:  # every optimiser step asks; unless fast, torch's step takes it
            calls.append(1)
            return fast and original(self)

        monkeypatch.setattr(AdamStep, "__call__", counted)
        trainer.fit(data)
        assert len(calls) == trainer.step_index
        return {k: v.clone() for k, v in trainer.model_state_dict().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ours, torchs = fit(True), fit(False)
    assert ours.keys() == torchs.keys()
    assert all(torch.equal(ours[k], torchs[k]) for k in ours)


def test_a_reset_parameter_state_is_seen():
    torch_side, ours = _twins(torch.optim.Adam, lr=0.01, fused=True)
    fast = AdamStep(ours[1])
    for step in range(5):
        if step == 3:  # a user's reset of one parameter's moments: torch's next step makes them anew
            for params, optimizer in (torch_side, ours):
                del optimizer.state[params[0]]
        assert _step_both(torch_side, ours, fast, step) is (step not in (0, 3))
        _assert_same(torch_side, ours)


def test_step_follows_the_optimiser_it_is_given():
    """``optim_step.step`` keeps nothing a caller could leave stale: a replaced optimiser is the one stepped."""
    first = _started()
    second = _started()
    for params, optimizer in (first, second):
        before = [p.detach().clone() for p in params]
        optim_step.step(optimizer)
        assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert set(optim_step._STEPS) >= {first[1], second[1]}


def test_step_keeps_no_optimiser_alive():
    import gc
    import weakref

    _, optimizer = _started()
    optim_step.step(optimizer)
    gone = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert gone() is None
