"""The one YAML loader of megatron-gate: safe tags only, and no key given twice.

PyYAML's `SafeLoader` builds no Python objects from a file, but a mapping that names the same
key twice silently keeps the last value. In a config that is nearly always a merge or copy
mistake (`log_interval: 10` ... `log_interval: 1`), so `UniqueKeySafeLoader` refuses it,
naming the key and both lines:

    data = yaml.load(text, Loader=UniqueKeySafeLoader)     # or: safe_yaml.load(text)

Merge keys (`<<: *base`) may still be overridden by the mapping's own keys, as YAML intends.
"""

from __future__ import annotations

from typing import Any

import yaml

from megatron_gate.errors import InputError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(InputError):
    """A YAML mapping names the same key twice; the message names the key and both lines."""

    def __init__(self, key: object, *, first_line: int, second_line: int) -> None:
        super().__init__(
            f"key {str(key)[:80]!r} is given twice, on lines {first_line} and {second_line}"
        )
        self.key, self.first_line, self.second_line = key, first_line, second_line

    def __reduce__(self) -> tuple:  # picklable (a spawned rank reports it to its parent)
        return (_rebuild, (self.key, self.first_line, self.second_line))

    fix = "keep one of them (a repeated key is usually a merge or copy mistake)"


def _rebuild(key: object, first_line: int, second_line: int) -> DuplicateKeyError:
    return DuplicateKeyError(key, first_line=first_line, second_line=second_line)


class UniqueKeySafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that raises `DuplicateKeyError` for a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise DuplicateKeyError(key, first_line=first_lines[key], second_line=line)
                first_lines[key] = line
            except TypeError:
                continue  # an unhashable key: SafeLoader itself refuses it next


def load(text: str) -> Any:
    """`text` parsed with `UniqueKeySafeLoader` (raises `DuplicateKeyError`, `yaml.YAMLError`)."""
    return yaml.load(text, Loader=UniqueKeySafeLoader)
