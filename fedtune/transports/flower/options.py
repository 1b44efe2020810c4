"""The [flower] config section (optional).

Simulation (`fedtune simulate --engine flower`): num_actors (2), cpus_per_actor (1), backend ("ray"), client_cache
(0 = unbounded per-process node-model cache, see client.py). Deployment: clients (the run's client ids in roster
order; default: the ids the SuperNodes report, sorted), node_timeout_s (120: how long the ServerApp waits for
federation.num_clients SuperNodes to connect), straggler_timeout_s (0 = off: once federation.min_clients nodes
have replied, wait at most this long for the rest of the round's nodes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fedtune.config import ConfigError, RunConfig
from fedtune.configbase import option


@dataclass
class FlowerOptions:
    """[flower]: the Flower engine (`fedtune simulate --engine flower`, the Flower app)."""

    num_actors: int = option(2, "simulation: Ray actors (processes) that run the ClientApp")
    cpus_per_actor: float = option(1.0, "simulation: CPUs Ray reserves per actor")
    backend: str = option("ray", "simulation: Flower's simulation backend")
    gpus_per_actor: float = option(0.0, "simulation: GPUs Ray reserves per actor (client-resources-num-gpus): "
                                        "Ray sets each actor's CUDA_VISIBLE_DEVICES to the GPU(s) it assigns, so "
                                        "the ClientApp's cuda device is that GPU; 0.5: two actors per GPU")
    client_cache: int = option(0, "simulation: node models kept per actor process under sample-level DP (least "
                                  "recently used evicted; otherwise a process shares one model); 0: unbounded")
    max_message_gb: float = option(8.0, "the largest instruction payload (GB) the ServerApp sends; a bigger one "
                                        "stops the run before the round, naming what to change. Flower moves "
                                        "arrays in 5 MB chunks (no 2 GiB gRPC limit per message): this bounds "
                                        "the SuperLink's and the nodes' memory; 0: no limit")
    clients: list[str] = option([], "deployment: the run's client ids in roster order; empty: the ids the "
                                    "SuperNodes report, sorted")
    node_timeout_s: float = option(120.0, "deployment: how long the ServerApp waits for federation.num_clients "
                                          "SuperNodes to connect")
    straggler_timeout_s: float = option(0.0, "once federation.min_clients nodes have replied, wait at most this "
                                             "long for the rest of the round's nodes; 0: off")


def flower_options(cfg: RunConfig) -> dict[str, Any]:
    opts = dataclasses.asdict(cfg.section("flower", FlowerOptions))
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
    if not 0 <= float(opts["gpus_per_actor"]) < float("inf") or not 0 <= float(opts["max_message_gb"]) < float("inf"):
        raise ConfigError("[flower] gpus_per_actor and max_message_gb must be ≥ 0")
    if not 0 <= float(opts["straggler_timeout_s"]) < float("inf"):
        raise ConfigError("[flower] straggler_timeout_s must be ≥ 0 (0 = off)")
    return opts


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    o = flower_options(cfg)
    cpus, gpus = float(o["cpus_per_actor"]), float(o["gpus_per_actor"])
    # Ray sizes the actor pool as (cluster CPUs / CPUs per client): num_actors × cpus_per_actor CPUs; with GPUs per
    # actor Ray also caps it at (GPUs / GPUs per actor) and gives each actor its own CUDA_VISIBLE_DEVICES
    init: dict[str, Any] = {"num_cpus": round(cpus * int(o["num_actors"]))}
    if not gpus:
        init["num_gpus"] = 0  # else Ray counts the machine's GPUs itself
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus}, "init_args": init}
