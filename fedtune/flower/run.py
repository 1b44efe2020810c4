"""`fedtune simulate --engine flower`: the run through Flower's simulation engine (in-process
`flwr.simulation.run_simulation`, Ray backend), one virtual SuperNode per client.

[flower] config section (optional): num_actors (2), cpus_per_actor (1), backend ("ray"), client_cache (0 =
unbounded per-process node-model cache, see client.py); deployment: clients (the run's client ids in roster
order; default: the ids the SuperNodes report, sorted), node_timeout_s (120: how long the ServerApp waits for
federation.num_clients SuperNodes to connect), straggler_timeout_s (0 = off: once federation.min_clients nodes
have replied, wait at most this long for the rest of the round's nodes)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from fedtune.config import ConfigError, RunConfig

log = logging.getLogger("fedtune")
KEYS = {"num_actors", "cpus_per_actor", "backend", "client_cache", "clients", "node_timeout_s", "straggler_timeout_s"}


def flower_options(cfg: RunConfig) -> dict[str, Any]:
    raw = dict(cfg.extra.get("flower", {}))
    if unknown := sorted(set(raw) - KEYS):
        raise ConfigError(f"[flower] has unknown keys {unknown}; valid: {sorted(KEYS)}")
    opts = {"num_actors": 2, "cpus_per_actor": 1.0, "backend": "ray", "client_cache": 0, "clients": [],
            "node_timeout_s": 120.0, "straggler_timeout_s": 0.0} | raw
    if int(opts["num_actors"]) < 1 or float(opts["cpus_per_actor"]) <= 0:
        raise ConfigError("[flower] num_actors must be ≥ 1 and cpus_per_actor > 0")
    clients = opts["clients"]
    if not isinstance(clients, list) or not all(isinstance(c, str) and c for c in clients):
        raise ConfigError(f"[flower] clients must be a list of client ids, got {clients!r}")
    if clients and len(clients) != cfg.federation.num_clients:
        raise ConfigError(f"[flower] clients lists {len(clients)} clients but federation.num_clients = "
                          f"{cfg.federation.num_clients}")
    if not float(opts["node_timeout_s"]) > 0:
        raise ConfigError("[flower] node_timeout_s must be > 0")
    if not 0 <= float(opts["straggler_timeout_s"]) < float("inf"):
        raise ConfigError("[flower] straggler_timeout_s must be ≥ 0 (0 = off)")
    return opts


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    o = flower_options(cfg)
    cpus = float(o["cpus_per_actor"])
    # Ray sizes the actor pool as (cluster CPUs / CPUs per client): num_actors × cpus_per_actor CPUs.
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": round(cpus * int(o["num_actors"])), "num_gpus": 0}}


def run_flower_simulation(cfg: RunConfig, *, resume: bool = False, progress: bool = False,
                          save_merged: bool = False) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from fedtune.flower.client import make_client_app
    from fedtune.flower.server import make_server_app

    # Ray workers import fedtune from PYTHONPATH: make sure it is this fedtune (worktree/editable safe).
    root = str(Path(__file__).resolve().parents[2])
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    if root not in sys.path:
        sys.path.insert(0, root)
    logging.getLogger("flwr").propagate = False  # flwr logs through its own handler; no duplicate lines
    result: dict[str, Any] = {}
    server = make_server_app(cfg, result=result, resume=resume, progress=progress, save_merged=save_merged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server, client_app=make_client_app(cfg, str(cfg.out_dir / "flower-nodes")),
                       num_supernodes=cfg.federation.num_clients, backend_name=str(flower_options(cfg)["backend"]),
                       backend_config=backend_config(cfg))
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return result["summary"]
