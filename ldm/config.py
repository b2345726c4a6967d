"""Mapping YAML parameter dicts onto the typed config dataclasses of the models."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any


def config_kwargs(cls: type, params: dict[str, Any], ignored: set[str] = frozenset()) -> dict[str, Any]:
    """Constructor arguments of dataclass `cls` from `params`; lists become tuples.

    Raises ValueError naming any key that is neither a field nor in `ignored`, so a typo in a
    YAML file is reported instead of silently falling back to a default.
    """
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - names - set(ignored))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} parameter(s) {unknown}; valid ones: {sorted(names)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (tuples as lists), ready for YAML or JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
