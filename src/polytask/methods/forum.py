"""FORUM: task weights as the lower level of a multi-objective bilevel problem, solved first-order."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import _quadprog
from polytask.methods._weighting import PerTaskMethod, adam_rows
from polytask.methods.base import Step, Update, check_positive, register

#: LibMTL's guard against a vanishing constraint gradient in π and in the QP's linear term
_EPS = 1e-8


@register("forum")
class FORUM(PerTaskMethod):
    """FORUM — Ye, Lin, Cao, Zhang & Tsang, "A First-Order Multi-Gradient Algorithm for
    Multi-Objective Bi-Level Optimization", ECAI 2024, as LibMTL's ``bacth_forward_FORUM``
    (the second author's code) computes it for multi-task learning.

    Variables z = (α, θ). The lower level is the weighted inner-batch loss f(α, θ) = Σᵢ wᵢLᵢ(θ),
    w = softmax(α); the upper level has one objective per task, Fₖ(θ) = Lₖ on the outer batch. By
    the value-function reformulation the problem is min_z F(z) s.t. q(z) = f(α, θ) − f*(α) ≤ 0,
    with f*(α) ≈ f(α, θᴷ), θᴷ the end of K = ``inner_steps`` virtual SGD steps of rate η =
    ``inner_lr`` on f from θ. First-order, ∇q = (S(L(θ) − L(θᴷ)), Jᵀw) with S = diag(w) − wwᵀ and
    J the inner task Jacobian. With ĝₖ = ∇Fₖ/‖∇Fₖ‖ (zero in α), πₖ = φ − ⟨∇q, ĝₖ⟩/(‖∇q‖² + ε)
    (φ = ``phi``) and A the rows (ĝ₁ … ĝ_T, ∇q), the step solves the QP in x = (λ, ν) ∈ ℝᵀ⁺¹

        min xᵀAAᵀx − ν φ(‖∇q‖² + ε)   s.t.  x ≥ 0,  Σₖ λₖ = 1,  ν ≥ Σₖ λₖπₖ

    (here exactly, with quadprog; LibMTL uses cvxpy on a square root of AAᵀ), averages λ over
    steps, λ̄ ← λ̄ + β(λ − λ̄) with β = (epoch + 1)^(−3/4) (λ̄ starts at 0), and takes
    ν = max(Σₖ λ̄ₖπₖ, 0), the multiplier that makes ⟨∇q, d⟩ ≥ φ‖∇q‖². The update is

        d = Σₖ λ̄ₖ ĝₖ + ν ∇q:   θ receives Σₖ λ̄ₖ ĝₖ + ν Jᵀw,   α takes an Adam step (``lr``) on ν S(L(θ) − L(θᴷ)).

    The method declares ``lookahead``: the Trainer gives it half of each batch as the inner batch
    (the step's losses, J) and the other half as the outer batch. ``Step.lookahead`` is called K
    times on the inner batch (K − 1 gradients of f at the displaced θ — the first is Jᵀw — and the
    losses at θᴷ) and once on the outer batch at θ (T gradients from one forward): K + 1 forwards
    and K + T − 1 backwards beside the step's own forward and T-row Jacobian. ``lookahead: false``
    (plain loops without a closure, the contract suites, which build steps by hand) uses the inner
    batch as the outer one (ĝₖ from J) and the linearisation L(θᴷ) ≈ L(θ) − Kη Gw (K steps along
    the first gradient): no extra pass. The step's weights are w (before α's update); the heads
    receive wᵢ∇Lᵢ.

    Departures:
        - The virtual steps and the gradients move θ (the compared parameters) only; LibMTL copies
          the whole model and moves, normalises and updates the heads with the same d. Here the
          heads receive the lower-level gradient wᵢ∇Lᵢ of the inner batch (the outer-batch term of
          d has no heads), and ‖∇Fₖ‖, ‖∇q‖ are norms over θ and α.
        - LibMTL draws two half-size batches per step; here the outer batch is the other half of
          the step's batch.
        - An inner step that gives non-finite losses ends the virtual steps at the last finite
          point; LibMTL stops when f exceeds 1e5.
        - The QP is LibMTL's, with its objective xᵀAAᵀx (no ½) beside the φ-term: the dual of the
          paper's direction problem has ½xᵀAAᵀx. Kept so as to agree with the reference code.
    The cross-check (tests/test_forum.py) re-derives LibMTL's computation — SGD steps on a model
    copy, autograd gradients, the cvxpy problem on the eigen square root — on a model whose
    parameters are all shared, where both agree to solver tolerance.
    """

    needs = "jacobian"
    heads = "weighted"  # the heads receive wᵢ∇Lᵢ: w weights the lower-level loss
    stateful = True
    lookahead = True  # the default; an instance takes its `lookahead` parameter
    example_params = {"lookahead": False}  # the suites build steps by hand, without an outer batch

    def __init__(self, *, inner_steps: int = 5, inner_lr: float = 0.1, lr: float = 1e-3, phi: float = 0.1,
                 lookahead: bool = True) -> None:
        super().__init__()
        if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
            raise InvalidParameterError(f"`inner_steps` of `forum` must be an int >= 1; found {inner_steps!r}")
        self.inner_steps = inner_steps
        self.inner_lr = check_positive("forum", "inner_lr", inner_lr)
        self.lr = check_positive("forum", "lr", lr)
        self.phi = check_positive("forum", "phi", phi)
        if not isinstance(lookahead, bool):
            raise InvalidParameterError(f"`lookahead` of `forum` must be a bool; found {lookahead!r}")
        self.lookahead = lookahead  # type: ignore[misc]
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps", "lam"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        # the last step's ν and α-gradient, for logs and tests (recomputed every step)
        self.register_buffer("multiplier", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("hypergradient", torch.empty(0, dtype=torch.float64), persistent=False)
        self._remember(inner_steps=inner_steps, inner_lr=inner_lr, lr=lr, phi=phi,
                       **({} if lookahead else {"lookahead": False}))

    def reset_state(self, num_tasks: int) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps", "lam"):
            setattr(self, name, torch.zeros(num_tasks, dtype=torch.float64))
        self.hypergradient = torch.zeros(num_tasks, dtype=torch.float64)

    def update(self, step: Step) -> Update:
        idx = self.index(step)
        j = step.jacobian.detach()  # type: ignore[union-attr]  # Method.forward checked
        n = len(idx)
        w = torch.softmax(self.logits[idx], dim=0)
        w_j = w.to(j)
        inner = w_j @ j  # ∇θ f = Jᵀw on the inner batch
        losses = step.losses.detach().double().cpu()
        if self.lookahead:
            if step.lookahead is None:
                raise InvalidParameterError("`forum` needs the step's inner and outer batches (Step.lookahead): train "
                                            "it with the Trainer, pass lookahead= to Engine.backward, or use lookahead=False")
            after = self._value_function(step, inner, w_j, losses)
            _, outer = step.lookahead(torch.zeros_like(inner), torch.eye(n, dtype=j.dtype, device=j.device))
        else:
            after = losses - self.inner_steps * self.inner_lr * (step.gramian.detach().double().cpu() @ w.cpu())  # type: ignore[union-attr]
            outer = j
        outer = outer.to(j.dtype)
        # ĝₖ = ∇Fₖ/‖∇Fₖ‖, in place on a T×P tensor of our own (a zero row stays zero)
        unit = (outer.clone() if outer is j else outer).div_(outer.norm(dim=1, keepdim=True).clamp_min(torch.finfo(outer.dtype).tiny))
        s = torch.diag(w) - torch.outer(w, w)
        q_alpha = s.cpu() @ (losses - after)  # ∇α q, first order
        unit_q = (unit @ inner).double().cpu()  # ⟨ĝₖ, ∇q⟩ (ĝₖ is zero in α)
        qq = float(q_alpha @ q_alpha) + float((inner.double() @ inner.double()).cpu())
        pi = self.phi - unit_q / (qq + _EPS)
        gram = torch.empty(n + 1, n + 1, dtype=torch.float64)
        gram[:n, :n] = (unit @ unit.T).double().cpu()
        gram[:n, n] = gram[n, :n] = unit_q
        gram[n, n] = qq
        x = self._solve(gram, pi, self.phi * (qq + _EPS))
        beta = (step.epoch + 1) ** -0.75
        lam = self.lam[idx] + beta * (x[:n].to(self.lam) - self.lam[idx])
        self.lam[idx] = lam
        nu = max(float(lam.cpu() @ pi), 0.0)
        self.multiplier = torch.tensor(nu, dtype=torch.float64, device=self.lam.device)
        direction = lam.to(unit) @ unit + nu * inner
        hyper = (nu * q_alpha).to(self.logits.device)
        self.hypergradient = torch.zeros_like(self.logits)
        self.hypergradient[idx] = hyper
        adam_rows(self, idx, hyper, lr=self.lr)
        return Update(w.to(dtype=step.losses.dtype, device=step.losses.device), direction=direction)

    def _value_function(self, step: Step, first: Tensor, w: Tensor, losses: Tensor) -> Tensor:
        """L(θᴷ) on the inner batch after K virtual SGD steps on f = Σ wᵢLᵢ (the first along Jᵀw)."""
        assert step.lookahead is not None
        none = torch.zeros(0, len(w), dtype=w.dtype, device=w.device)
        delta = -self.inner_lr * first
        last = losses
        for k in range(1, self.inner_steps + 1):
            values, grad = step.lookahead(delta, w if k < self.inner_steps else none, batch="inner")
            values = values.detach().double().cpu()
            if not bool(torch.isfinite(values).all()):
                break  # a diverging virtual step: the last finite point stands for f*(α)
            last = values
            if k < self.inner_steps:
                delta = delta - self.inner_lr * grad.to(delta)
        return last

    def _solve(self, gram: Tensor, pi: Tensor, linear: float) -> Tensor:
        """argmin xᵀMx − linear·x_T over x ≥ 0, Σ_{k<T} xₖ = 1, x_T ≥ Σₖ πₖxₖ (quadprog, scaled)."""
        n = len(pi)
        scale = float(gram.diagonal().mean())
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
        a = np.zeros(n + 1)
        a[n] = linear / scale
        equality = np.concatenate([np.ones(n), [0.0]])[:, None]
        multiplier = np.concatenate([-pi.numpy(), [1.0]])[:, None]
        constraints = np.concatenate([equality, np.eye(n + 1), multiplier], axis=1)
        bounds = np.concatenate([[1.0], np.zeros(n + 2)])
        x = _quadprog(2.0 * gram / scale, a, constraints, bounds, 1)
        if not np.isfinite(x).all():
            raise InvalidParameterError("`forum`: the QP on the outer and constraint gradients has no finite solution")
        return torch.from_numpy(np.clip(x, 0.0, None))
