"""Task samplers for the multi-input regime."""

import importlib
import pkgutil

from polytask.data.samplers.base import SAMPLERS, Sampler

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["SAMPLERS", "Sampler"]
