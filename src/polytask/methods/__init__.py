"""Weighting and gradient methods, each in its own module, all in the ``METHODS`` registry."""

import importlib
import pkgutil

from polytask.methods.base import METHODS, NEEDS, Method, Step, get_method, register

# Import every sibling module once so their @register decorators run.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "NEEDS", "Method", "Step", "get_method", "register"]
