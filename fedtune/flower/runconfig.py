"""fedtune RunConfig from a Flower run config (`[tool.flwr.app.config]` + `flwr run --run-config`).

Keys:
  fedtune-config = "path/to/run.toml"   optional fedtune TOML (absolute, or relative to the working
                                        directory, else to the Flower app's directory); "" = defaults
  fedtune.<section>.<key> = value       overrides, e.g. fedtune.run.rounds = 2 (TOML tables
                                        [tool.flwr.app.config.fedtune.run] flatten to these keys)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fedtune import config
from fedtune.config import ConfigError, RunConfig

PREFIX = "fedtune."


def _find(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_file():
        return p
    for entry in sys.path:  # Flower puts the installed app's directory on sys.path
        if entry and (cand := Path(entry) / p).is_file():
            return cand
    raise ConfigError(f"fedtune-config {path!r} not found (cwd {Path.cwd()}); give an absolute path")


def resolve_config(run_config: dict[str, Any]) -> RunConfig:
    path = str(run_config.get("fedtune-config", "") or "")
    overrides = {k[len(PREFIX):]: v for k, v in run_config.items() if k.startswith(PREFIX)}
    return config.load(_find(path) if path else None, overrides)
