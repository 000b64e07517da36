"""MOML: task weights as the upper level of a multi-objective bilevel problem (one-step look-ahead)."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import simplex_qp
from polytask.methods._weighting import PerTaskMethod, adam_rows
from polytask.methods.base import Step, check_positive, register


@register("moml")
class MOML(PerTaskMethod):
    """MOML — Ye et al., "Multi-Objective Meta Learning", NeurIPS 2021
    (the multi-task instance with one inner step), as LibMTL's ``bacth_forward_MOML`` computes it.

    The weights are w = softmax(α) over the step's tasks, α learned. The lower level is one virtual
    SGD step on the inner batch, θ' = θ − η Jᵀw (η = ``inner_lr``); the upper level has one objective
    per task, Lₖ on the outer batch at θ'. Each objective's gradient in α is

        hₖ = −η (J ∇Lₖ^outer(θ'))ᵀ S,   S = ∂softmax(α)/∂α = diag(w) − wwᵀ

    and the α-update is MGDA on them (Sener & Koltun's ``l2`` normalisation, LibMTL's choice): the
    min-norm point of the hull of hₖ/‖hₖ‖, here exact (quadprog), followed by one Adam step on α
    (``lr``). The step's weights are the updated softmax(α) (Σw = 1). The method declares
    ``lookahead``: the Trainer gives it half of each batch as the inner batch (the update's) and the
    other half as the outer batch, and ``Step.lookahead`` returns the T outer gradients at θ' from
    one forward (T backwards): about 2T + 2 backward passes per step, against EW's 1.
    ``lookahead: false`` approximates ∇Lₖ^outer(θ') by the inner gradient gₖ at θ (no outer batch,
    no extra pass: hₖ = −η (Gₖ)ᵀS from the Gramian), for plain loops without a closure and for the
    contract suites, which build steps by hand.

    Departures: the look-ahead moves θ (the compared parameters), not the heads (LibMTL copies the
    whole model); LibMTL's MGDA is Frank-Wolfe, this is the exact min-norm point; the outer batch is
    the other half of the training batch (LibMTL draws two half-size batches). LibMTL's bilevel
    code lives in its trainer and cannot be installed here; the test re-derives the formula above
    with autograd through θ'.
    """

    needs = "jacobian"
    stateful = True
    lookahead = True  # the default; an instance takes its `lookahead` parameter
    example_params = {"lookahead": False}  # the suites build steps by hand, without an outer batch

    def __init__(self, *, inner_lr: float = 1e-3, lr: float = 1e-3, lookahead: bool = True) -> None:
        super().__init__()
        self.inner_lr = check_positive("moml", "inner_lr", inner_lr)
        self.lr = check_positive("moml", "lr", lr)
        if not isinstance(lookahead, bool):
            raise InvalidParameterError(f"`lookahead` of `moml` must be a bool; found {lookahead!r}")
        self.lookahead = lookahead  # type: ignore[misc]
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self.register_buffer("hypergradient", torch.empty(0, dtype=torch.float64), persistent=False)
        self._remember(inner_lr=inner_lr, lr=lr, **({} if lookahead else {"lookahead": False}))

    def reset_state(self, num_tasks: int) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps"):
            setattr(self, name, torch.zeros(num_tasks, dtype=torch.float64))
        self.hypergradient = torch.zeros(num_tasks, dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        j = step.jacobian.detach()  # type: ignore[union-attr]  # Method.forward checked
        w = torch.softmax(self.logits[idx], dim=0)
        n = len(idx)
        if self.lookahead:
            if step.lookahead is None:
                raise InvalidParameterError("`moml` needs the step's outer batch (Step.lookahead): train it with the "
                                            "Trainer, pass lookahead= to Engine.backward, or use lookahead=False")
            _, outer = step.lookahead(-self.inner_lr * (w.to(j) @ j), torch.eye(n, dtype=j.dtype, device=j.device))
            cross = (outer @ j.T).double().cpu()  # ∇Lₖ^outer(θ')ᵀ gᵢ
        else:
            cross = step.gramian.detach().double().cpu()  # type: ignore[union-attr]  # gₖᵀgᵢ at θ
        jacobian_s = (torch.diag(w) - torch.outer(w, w)).cpu()
        h = -self.inner_lr * cross @ jacobian_s  # (T outer objectives, T logits)
        norms = h.norm(dim=1, keepdim=True)
        unit = torch.where(norms > 0, h / norms.clamp_min(1e-300), torch.zeros_like(h))
        sol = simplex_qp(unit @ unit.T) if bool((norms > 0).any()) else torch.full((n,), 1.0 / n, dtype=torch.float64)
        hyper = (sol @ unit).to(self.logits.device)
        self.hypergradient = torch.zeros_like(self.logits)
        self.hypergradient[idx] = hyper
        adam_rows(self, idx, hyper, lr=self.lr)
        return torch.softmax(self.logits[idx], dim=0).to(dtype=step.losses.dtype, device=step.losses.device)
