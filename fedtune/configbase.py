"""The bottom of the config layer (imports nothing of fedtune): the user-facing error and the one way a config
section dataclass is built from a TOML table. Every package that owns a section (privacy, robust aggregation, the
methods, data, models) uses these, so no lower layer has to import fedtune.config."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the problem and the fix."""


def dataclass_from_dict(cls, d: dict[str, Any], section: str):
    """cls(**d) for a section dataclass that validates itself; unknown keys are a ValueError naming them."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown [{section}] keys {unknown}; valid: {names}")
    return cls(**d)


def build_section(cls, raw: dict[str, Any], section: str):
    """cls(**raw) as a ConfigError (naming the section) on unknown keys or a bad value."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"[{section}] has unknown keys {unknown}; valid: {sorted(names)}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ConfigError(f"[{section}]: {e}") from None


def option(default: Any, help: str):
    """A config field with its help text (docs/configuration.md is generated from it); a list default is copied."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
