"""Several input modalities, one encoder each, fused into one representation; a modality may be missing per sample."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from polytask.core.errors import DataError, InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS

FUSIONS = ("concat", "gated")
INTEGER_ENCODERS = ("text", "pretrained_text")  # read token ids: their columns are cast back to integers


@ENCODERS.register("fused")
class Fused(nn.Module):
    """Per-modality encoders on column ranges of one (batch, C) input, fused; missing modalities per sample.

    ``modalities`` maps a name to an encoder spec with the columns it reads,
    ``{"text": {"name": "text", "columns": [0, 100], "vocab_size": 5000}, "profile": {"name": "mlp",
    "columns": [100, 103], "hidden": [16]}}``: encoder m reads x[:, start:end] (cast to int64 for
    ``text`` and ``pretrained_text``, whose inputs are token ids; ``tabular`` casts its codes itself) and gives eₘ,
    projected to ``out_features`` (Linear → ReLU): hₘ. ``"present": c`` names a column holding 1
    where the sample has modality m and 0 where it lacks it (its columns then hold anything, e.g.
    zeros: the data layer refuses NaN); hₘ of a missing modality is left out:

    - ``fusion="concat"`` (early fusion by concatenation): z = ReLU(W [h₁·δ₁ + (1 − δ₁)·μ₁, …, δ₁, …])
      with δₘ ∈ {0, 1} present or not and μₘ a learned stand-in for a missing modality, the
      presence bits part of the input (the "missing indicator" approach).
    - ``fusion="gated"`` (attention-gated sum, as in gated multimodal units — Arevalo, Solorio,
      Montes-y-Gómez & González, "Gated Multimodal Units for Information Fusion", ICLR 2017
      workshop — with a softmax over modalities): aₘ = vᵀ tanh(U hₘ), g = softmax over the
      present modalities of a, z = Σₘ gₘ hₘ; a missing modality gets weight 0 exactly.

    A sample with no modality at all is an error. ``gate_weights(x)`` gives g (batch, M).

    Departures
    ----------
    - The gated unit of Arevalo et al. is for two modalities with a sigmoid gate; this is its
      softmax generalisation to M modalities with missing ones masked out.
    """

    def __init__(self, *, modalities: Mapping[str, Mapping[str, Any]], fusion: str = "gated", out_features: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise InvalidParameterError(f"`fusion` of `fused` must be one of {', '.join(FUSIONS)}; found {fusion!r}")
        if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
            raise InvalidParameterError(f"`out_features` of `fused` must be a positive int; found {out_features!r}")
        if not isinstance(modalities, Mapping) or len(modalities) < 2:
            raise InvalidParameterError("`modalities` of `fused` maps two or more names to encoder specs with `name` and "
                                        f"`columns: [start, end]`; found {modalities!r}")
        self.columns: dict[str, tuple[int, int]] = {}
        self.integer: dict[str, bool] = {}
        self.present: dict[str, int | None] = {}
        encoders, projections = {}, {}
        for m, spec in modalities.items():
            if not isinstance(spec, Mapping) or "name" not in spec or "columns" not in spec:
                raise InvalidParameterError(f"modality '{m}' of `fused` needs `name` (an encoder) and `columns: [start, end]`; "
                                            f"found {spec!r}")
            cols = spec["columns"]
            if not (isinstance(cols, (list, tuple)) and len(cols) == 2 and all(isinstance(c, int) and not isinstance(c, bool)
                                                                                 for c in cols) and 0 <= cols[0] < cols[1]):
                raise InvalidParameterError(f"`columns` of modality '{m}' of `fused` must be [start, end] with 0 <= start < end; "
                                            f"found {cols!r}")
            present = spec.get("present")
            if present is not None and (not isinstance(present, int) or isinstance(present, bool) or present < 0
                                        or cols[0] <= present < cols[1]):
                raise InvalidParameterError(f"`present` of modality '{m}' of `fused` must be a column index outside its "
                                            f"columns {cols}; found {present!r}")
            self.present[m] = present
            params = {k: v for k, v in spec.items() if k not in ("name", "columns", "present")}
            if spec["name"] == "mlp":
                params.setdefault("in_features", cols[1] - cols[0])
            encoder = ENCODERS.create(spec["name"], **params)
            width = getattr(encoder, "out_features", None)
            if not isinstance(width, int):
                raise InvalidParameterError(f"the encoder of modality '{m}' ({spec['name']}) has no int `out_features`")
            self.columns[m] = (cols[0], cols[1])
            self.integer[m] = spec["name"] in INTEGER_ENCODERS
            encoders[m] = encoder
            projections[m] = nn.Sequential(nn.Linear(width, out_features), nn.ReLU(), nn.Dropout(dropout))
        self.names = list(self.columns)
        self.encoders, self.projections = nn.ModuleDict(encoders), nn.ModuleDict(projections)
        self.in_features = max([end for _, end in self.columns.values()] + [c + 1 for c in self.present.values() if c is not None])
        self.fusion, self.out_features = fusion, out_features
        if fusion == "concat":
            self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(out_features)) for m in self.names})
            self.mix = nn.Sequential(nn.Linear(len(self.names) * (out_features + 1), out_features), nn.ReLU())
        else:
            self.score = nn.Sequential(nn.Linear(out_features, out_features), nn.Tanh(), nn.Linear(out_features, 1, bias=False))

    def _modalities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(batch, M, out_features) per-modality representations and (batch, M) presence."""
        if x.dim() != 2 or not x.is_floating_point() or x.shape[1] < self.in_features:
            raise ShapeError(f"`fused` expects a float (batch, >= {self.in_features}) table whose column ranges "
                             f"{self.columns} are the modalities; found {x.dtype} {tuple(x.shape)}")
        hs, present = [], []
        for m in self.names:
            start, end = self.columns[m]
            column = self.present[m]
            if column is None:
                here = torch.ones(len(x), dtype=torch.bool, device=x.device)
            else:
                flag = x[:, column]
                wrong = (flag != 0) & (flag != 1)
                if wrong.any():
                    row = int(wrong.nonzero()[0])
                    raise DataError(f"`fused`: row {row}, presence column {column} of modality '{m}' holds {float(flag[row])}; "
                                    "expected 1 (present) or 0 (missing)")
                here = flag == 1
            part = x[:, start:end]
            if self.integer[m]:  # token ids held in a float table: exact below 2**24
                part = part.round().long()
            h = self.projections[m](self.encoders[m](part))
            hs.append(h)
            present.append(here)
        presence = torch.stack(present, 1)
        empty = ~presence.any(1)
        if empty.any():
            raise DataError(f"`fused`: row {int(empty.nonzero()[0])} has none of the modalities {self.names} (every presence column 0)")
        return torch.stack(hs, 1), presence

    def gate_weights(self, x: Tensor) -> Tensor:
        """(batch, M) fusion weights, rows summing to 1, 0 on missing modalities (``fusion="gated"`` only)."""
        if self.fusion != "gated":
            raise InvalidParameterError("`gate_weights` exists for fusion: gated")
        h, presence = self._modalities(x)
        return self._gates(h, presence)

    def _gates(self, h: Tensor, presence: Tensor) -> Tensor:
        scores = self.score(h).squeeze(-1).masked_fill(~presence, float("-inf"))
        return torch.softmax(scores, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        h, presence = self._modalities(x)
        if self.fusion == "gated":
            return torch.einsum("bm,bmd->bd", self._gates(h, presence), h)
        keep = presence.unsqueeze(-1).to(h.dtype)
        stand_in = torch.stack([self.missing[m] for m in self.names])[None]
        filled = keep * h + (1 - keep) * stand_in
        return self.mix(torch.cat([filled.flatten(1), presence.to(h.dtype)], 1))
