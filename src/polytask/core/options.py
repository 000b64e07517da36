"""Typed option sections: one pydantic model per group of settings, validated once.

The same classes are the Python API's arguments (``Engine(**EngineOptions fields)``,
``Trainer(loop=LoopOptions(...))``) and the sections of the YAML schema, so a value is checked
in exactly one place whichever way it arrives. A section also names the keys that moved
elsewhere (``moved``), so an old config or call fails with the new name instead of a bare
"unknown key".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from polytask.core.errors import InvalidParameterError, closest

O = TypeVar("O", bound="Options")  # noqa: E741


class Options(BaseModel):
    """A strict section: unknown keys are errors, numbers must be finite, values are frozen."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
    #: old key → where it lives now, as the error shows it (``"`optim.lr`"``); checked first
    moved: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_moved(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                if key in cls.moved:
                    raise ValueError(f"`{key}` has moved: use {cls.moved[key]}")
        return data


def options(cls: type[O], value: O | Mapping[str, Any] | None, where: str) -> O:
    """``value`` as a validated ``cls``: an instance as is, a mapping validated, None the defaults.

    Errors become one :class:`InvalidParameterError` naming ``where``, each bad key and the
    value found.
    """
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"`{where}` must be a {cls.__name__} or a mapping of its fields; "
                                    f"found {type(value).__name__}")
    try:
        return cls.model_validate(dict(value))
    except ValidationError as exc:
        raise InvalidParameterError(describe(exc, cls, where)) from None


def describe(error: ValidationError, root: type[BaseModel], where: str) -> str:
    """One line per problem: the dotted key, what was wrong, what was found, the closest key."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        key = f"{where}.{loc}" if loc else where
        if item["type"] == "extra_forbidden":
            valid = list(root.model_fields) if len(item["loc"]) == 1 else []
            hint = closest(str(item["loc"][-1]), valid) if valid else ""
            lines.append(f"unknown key `{key}`.{hint} Valid keys: {', '.join(valid)}" if valid
                         else f"unknown key `{key}`")
            continue
        message = item["msg"].removeprefix("Value error, ")
        found = item.get("input")
        shown = "" if isinstance(found, Mapping) or item["type"] == "value_error" else f"; found {found!r}"
        lines.append(f"{key}: {message}{shown}")
    return "; ".join(lines) if len(lines) == 1 else "invalid options:\n  " + "\n  ".join(lines)
