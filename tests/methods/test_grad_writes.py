"""The gradients a gradient method's step writes are those of one autograd backward of its update.

A step of UPGrad, MGDA, … writes θ's d = Jᵀw (and on the fused routes the heads' shares) into
``.grad`` itself. Each case here once differed from what ``backward()`` of Σ wᵢLᵢ (θ) and of Σ Lᵢ or
Σ wᵢLᵢ (the heads) gives, with the weights the step reports, on some route, without a word: the
layout of a first gradient, accumulation into an existing one, a weight tied between θ and a head,
a shared layer frozen or unfrozen after the engine was made, a shared layer no loss reaches, and θ
of two dtypes.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from polytask.engine.backward import Engine

TASKS = ("a", "b")
ROUTES: dict[str, dict] = {
    "accumulating": {"gramian": "jacobian", "heads": "unweighted"},  # the small model's plain Gramian step
    "loop-weighted": {"gramian": "jacobian", "heads": "weighted"},
    "batched": {"gramian": "jacobian", "jacobian": "batched"},
    "autogram": {"gramian": "autogram"},
    "last-shared": {"compare": "last_shared"},
    "features": {"compare": "features"},
    "every-2": {"every": 2},
}


class Net(nn.Module):
    """Two shared layers (``first`` feeds ``second``), an optional shared layer no loss reads, and a
    head per task; ``conv`` makes the first a channels-last convolution."""

    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = conv
        self.first = nn.Conv2d(3, 4, 3) if conv else nn.Linear(5, 6)
        self.second = nn.Linear(4 * 4 * 4 if conv else 6, 6)
        self.unused = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})
        if conv:
            self.first.to(memory_format=torch.channels_last)

    def shared(self) -> list[nn.Parameter]:
        return [*self.first.parameters(), *self.second.parameters(), *self.unused.parameters()]

    def losses(self, seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        if self.conv:
            x = torch.randn(8, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)
            h = torch.tanh(self.first(x)).flatten(1)
        else:
            h = torch.tanh(self.first(torch.randn(8, 5, generator=gen)))
        z = torch.tanh(self.second(h))
        y = torch.randn(len(TASKS), 8, generator=gen)
        return z, {t: ((self.heads[t](z).squeeze(-1) - (i + 1) * y[i]) ** 2).mean() for i, t in enumerate(TASKS)}


def engine(model: Net, route: str, method: str = "upgrad", **kwargs) -> Engine:
    return Engine(method, model.shared(), last_shared_params=list(model.second.parameters()),
                  params=list(model.parameters()), seed=1, **{**ROUTES[route], **kwargs})


def reference(model: Net, weights: dict[str, float], heads: str, seed: int = 1) -> dict[str, Tensor | None]:
    """What autograd gives: θ (the shared layers) Σ wᵢ∇Lᵢ, the heads Σ ∇Lᵢ (unweighted) or Σ wᵢ∇Lᵢ."""
    model.zero_grad(set_to_none=True)
    _, losses = model.losses(seed)
    shared = {id(p) for p in model.shared()}
    weighted = sum(weights[t] * loss for t, loss in losses.items())
    trainable = [p for p in model.parameters() if p.requires_grad]
    if heads == "weighted":
        weighted.backward()
    else:
        theta = [p for p in trainable if id(p) in shared]
        torch.autograd.backward(weighted, inputs=theta, retain_graph=True)
        torch.autograd.backward(sum(losses.values()), inputs=[p for p in trainable if id(p) not in shared])
    out = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_as_autograd(model: Net, weights: dict[str, float], heads: str) -> None:
    """The model's gradients now are :func:`reference`'s (None where it has None)."""
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    want = reference(model, weights, heads)
    for n in got:
        assert (got[n] is None) == (want[n] is None), n
        if got[n] is not None:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def step(model: Net, eng: Engine, seed: int = 1) -> dict[str, float]:
    z, losses = model.losses(seed)
    return eng.backward(losses, features=[z]).weights


@pytest.mark.parametrize("route", ROUTES)
def test_a_first_gradient_has_the_parameters_layout_and_fused_adam_steps_as_after_backward(route):
    """A channels-last convolution in θ: its .grad has the weight's strides, as autograd's; torch's
    fused Adam reads a gradient in the parameter's order, and after a contiguous one (the engine's
    flat update cut into views) the weight was 0.2 off after one step at lr 0.1."""
    model, twin = Net(conv=True), Net(conv=True)  # the same initial parameters
    eng = engine(model, route)
    weights = step(model, eng)
    assert model.first.weight.grad.stride() == model.first.weight.stride()
    want = reference(twin, weights, eng.heads)
    for n, p in twin.named_parameters():
        p.grad = want[n]
    for m in (model, twin):
        torch.optim.Adam(m.parameters(), lr=0.1, fused=True).step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("route", ROUTES)
def test_a_step_adds_into_the_gradients_there_in_place(route):
    """After zero_grad(set_to_none=False) the step adds into the same .grad tensors, as autograd does
    (a caller may hold them: a CUDA graph's static gradients); 0 of 10 were kept on some routes."""
    model = Net()
    eng = engine(model, route)
    step(model, eng, seed=0)
    model.zero_grad(set_to_none=False)
    held = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    step(model, eng, seed=1)
    for n, p in model.named_parameters():
        if n in held:
            assert p.grad is held[n], n


@pytest.mark.parametrize("route", ROUTES)
def test_a_shared_layer_no_loss_reaches_keeps_no_gradient(route):
    """autograd leaves .grad None on a parameter the backward does not reach; a zero written there
    was still moved by AdamW's decay (0.006 a step) and momentum."""
    model = Net()
    eng = engine(model, route)
    weights = step(model, eng)
    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    assert_as_autograd(model, weights, eng.heads)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("change", ["unfrozen", "frozen"])
def test_a_shared_layer_frozen_or_unfrozen_after_the_engine_was_made(route, change):
    """Unfrozen later (a fine-tuning schedule), the first layer takes Σ wᵢ∇Lᵢ and counts in G (it was
    taken for a head: Σ ∇Lᵢ, 0.24 off); frozen later, it keeps no gradient (the J route raised torch's
    error, the no-J route wrote it zeros)."""
    model = Net()
    if change == "unfrozen":
        model.first.requires_grad_(False)
    eng = engine(model, route)
    step(model, eng, seed=0)
    model.zero_grad(set_to_none=True)
    model.first.requires_grad_(change == "unfrozen")
    weights = step(model, eng, seed=1)
    assert_as_autograd(model, weights, eng.heads)


@pytest.mark.parametrize("method", ["mgda_ub", "upgrad"])
@pytest.mark.parametrize("heads", ["unweighted", "weighted"])
def test_a_weight_tied_between_theta_and_a_head_on_the_features(method, heads):
    """An embedding that is also the output layer (weight tying), compared on the features: θ's
    gradient is Σ wᵢ∇Lᵢ along every path. With unweighted heads it came from z alone and lost the
    heads' use of the tied weight (0.055 off)."""
    torch.manual_seed(0)
    emb = nn.Embedding(7, 5)
    mix = nn.Linear(5, 5)

    def losses(seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 7, (6,), generator=gen)
        z = torch.tanh(mix(emb(tokens)))
        logits = z @ emb.weight.T  # the head reads the embedding too
        target = torch.randint(0, 7, (6,), generator=gen)
        return z, {"a": nn.functional.cross_entropy(logits, target), "b": (z ** 2).mean() * 3}

    eng = Engine(method, [emb.weight, *mix.parameters()], params=[emb.weight, *mix.parameters()],
                 compare="features", heads=heads)
    z, first = losses()
    weights = eng.backward(first, features=[z]).weights
    got = emb.weight.grad.clone()
    emb.weight.grad = None
    for p in mix.parameters():
        p.grad = None
    _, again = losses()
    sum(weights[t] * loss for t, loss in again.items()).backward()
    torch.testing.assert_close(got, emb.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", ["accumulating", "loop-weighted", "batched", "autogram"])
def test_theta_of_two_dtypes_is_taken_in_the_wider(route):
    """A bfloat16 layer before a float32 one: J in the first's dtype rounded the float32 layer's
    gradient to bfloat16 (2e-3 off); the batched passes raised a dtype error. (The no-J Gramian falls
    back to J, with its warning.)"""
    model = Net()
    model.first.to(torch.bfloat16)

    def losses(seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        h = torch.tanh(model.first(torch.randn(8, 5, generator=gen).bfloat16())).float()
        z = torch.tanh(model.second(h))
        y = torch.randn(2, 8, generator=gen)
        return z, {t: ((model.heads[t](z).squeeze(-1) - y[i]) ** 2).mean() for i, t in enumerate(TASKS)}

    model.losses = losses  # type: ignore[method-assign]
    eng = engine(model, route)
    if route == "autogram":
        with pytest.warns(UserWarning, match="2 dtypes"):
            weights = step(model, eng)
    else:
        weights = step(model, eng)
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    want = reference(model, weights, eng.heads)
    for n in ("second.weight", "second.bias"):
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("options", [{}, {"heads": "weighted"}, {"jacobian": "batched"}, {"task_clip": 0.5}],
                         ids=["default", "weighted", "batched", "task-clip"])
def test_a_heads_sparse_gradient_is_kept_sparse(options):
    """A task's own nn.Embedding(sparse=True): its .grad is the sparse gradient autograd gives (the
    layout-keeping copy raised "copy_() between dense and sparse Tensors")."""
    torch.manual_seed(0)
    trunk, table = nn.Linear(4, 3), nn.Embedding(6, 3, sparse=True)
    x, ids = torch.randn(5, 4), torch.tensor([0, 2, 2, 5, 1])
    eng = Engine("upgrad", list(trunk.parameters()), params=[*trunk.parameters(), table.weight], **options)
    z = torch.tanh(trunk(x))
    weights = eng.backward({"a": (z * table(ids)).sum(), "b": (z ** 2).mean()}, features=[z]).weights
    got = table.weight.grad
    assert got.layout == torch.sparse_coo
    if "task_clip" in options:  # the heads take the clip factors too: the layout is what is checked here
        return
    table.weight.grad = None
    z = torch.tanh(trunk(x))
    head = (z * table(ids)).sum() * (weights["a"] if eng.heads == "weighted" else 1.0)
    head.backward()
    torch.testing.assert_close(got.to_dense(), table.weight.grad.to_dense())


def test_j_follows_a_dtype_change_between_steps():
    """``model.double()`` after a step: J is taken in float64 from then on (a dtype kept from the first
    step rounded the float64 gradients to float32)."""
    model = Net()
    eng = engine(model, "accumulating")
    step(model, eng, seed=0)
    model.double()
    model.zero_grad(set_to_none=True)

    def losses(seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        h = torch.tanh(model.first(torch.randn(8, 5, generator=gen).double()))
        z = torch.tanh(model.second(h))
        return z, {t: ((model.heads[t](z).squeeze(-1) - i) ** 2).mean() for i, t in enumerate(TASKS)}

    model.losses = losses  # type: ignore[method-assign]
    weights = step(model, eng)
    assert eng._kept_jacobian.dtype == torch.float64
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    want = reference(model, weights, eng.heads)
    for n in ("first.weight", "second.weight"):
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("route", ["accumulating", "loop-weighted", "batched"])
def test_a_sparse_embedding_in_theta(route):
    """A shared nn.Embedding(sparse=True): its per-task gradients are written into J as dense rows and
    its update is dense, equal to autograd's sparse one (the weighted loop route raised "reshape is
    not implemented for sparse tensors"); the vmapped passes cannot run it, and say what to use."""
    torch.manual_seed(0)
    table, heads = nn.Embedding(7, 3, sparse=True), nn.ModuleList([nn.Linear(3, 1) for _ in TASKS])
    ids = torch.tensor([0, 3, 3, 6, 1])

    def losses() -> dict[str, Tensor]:
        z = torch.tanh(table(ids))
        return {t: (head(z) ** 2).mean() * (i + 1) for i, (t, head) in enumerate(zip(TASKS, heads, strict=True))}

    eng = Engine("upgrad", [table.weight], params=[table.weight, *heads.parameters()], **ROUTES[route])
    if route == "batched":
        with pytest.raises(RuntimeError, match=r"sparse embedding .* needs jacobian: loop"):
            eng.backward(losses())
        return
    weights = eng.backward(losses()).weights
    got = table.weight.grad.clone()
    table.weight.grad = None
    sum(weights[t] * loss for t, loss in losses().items()).backward(inputs=[table.weight])
    torch.testing.assert_close(got, table.weight.grad.to_dense())
