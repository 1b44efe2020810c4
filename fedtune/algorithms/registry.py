"""The methods fedtune knows. Each method package registers its FedAlgorithm class in its own `__init__`:

    register(FedAvg)                 # name, config class, capabilities: declared on the class

and nothing else in fedtune names it. The registry finds the method packages itself: every subpackage of
fedtune.algorithms (those that call `register`), plus any installed distribution that declares an entry point in
the group "fedtune.methods" (a module to import, e.g. `mymethod = "mypkg.mymethod"`).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from importlib.metadata import entry_points
from typing import Any

from fedtune.algorithms.api import FedAlgorithm

log = logging.getLogger("fedtune")
ENTRY_POINTS = "fedtune.methods"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a config section name: lower-case identifier
_RESERVED = {"run", "model", "data", "federation", "train", "lora", "privacy", "robust", "server", "client", "flower"}
_METHODS: dict[str, type[FedAlgorithm]] = {}
_DEFAULT: list[str] = []
_discovered = False


def register(cls: type[FedAlgorithm], *, default: bool = False) -> type[FedAlgorithm]:
    """Make method `cls.name` known (its config section [cls.name] takes `cls.config_class`'s fields). `default`:
    the method a run config without [run] algorithm runs (one method only)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise ValueError(f"method name {name!r} of {cls.__qualname__} must be a lower-case identifier that is not a "
                         f"config section of fedtune's own ({', '.join(sorted(_RESERVED))})")
    if not isinstance(getattr(cls, "config_class", None), type):
        raise TypeError(f"{cls.__qualname__} declares no config_class (the dataclass of its [{name}] section)")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"two methods register as {name!r}: {_METHODS[name].__module__} and {cls.__module__}")
    _METHODS[name] = cls
    if default and name not in _DEFAULT:
        _DEFAULT.append(name)
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("fedtune.algorithms")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg:
            importlib.import_module(f"fedtune.algorithms.{info.name}")
    for ep in entry_points(group=ENTRY_POINTS):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not take fedtune's own methods down
            log.warning("method plug-in %s (%s) failed to import: %s: %s", ep.name, ep.value, type(e).__name__, e)


def available() -> list[str]:
    """Names of every registered method, sorted."""
    _discover()
    return sorted(_METHODS)


def method(name: str) -> type[FedAlgorithm]:
    """The FedAlgorithm class registered as `name` (ValueError naming the choices otherwise)."""
    _discover()
    if name not in _METHODS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(available())}")
    return _METHODS[name]


def config_class(name: str) -> type:
    return method(name).config_class


def get_algorithm(name: str, config: Any | None = None) -> FedAlgorithm:
    """Instantiate method `name` with its config dataclass (default config when None)."""
    cls = method(name)
    return cls(config if config is not None else cls.config_class())


def default_method() -> str:
    """The method a run runs when its config names none."""
    _discover()
    if len(_DEFAULT) != 1:
        raise RuntimeError(f"exactly one method must register with default=True, got {_DEFAULT}")
    return _DEFAULT[0]


def with_capability(predicate) -> list[str]:
    """Names of the methods (with their default config) whose Capabilities satisfy `predicate`: for messages that
    suggest what to use instead."""
    return [n for n in available() if predicate(get_algorithm(n).capabilities)]
