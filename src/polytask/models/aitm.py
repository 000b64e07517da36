"""Adaptive Information Transfer Multi-task (AITM) framework for multi-step conversion funnels."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import VISION_KINDS, Task
from polytask.models._common import check_rows, encoder_width, positive_int, trainable
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.heads import layer_sizes, mlp_layers


class TransferAttention(nn.Module):
    """AIT's attention over two vectors: the transferred pₜ₋₁ and the task's own tower output qₜ.

    For u ∈ {pₜ₋₁, qₜ}: ŵᵤ = ⟨h₁(u), h₂(u)⟩ / √k, w = softmax(ŵ) over the two, zₜ = Σᵤ wᵤ h₃(u)
    (eq. 2–4 of Xi et al. 2021; h₁, h₂, h₃ single linear layers, k the width).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def weights(self, inputs: Tensor) -> Tensor:
        """(batch, 2, k) inputs → (batch, 2) weights, rows summing to 1."""
        return torch.softmax((self.query(inputs) * self.key(inputs)).sum(-1) * self.scale, dim=-1)

    def forward(self, transferred: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        inputs = torch.stack([transferred, own], dim=1)
        w = self.weights(inputs)
        return torch.einsum("bu,buk->bk", w, self.value(inputs)), w


def calibration_penalty(probabilities: Sequence[Tensor]) -> Tensor:
    """Behavioral expectation calibrator: Σₜ mean over the batch of max(ŷₜ − ŷₜ₋₁, 0), over consecutive steps."""
    terms = [torch.relu(later - earlier).mean() for earlier, later in zip(probabilities[:-1], probabilities[1:])]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@ARCHITECTURES.register("aitm")
class AITM(MultiTaskModel):
    """Funnel steps in sequence, each mixing what the previous step transfers (Xi et al., KDD 2021).

    Adaptive Information Transfer Multi-task framework (Xi, Chen, Zhang, Zhou, Xu, Zheng, Fang,
    Lu & Hu, "Modeling the Sequential Dependence among Audience Multi-step Conversions with
    Multi-task Learning in Targeted Display Advertising", KDD 2021).

    Tasks are the funnel's steps in ``task_names`` order (impression → click → conversion …).
    A shared encoder (the embeddings) feeds one tower per step, qₜ = towerₜ(x). The first step
    reads z₁ = q₁; each later step mixes what the previous step transfers, pₜ₋₁ = gₜ₋₁(zₜ₋₁)
    (a Linear → ReLU transfer layer), with its own tower output by the Adaptive Information
    Transfer attention, zₜ = AIT(pₜ₋₁, qₜ) (:class:`TransferAttention`), and predicts
    ŷₜ = σ(headₜ(zₜ)). Training adds the Behavioral Expectation Calibrator,
    L = Σₜ CEₜ + α Σ_{t≥2} mean max(ŷₜ − ŷₜ₋₁, 0): a later step should not be likelier than the
    one before it. α is ``calibration_weight``; the penalty comes through :meth:`extra_loss`,
    read from the latest training forward pass. Outputs are logits, so each task's binary
    cross-entropy is the paper's loss.

    θ: the encoder, every step's tower, transfer layer and attention but the last step's (they
    reach the losses of that step and all later ones). Private to task t: its output head; the
    last step also owns its tower and attention. z: the encoder output (batch, D), read by every
    tower, so ``compare="features"`` applies.

    Departures
    ----------
    - Tasks of any kind are accepted (a regression or multiclass step transfers its zₜ the
      same way); the calibrator only constrains consecutive pairs of binary steps, the only
      ones with probabilities to order. The paper's funnels are all binary.
    - The towers are plain MLPs (``head_hidden`` layers, then ``tower_dim``, each Linear → ReLU);
      the paper's experiments also use batch normalisation and dropout there.
    - The calibrator is the latest training forward's only: with several forward passes per
      step (batch parts, several data sets) the penalty of the last one is added.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, tower_dim: int = 32, calibration_weight: float = 0.6,
                 head_hidden: Sequence[int] = (64,), head_dropout: float = 0.0, representation_dim: int | None = None) -> None:
        super().__init__(tasks)
        positive_int(tower_dim, "tower_dim", "aitm")
        if isinstance(calibration_weight, bool) or not isinstance(calibration_weight, (int, float)) \
                or not math.isfinite(calibration_weight) or calibration_weight < 0:
            raise InvalidParameterError(f"`calibration_weight` of `aitm` must be a finite number >= 0; found {calibration_weight!r}")
        vision = [t.name for t in tasks if t.kind in VISION_KINDS]
        if vision:
            raise InvalidParameterError(f"`aitm` predicts one vector per sample per step; task(s) {vision} are per-pixel or detection")
        hidden = layer_sizes(head_hidden, "head_hidden", "aitm")
        dim = encoder_width(encoder, "aitm", representation_dim)
        self.encoder = encoder
        self.representation_dim, self.tower_dim = dim, tower_dim
        self.calibration_weight = float(calibration_weight)
        names = self.task_names
        self.towers = nn.ModuleDict({t: mlp_layers(dim, [*hidden, tower_dim], None, dropout=head_dropout) for t in names})
        self.transfers = nn.ModuleDict({t: nn.Sequential(nn.Linear(tower_dim, tower_dim), nn.ReLU()) for t in names[:-1]})
        self.attentions = nn.ModuleDict({t: TransferAttention(tower_dim) for t in names[1:]})
        self.heads = nn.ModuleDict({t.name: nn.Linear(tower_dim, t.out_features) for t in tasks})
        self._penalty: Tensor | None = None

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        return check_rows(self.encoder(x), self.representation_dim, f"encoder {type(self.encoder).__name__}")

    def _steps(self, z: Tensor, upto: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Raw head outputs and attention weights (batch, 2) of the steps 0..upto."""
        outputs: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}
        mixed: Tensor | None = None
        for t in self.task_names[:upto + 1]:
            own = self.towers[t](z)
            if mixed is None:
                mixed = own
            else:
                prev = self.task_names[self.task_names.index(t) - 1]
                mixed, weights[t] = self.attentions[t](self.transfers[prev](mixed), own)
            outputs[t] = self.heads[t](mixed)
        return outputs, weights

    def attention_weights(self, x: Tensor) -> dict[str, Tensor]:
        """Per step after the first: (batch, 2) weights on (transferred pₜ₋₁, own qₜ), rows summing to 1."""
        return self._steps(self.encode(x), len(self.task_names) - 1)[1]

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        if not names:
            return {}
        raw, _ = self._steps(z, max(self.task_names.index(t) for t in names))
        out = {t: self.tasks[t].prepare_prediction(a) for t, a in raw.items()}
        if self.training and torch.is_grad_enabled():
            self._penalty = self._calibration(out)
        return {t: out[t] for t in names}

    def _calibration(self, out: dict[str, Tensor]) -> Tensor | None:
        pairs = [(a, b) for a, b in zip(self.task_names[:-1], self.task_names[1:])
                 if a in out and b in out and self.tasks[a].kind == "binary" and self.tasks[b].kind == "binary"]
        if not pairs:
            return None
        return torch.stack([calibration_penalty([torch.sigmoid(out[a]), torch.sigmoid(out[b])]) for a, b in pairs]).sum()

    def extra_loss(self) -> Tensor | None:
        """α × the calibrator penalty of the latest training forward pass (then forgotten)."""
        penalty, self._penalty = self._penalty, None
        if penalty is None or self.calibration_weight == 0.0:
            return None
        return self.calibration_weight * penalty

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from trainable(self.encoder.parameters())
        for t in self.task_names[:-1]:
            yield from trainable(self.towers[t].parameters())
            yield from trainable(self.transfers[t].parameters())
            if t in self.attentions:
                yield from trainable(self.attentions[t].parameters())

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
        if name == self.task_names[-1]:
            yield from self.towers[name].parameters()
            if name in self.attentions:
                yield from self.attentions[name].parameters()
