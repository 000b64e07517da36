"""Read YAML the way a config needs it: safe, and with every key of a mapping given once.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so a config that sets
``epochs: 3`` and, further down, ``epochs: 30`` trains for 30 epochs and nobody knows why. The
loader here refuses it, naming the key and both lines. Merge keys (``<<: *defaults``) are
still allowed to be overridden by the mapping's own keys: that is what they are for.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode

from polytask.core.errors import ConfigError

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice (lines are 1-based, as an editor shows them)."""

    def __init__(self, key: Any, first: tuple[int, int], second: tuple[int, int]) -> None:
        self.key, self.first_line, self.line = key, first[0], second[0]
        where = (f"lines {first[0]} and {second[0]}" if first[0] != second[0]
                 else f"line {first[0]}, columns {first[1]} and {second[1]}")  # a flow mapping: {a: 1, a: 2}
        super().__init__(f"key {key!r} is given twice in the same mapping ({where}); "
                         "expected each key once: delete one of them")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a key given twice in one mapping.

    SafeLoader builds every mapping through ``self.construct_mapping``, so overriding it covers
    nested mappings and flow mappings (``{a: 1, a: 2}``) alike.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[int, int]] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader raises its own error for it below
                continue
            here = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)  # marks are 0-based
            if first is not None:
                raise DuplicateKeyError(key, first, here)
            seen[key] = here
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text_or_bytes: str | bytes, source: str) -> Any:
    """``yaml.safe_load`` that rejects duplicate keys; every failure is a ConfigError naming ``source``.

    ``source`` names what is read in the message (e.g. ``"config file runs/a.yaml"`` or
    ``"--set train.epochs"``). Bytes are decoded by PyYAML itself (UTF-8/16 with BOM detection),
    which reports undecodable bytes with their position.
    """
    try:
        return yaml.load(text_or_bytes, Loader=UniqueKeyLoader)  # a SafeLoader subclass: as safe as safe_load
    except DuplicateKeyError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
