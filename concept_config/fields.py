"""`key()`: how a schema field is declared - its default, a one-line doc (docs/config.md shows it)
and the checks `concept_shard.strict` applies to the composed value.

Metadata: `ge`, `gt`, `le`, `lt` (bounds, for numbers), `choices`, `check` (a function value ->
problem text or None), `inert` (the reason a reference key has no effect here), `refuse_unless`
(a value other than this one is refused: the reference feature is not built)."""

from __future__ import annotations

import dataclasses
from typing import Any

MISSING = "???"  # OmegaConf's mark of a required value


def whole(value, at_least: int = 0) -> bool:
    """Whether `value` is a whole number of at least `at_least`: an int, and not a bool (which
    Python counts as one). What the programs' own argument and record checks accept."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def key(default: Any = None, doc: str = "", **meta) -> Any:
    """A schema field: its default, and range/choice metadata checked by `check_values`."""
    meta["doc"] = doc
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):  # a nested section: a fresh one per instance
        return dataclasses.field(default_factory=type(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
