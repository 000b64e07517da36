"""One family of errors, all in one voice: what was expected, what was found, what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PolytaskError(Exception):
    """Base class of every error polytask raises on purpose."""


class InvalidParameterError(PolytaskError, ValueError):
    """A hyper-parameter or argument has a value outside what it accepts."""


class ConfigError(PolytaskError, ValueError):
    """The configuration file or an override is invalid."""


class DataError(PolytaskError, ValueError):
    """Data given for a task is malformed (shape, range, missing column, NaN)."""


class ShapeError(PolytaskError, ValueError):
    """A module returned a tensor of an unexpected shape."""


class MissingDependencyError(PolytaskError, ImportError):
    """An optional dependency is not installed."""


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' hint, or an empty string when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def require(module: str, extra: str | None = None):
    """Import an optional dependency or fail with the exact install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'polytask[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(f"'{module}' is required for this feature; install it with: {hint}") from exc
