"""Helpers of the stateful direction methods (MoCo, GREAT).

Their state's shape is only known at the first step (it depends on P, the number of shared
parameters): tensors start empty and take their shape from the first step or from a state dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def resize_to_state(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str) -> None:
    """Give ``module``'s own parameters and buffers the shapes and dtypes they have in ``state_dict``.

    Call from ``_load_from_state_dict`` before the copy, so a fresh method loads the state of one
    that has already run. Parameters keep their identity (``.data`` is replaced), so an optimizer
    holding them stays valid.
    """
    for name, param in module._parameters.items():
        saved = state_dict.get(prefix + name)
        if param is not None and saved is not None and (saved.shape, saved.dtype) != (param.shape, param.dtype):
            param.data = torch.empty(saved.shape, dtype=saved.dtype, device=param.device)
    for name, buf in module._buffers.items():
        saved = state_dict.get(prefix + name)
        if buf is not None and saved is not None and (saved.shape, saved.dtype) != (buf.shape, buf.dtype):
            module._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=buf.device)


class LazyStateMixin(nn.Module):
    """Loads state dicts whose tensors have shapes this (possibly fresh) module has not taken yet."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        resize_to_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
