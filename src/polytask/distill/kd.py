"""Output distillation losses per task kind: temperature-scaled KL with the T² correction, MSE.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network" (NIPS Deep Learning
Workshop). With student logits s, teacher logits t and temperature T:

- multiclass: p = softmax(t/T), q = softmax(s/T); loss per row = T² · KL(p ‖ q) = T² Σⱼ pⱼ (log pⱼ − log qⱼ);
- binary / multilabel: each logit a Bernoulli, p = σ(t/T), q = σ(s/T); loss per row = T² · KL(p ‖ q)
  (binary), or its mean over the labels (multilabel, as the task's own BCE averages labels);
- regression: (s − t)², the squared distance to the teacher's prediction (in the model's space:
  standardised targets when the task standardises them).

The T² factor keeps the gradient's size independent of T: ∂/∂s of KL at temperature T is
(q − p)/T, so without it the soft term fades as 1/T² next to the hard one (Hinton et al., §2);
at high T and zero-mean logits the corrected gradient tends to (s − t)/C.

KL differs from the soft cross-entropy −Σ p log q by the teacher's entropy, a constant for the
student: same gradient, but 0 when the student matches the teacher, so the value reads as a
distance. With a one-hot teacher (p = e_y) KL at T = 1 is the cross-entropy of y.

Departures: none in the formulas; the multilabel loss is the mean of the per-label KLs (the
paper has no multilabel case), matching the reduction of the task's BCE so that annealing's
λ·y + (1 − λ)·teacher mixes terms of one scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.core.errors import InvalidParameterError, ShapeError

KINDS = ("regression", "binary", "multiclass", "multilabel")


def check_temperature(temperature: float, owner: str = "distillation") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InvalidParameterError(f"`temperature` of {owner} must be a number > 0; found {temperature!r}")
    return float(temperature)


def soft_targets(teacher: Tensor, kind: str, temperature: float = 1.0) -> Tensor:
    """The teacher's probabilities at temperature T (regression: its prediction)."""
    if kind == "multiclass":
        return torch.softmax(teacher.float() / temperature, dim=-1)
    if kind in ("binary", "multilabel"):
        return torch.sigmoid(teacher.float() / temperature)
    return teacher.float()


def kd_rows(student: Tensor, teacher: Tensor, kind: str, *, temperature: float = 1.0, correction: bool = True,
            task: str = "?", probabilities: bool = False) -> Tensor:
    """Per-row distillation loss (N,) of student outputs against teacher outputs.

    ``student`` and ``teacher`` are the canonical raw outputs of one task ((N,) for regression and
    binary, (N, C) otherwise). ``probabilities``: the teacher is given as probabilities (a one-hot
    or soft label) rather than logits. ``correction``: multiply by T² (Hinton et al. 2015).
    """
    if kind not in KINDS:
        raise InvalidParameterError(f"task '{task}': unknown kind {kind!r} for distillation; expected one of {', '.join(KINDS)}")
    if student.shape != teacher.shape:
        raise ShapeError(f"task '{task}': teacher outputs have shape {tuple(teacher.shape)} per batch, the student's "
                         f"{tuple(student.shape)}; expected the same shape (same kind and number of classes)")
    T = check_temperature(temperature)
    s = student.float()
    if kind == "regression":
        return (s - teacher.float()) ** 2
    p = teacher.float() if probabilities else soft_targets(teacher, kind, T)
    if kind == "multiclass":
        log_q = F.log_softmax(s / T, dim=-1)
        rows = (torch.xlogy(p, p) - p * log_q).sum(-1)
    else:
        # Bernoulli KL: binary_cross_entropy_with_logits gives −[p log q + (1−p) log(1−q)]
        cross = F.binary_cross_entropy_with_logits(s / T, p, reduction="none")
        rows = cross + torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)
        if kind == "multilabel":
            rows = rows.mean(-1)
    return rows * (T * T) if correction else rows


def kd_loss(student: Tensor, teacher: Tensor, kind: str, *, temperature: float = 1.0, correction: bool = True,
            mask: Tensor | None = None, task: str = "?", probabilities: bool = False) -> Tensor | None:
    """Mean of :func:`kd_rows` over the rows ``mask`` keeps (all rows without a mask); None if none.

    Computed as the fused soft cross-entropy minus the teacher's entropy, the latter without a
    graph (a constant for the student): the same value and gradient as ``kd_rows(...).mean()``
    at a fraction of the kernels, which is what keeps a distillation step close to a plain one.
    """
    if kind not in KINDS:
        raise InvalidParameterError(f"task '{task}': unknown kind {kind!r} for distillation; expected one of {', '.join(KINDS)}")
    if student.shape != teacher.shape:
        raise ShapeError(f"task '{task}': teacher outputs have shape {tuple(teacher.shape)} per batch, the student's "
                         f"{tuple(student.shape)}; expected the same shape (same kind and number of classes)")
    T = check_temperature(temperature)
    if mask is not None:
        if not bool(mask.any()):
            return None
        if not bool(mask.all()):
            student, teacher = student[mask], teacher[mask]
    s, t = student.float(), teacher.float()
    if kind == "regression":
        return F.mse_loss(s, t)
    if T != 1.0:
        s = s / T
        if not probabilities:
            t = t / T
    with torch.no_grad():
        if kind == "multiclass":
            p = t if probabilities else torch.softmax(t, dim=-1)
            entropy = -(torch.xlogy(p, p) if probabilities else p * torch.log_softmax(t, dim=-1)).sum(-1).mean()
        else:
            p = t if probabilities else torch.sigmoid(t)
            entropy = (-(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).mean() if probabilities
                       else F.binary_cross_entropy_with_logits(t, p))
    cross = F.cross_entropy(s, p) if kind == "multiclass" else F.binary_cross_entropy_with_logits(s, p)
    loss = cross - entropy
    return loss * (T * T) if correction and T != 1.0 else loss
