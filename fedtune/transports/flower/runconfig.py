"""fedtune RunConfig from a Flower run config (`[tool.flwr.app.config]` + `flwr run --run-config`).

Keys:
  fedtune-config = "path/to/run.toml"   optional fedtune TOML (absolute, or relative to the working
                                        directory, else to the Flower app's directory); "" = defaults
  fedtune-resume = false                true: continue from the newest checkpoint in run.out
  fedtune.<section>.<key> = value       any fedtune config key, e.g. fedtune.run.rounds = 2,
                                        fedtune.train.lr = 1e-3, fedtune.privacy.mode = "sample";
                                        "" = not set (the TOML / fedtune default applies); lists as a
                                        TOML array in a string: fedtune.data.paths = '["a.jsonl"]'

Flower accepts only `--run-config` keys the app declares, so the app's pyproject declares every fedtune key
(`declared_keys()`; `python -m fedtune.transports.flower.runconfig` prints the block; tests/test_flower.py checks the
app is in step; `--write simulations/flower_app/pyproject.toml` updates it). The values go through fedtune's own
config loading and validation (clear errors).
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedtune import config
from fedtune.config import ConfigError, RunConfig

PREFIX = "fedtune."
CONFIG_KEY, RESUME_KEY = "fedtune-config", "fedtune-resume"
UNSET = ""


def _find(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_file():
        return p
    for entry in sys.path:  # Flower puts the installed app's directory on sys.path
        if entry and (cand := Path(entry) / p).is_file():
            return cand
    raise ConfigError(f"{CONFIG_KEY} {path!r} not found (cwd {Path.cwd()}); give an absolute path")


def section_keys() -> dict[str, list[str]]:
    """section → its keys, for every section a Flower run can set."""
    from fedtune.algorithms import available, config_class
    from fedtune.algorithms.common.lora import LoRAConfig
    from fedtune.algorithms.wrappers.robust import RobustConfig
    from fedtune.privacy.config import PrivacyConfig
    from fedtune.secagg.config import SecAggConfig
    from fedtune.transports.flower.options import FlowerOptions

    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    out = {name: names(cls) for name, cls in config._SECTIONS.items()}
    algos = {name: names(config_class(name)) for name in available()}
    return out | {"lora": names(LoRAConfig)} | algos | {"privacy": names(PrivacyConfig), "robust": names(RobustConfig),
                                                        "secagg": names(SecAggConfig),
                                                        "flower": sorted(names(FlowerOptions))}


def declared_keys() -> list[str]:
    """Every `fedtune.<section>.<key>` the Flower app must declare to make it reachable from --run-config."""
    return sorted(f"{PREFIX}{s}.{k}" for s, keys in section_keys().items() for k in keys)


def _default_type(section: str, key: str) -> type | None:
    cls = config._SECTIONS.get(section)
    if cls is None:
        return None
    for f in dataclasses.fields(cls):
        if f.name == key:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            return type(default)
    return None


def _value(dotted: str, v: Any) -> Any:
    """A Flower scalar → the fedtune value: TOML arrays in strings are parsed; main-section types checked."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{PREFIX}{dotted} = {v!r}: not a TOML array ({e})") from None
    section, key = dotted.split(".", 1)
    want = _default_type(section, key)
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if want in (int, float, bool, str) and not isinstance(v, want) or (want is int and isinstance(v, bool)):
        raise ConfigError(f"{PREFIX}{dotted} = {v!r}: expected {want.__name__}"
                          + (" (write it without quotes)" if isinstance(v, str) else ""))
    if want is list and not isinstance(v, list):
        raise ConfigError(f"{PREFIX}{dotted} = {v!r}: expected a list, e.g. '[\"a\", \"b\"]'")
    return v


def resolve(run_config: dict[str, Any]) -> tuple[RunConfig, bool]:
    """(fedtune RunConfig, resume) from a Flower run config."""
    path = str(run_config.get(CONFIG_KEY, "") or "")
    overrides = {}
    for k, v in run_config.items():
        if not k.startswith(PREFIX) or (isinstance(v, str) and v == UNSET):
            continue
        dotted = k[len(PREFIX):]
        if "." not in dotted:
            raise ConfigError(f"run-config key {k!r} must be {PREFIX}<section>.<key>")
        overrides[dotted] = _value(dotted, v)
    resume = run_config.get(RESUME_KEY, False)
    if not isinstance(resume, bool):
        raise ConfigError(f"{RESUME_KEY} must be true or false, got {resume!r}")
    return config.load(_find(path) if path else None, overrides), resume


def resolve_config(run_config: dict[str, Any]) -> RunConfig:
    return resolve(run_config)[0]


def pyproject_block(values: dict[str, Any] | None = None, *, config_path: str = "fedtune.toml",
                    resume: bool = False) -> str:
    """The [tool.flwr.app.config] block declaring every fedtune key ("" = unset unless in `values`, keyed
    "<section>.<key>")."""
    import json

    values = values or {}
    lines = ["[tool.flwr.app.config]", f"{CONFIG_KEY} = {json.dumps(config_path)}",
             f"{RESUME_KEY} = {json.dumps(resume)}"]
    by_section: dict[str, list[str]] = {}
    for k in declared_keys():
        section, key = k[len(PREFIX):].split(".", 1)
        by_section.setdefault(section, []).append(key)
    for section, keys in by_section.items():
        lines += ["", f"[tool.flwr.app.config.fedtune.{section}]"]
        for key in keys:
            v = values.get(f"{section}.{key}", UNSET)
            lines.append(f"{key} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def write_block(pyproject: Path) -> bool:
    """Replace the [tool.flwr.app.config] block (everything from its header to the end of the file) of a Flower
    app's pyproject.toml with `pyproject_block()`, keeping the values the app sets (a key fedtune no longer has is
    dropped, and said); True when the file changed."""
    text = pyproject.read_text()
    head = text.index("[tool.flwr.app.config]\n")
    app = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    declared = set(declared_keys())
    values = {}
    for section, keys in app.get("fedtune", {}).items():
        for key, v in keys.items():
            if v == UNSET:
                continue
            if f"{PREFIX}{section}.{key}" not in declared:
                print(f"dropped {PREFIX}{section}.{key} = {v!r}: not a fedtune key any more", file=sys.stderr)
                continue
            values[f"{section}.{key}"] = v
    new = text[:head] + pyproject_block(values, config_path=app.get(CONFIG_KEY, "fedtune.toml"),
                                        resume=bool(app.get(RESUME_KEY, False)))
    if new == text:
        return False
    pyproject.write_text(new)
    return True


if __name__ == "__main__":  # python -m fedtune.transports.flower.runconfig [--write simulations/flower_app/pyproject.toml]
    if sys.argv[1:2] == ["--write"]:
        print("updated" if write_block(Path(sys.argv[2])) else "up to date", sys.argv[2])
    else:
        print(pyproject_block(), end="")
