"""The Flower ClientApp: one virtual SuperNode = one organisation with its own model copy and version.

A node is identified by `context.node_config["partition-id"]` (set by Flower's simulation engine, or by
`flower-supernode --node-config "partition-id=K"` in a deployment) and hosts fedtune client `client-K`
with that client's data partition from `prepare_data` (the same function the in-process simulation uses).

Per-process cache. Ray reuses actor processes, so each process keeps `partition-id → NodeState(model,
ClientAlgorithm, version)` plus one pristine base model (copied per node, never trained). Which actor
serves a node is up to Flower, so a process can be asked to train a node it has not seen, or one it last
synced to an older version: the message says which version the server assumes (`from_version`); on a
mismatch the client replies "stale" with the version it has (-1: none) and the FlowerTransport resends a
setup/sync built from that version. Nothing is ever trained on a wrong model.

Memory: a process holds up to one model copy per node it has served (all N in the worst case; each actor
ends up with most of them). Fine for small models; for big ones set `[flower] client_cache = k` to keep
at most k node models per process (least recently used evicted; an evicted node is set up again from the
full sync payload, which costs bytes — counted in bytes_down — but not correctness), or run one node per
process (`flower-supernode` deployment, where the cache always hits).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.base import ClientAlgorithm, TrainContext
from fedtune.config import RunConfig
from fedtune.flower import serde
from fedtune.flower.runconfig import resolve_config

log = logging.getLogger("fedtune")


@dataclass
class NodeState:
    model: nn.Module
    client: ClientAlgorithm
    version: int


class _ProcessCache:
    """Base model, tokenizer and data partitions (per config), and per-node models, for one process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: str | None = None
        self.base: nn.Module | None = None
        self.tok = None
        self.data: dict[str, Any] = {}
        self.nodes: OrderedDict[int, NodeState] = OrderedDict()

    def ensure(self, cfg: RunConfig) -> None:
        import json

        from fedtune.data.prepare import context_length, prepare_data
        from fedtune.models import load_model

        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if key != self.key:  # new run / config in this process: drop everything
            self.base, self.tok = load_model(cfg.model.name, seed=cfg.run.seed)
            self.data = prepare_data(cfg, self.tok, context_len=context_length(self.base)).clients
            self.nodes.clear()
            self.key = key

    def new_node(self, cfg: RunConfig) -> NodeState:
        algo = get_algorithm(cfg.run.algorithm, cfg.algorithm_config())
        return NodeState(copy.deepcopy(self.base), algo.make_client(), -1)


_CACHE = _ProcessCache()


def cached_nodes() -> int:
    return len(_CACHE.nodes)


def handle_train(msg: Message, cfg: RunConfig) -> Message:
    ins, from_version = serde.record_to_instruction(msg.content)
    cid = ins.client_id
    limit = int(cfg.extra.get("flower", {}).get("client_cache", 0))
    with _CACHE.lock:  # one message at a time per process (Ray actors are single-threaded anyway)
        _CACHE.ensure(cfg)
        pid = int(cid.rsplit("-", 1)[1])
        node = _CACHE.nodes.get(pid)
        if ins.setup is not None:
            node = _CACHE.new_node(cfg)
            node.model = node.client.setup(node.model, ins.setup)
        elif node is None or node.version != from_version:
            have = -1 if node is None else node.version
            log.info("%s: local model at version %d, server assumed %d; asking for a resync", cid, have, from_version)
            return Message(serde.stale_record(cid, have), reply_to=msg)
        node.client.sync(node.model, ins.sync)
        node.version = ins.base_version
        _CACHE.nodes[pid] = node
        _CACHE.nodes.move_to_end(pid)
        while limit and len(_CACHE.nodes) > limit:
            _CACHE.nodes.popitem(last=False)
        ctx = TrainContext(cid, _CACHE.data[cid].train, _CACHE.tok.pad_token_id)
        update = node.client.train(node.model, ctx, ins.train)
    return Message(serde.update_to_record(update), reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """The fedtune ClientApp. With `cfg` the config travels with the app object (in-process
    `run_simulation`); without, it is read from the Flower run config (`flwr run`, see runconfig.py)."""
    app = ClientApp()

    def node_client_id(context: Context, fallback: str | None = None) -> str:
        pid = context.node_config.get("partition-id")
        if pid is None:
            raise ValueError("this SuperNode has no node_config partition-id; start it with "
                             "--node-config \"partition-id=K\" to host fedtune client-K")
        return f"client-{int(pid)}"

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from flwr.app import ConfigRecord, RecordDict

        return Message(RecordDict({"fedtune": ConfigRecord({"client_id": node_client_id(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg if cfg is not None else resolve_config(context.run_config)
        want = node_client_id(context)
        got = str(msg.content.config_records["fedtune"]["client_id"])
        if got != want:
            raise ValueError(f"message for {got} delivered to the node hosting {want}")
        return handle_train(msg, run_cfg)

    return app
