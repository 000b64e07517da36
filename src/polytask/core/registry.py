"""Name → class registries with capability metadata and "did you mean" errors."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from polytask.core.errors import InvalidParameterError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of constructors (classes or factory functions).

    ``create(name, **params)`` checks the parameter names against the constructor's signature
    so that a typo in a YAML file is reported with the closest valid name.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise InvalidParameterError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise InvalidParameterError(
                f"unknown {self.kind} '{name}'.{closest(name, self._entries)} "
                f"Valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the entry accepts (excluding ``self`` and var-args)."""
        sig = inspect.signature(self.get(name))
        return {
            p.name: p
            for p in sig.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        }

    def check_params(self, name: str, params: Mapping[str, Any], reserved: tuple[str, ...] = ()) -> None:
        accepted = {k for k in self.parameters(name) if k not in reserved}
        for key in params:
            if key not in accepted:
                valid = ", ".join(sorted(accepted)) or "none"
                raise InvalidParameterError(
                    f"{self.kind} '{name}' has no parameter '{key}'.{closest(key, accepted)} "
                    f"Valid parameters: {valid}"
                )

    def check_required(self, name: str, params: Mapping[str, Any], reserved: tuple[str, ...] = ()) -> None:
        """Fail on a required parameter (one without a default) that ``params`` lacks."""
        missing = [k for k, p in self.parameters(name).items()
                   if p.default is p.empty and k not in params and k not in reserved]
        if missing:
            raise InvalidParameterError(
                f"{self.kind} '{name}' requires parameter(s) {', '.join(missing)}; found only: "
                f"{', '.join(params) or 'none'}"
            )

    def create(self, name: str, /, **params: Any) -> T:
        self.check_params(name, params)
        self.check_required(name, params)
        return self.get(name)(**params)

    def describe(self, name: str) -> str:
        """First docstring line, for `polytask list`."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""
