"""The Flower ClientApp: one SuperNode = one organisation with its own model copy, version and data.

Node config (`flower-supernode --node-config '…'`; string values in double quotes):
  client-name = "org-a"      the fedtune client this node hosts (default "client-<partition-id>")
  data = "/path/org.jsonl"   this organisation's own examples (any file the fedtune data loader reads);
                             train/eval split as `fedtune simulate` splits client k (seed run.seed + k,
                             k = the client's place in the run's roster, sent by the server)
  partition-id = K           demo: no own data, host partition K of the run's [data] (every node
                             recomputes the same partitioning); also set by Flower's simulation engine
  num-partitions = N         optional with partition-id; must equal federation.num_clients
  state-dir = "/var/lib/x"   where the node keeps its synced global model between messages (nodestate.py)
Unknown keys are refused (a typo must not silently turn a setting off). The query message at the start
of a run checks the node config, so a misconfigured node stops the run with its reason before round 1.

Where the model lives between messages:
- In memory, per process (`_ProcessCache`): Flower's simulation engine (Ray) reuses actor processes. There
  (and on any node without a state dir of its own) a process holds ONE model, shared by every node it serves,
  as the native simulation does: the global model at the newest version the process saw (every method's
  train restores it; FedKSeed's full-parameter model bit-exactly). A node is then only its version: a message
  from a version the process does not hold is answered "stale" and resent from the one it holds. Under
  sample-level DP (per-client accountants in the node's state dir) a process keeps
  `client id → NodeState(model copy, ClientAlgorithm, version, payload log)` instead; `[flower] client_cache = k`
  bounds those copies (least recently used evicted). Which actor serves a node is up to Flower.
- On the node's disk, when `state-dir` is set (nodestate.py): the deployment runtime (flwr 1.41
  `flower-supernode`) starts a fresh `flwr-clientapp` process for EVERY message, so nothing survives in
  memory there; the node rebuilds its model from the payloads it stored, and gets only the delta.
The message says which version the server assumes (`from_version`); on a mismatch the client replies
"stale" with the version it has (-1: none) and the FlowerTransport resends a setup/sync built from that
version. Nothing is ever trained on a wrong model.

Secure aggregation (train["secagg"]): the key stages arrive as query messages carrying a "fedtune.secagg" record
(advertise, share_keys, unmask); the train message carries this client's inbox, and the reply is the masked vector.
The client's session (its secrets) lives between messages in Flower's Context.state of this node — memory only,
never on disk — as secaggplus_mod keeps it; a fresh process per message (deployment) gets it from there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.algorithms.runner import Node, check_instruction
from fedtune.config import ConfigError, RunConfig
from fedtune.models.loading import Base
from fedtune.models.settings import SETTINGS
from fedtune.transports.flower import records as serde
from fedtune.transports.flower.nodestate import NodeStore, PayloadLog, config_key
from fedtune.transports.flower.runconfig import resolve_config

log = logging.getLogger("fedtune")
# node-config keys; the hardware ones override the run's [model] / [train] for this node only (each organisation
# holds the base its own way: device, dtype, quantization, gradient checkpointing)
HARDWARE_NODE_KEYS = {s.node_key: s.key for s in SETTINGS}
NODE_KEYS = {"client-name", "data", "partition-id", "num-partitions", "state-dir", *HARDWARE_NODE_KEYS}


@dataclass
class NodeSpec:
    """What a SuperNode's node config says about the fedtune client it hosts."""

    client_id: str
    data: str = ""
    partition: int = -1
    state_dir: str = ""
    hardware: dict[str, Any] = dataclasses.field(default_factory=dict)  # "model.device": "cuda", ...


def node_hardware(node_config: dict[str, Any]) -> dict[str, Any]:
    """{"model.device": ..., ...} from the node config's hardware keys, checked (ConfigError names the key)."""
    from fedtune.models.hardware import HardwareError, check_choice

    out = {dotted: node_config[k] for k, dotted in HARDWARE_NODE_KEYS.items() if k in node_config}
    for s in SETTINGS:  # a true/false setting must be one (the model settings are checked by check_choice below)
        if isinstance(s.default, bool) and not isinstance(out.get(s.key, False), bool):
            raise ConfigError(f"node-config {s.node_key}={out[s.key]!r} must be true or false")
    m = {k.split(".")[1]: v for k, v in out.items() if k.startswith("model.")}
    try:
        check_choice(str(m.get("device", "auto")), str(m.get("dtype", "auto")), str(m.get("quantization", "none")))
    except HardwareError as e:
        raise ConfigError(f"node-config: {str(e).replace('model.', '')}") from None
    return out


def with_hardware(cfg: RunConfig, hardware: dict[str, Any]) -> RunConfig:
    """The run config as this node holds the model (its node-config hardware keys applied)."""
    if not hardware:
        return cfg
    out = copy.deepcopy(cfg)
    for dotted, v in hardware.items():
        section, key = dotted.split(".")
        setattr(getattr(out, section), key, v)
    return out


def node_spec(node_config: dict[str, Any], cfg: RunConfig) -> NodeSpec:
    """Validate a node config against the run config; ConfigError with the fix otherwise."""
    unknown = sorted(set(node_config) - NODE_KEYS)
    if unknown:
        raise ConfigError(f"unknown node-config keys {unknown}; valid: {sorted(NODE_KEYS)}")
    n = cfg.federation.num_clients
    pid = node_config.get("partition-id")
    data = str(node_config.get("data", "") or "")
    name = str(node_config.get("client-name", "") or "")
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < n:
            raise ConfigError(f"node-config partition-id={pid!r} must be an integer in [0, {n}) "
                              f"(federation.num_clients = {n})")
        if "num-partitions" in node_config and node_config["num-partitions"] != n:
            raise ConfigError(f"node-config num-partitions={node_config['num-partitions']!r} but the run has "
                              f"federation.num_clients = {n}; make them equal (or drop num-partitions)")
    elif "num-partitions" in node_config:
        raise ConfigError("node-config num-partitions only goes with partition-id (demo partitions)")
    if data and pid is not None:
        raise ConfigError("node-config has both data and partition-id: give data (own file) or partition-id (demo)")
    if not data and pid is None:
        raise ConfigError('this SuperNode has no data: start it with --node-config \'data="/path/org.jsonl" '
                          'client-name="org-a"\' (or partition-id=K for a demo partition of the run\'s [data])')
    if data and not Path(data).expanduser().is_file():
        raise ConfigError(f"node-config data={data!r}: no such file on this node")
    if not name:
        if pid is None:
            raise ConfigError("node-config data needs client-name (the fedtune client id this node hosts)")
        name = f"client-{pid}"
    return NodeSpec(name, str(Path(data).expanduser()) if data else "", -1 if pid is None else int(pid),
                    str(node_config.get("state-dir", "") or ""), node_hardware(node_config))


def load_node_data(cfg: RunConfig, spec: NodeSpec, tok, index: int, partitions: dict | None = None):
    """This node's ClientData: its own file (split like `fedtune simulate` splits client `index`), or
    demo partition `spec.partition` of the run's [data] (from `partitions` when already prepared)."""
    from fedtune.data.prepare import prepare_data

    if spec.data:
        one = copy.deepcopy(cfg)
        one.federation.num_clients, one.federation.min_clients = 1, 1
        one.data.source, one.data.paths = "jsonl", [spec.data]
        one.data.test_fraction = 0.0  # the global test set is the server's; a node trains on all of its own split
        one.run.seed = cfg.run.seed + max(index, 0)  # split seed of client k in simulate: run.seed + k
        return prepare_data(one, tok, [spec.client_id]).clients[spec.client_id]
    data = partitions if partitions is not None else prepare_data(cfg, tok).clients
    return list(data.values())[spec.partition]


@dataclass
class NodeState:
    node: Node  # the client's model at the global version it holds (fedtune.algorithms.runner)
    plog: PayloadLog | None = None  # the payloads that built it, when the node keeps them on disk


class _ProcessCache:
    """Base model, tokenizer and data (per config), and per-client node models, for one process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: str | None = None
        self.base: Base | None = None
        self.tok = None
        self.data: dict[str, Any] = {}
        self.partitions: dict[str, Any] | None = None
        self.nodes: OrderedDict[str, NodeState] = OrderedDict()
        self.shared: Node | None = None  # simulation: the one model every node of this process trains on

    def ensure(self, cfg: RunConfig) -> None:
        from fedtune.models.loading import load_for

        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if key != self.key:  # new run / config in this process: drop everything
            if cfg.run.threads > 0:
                torch.set_num_threads(cfg.run.threads)
            self.base = load_for(cfg, train=True)
            self.tok = self.base.tokenizer
            self.data, self.partitions, self.nodes, self.shared = {}, None, OrderedDict(), None
            self.key = key

    def shared_node(self, cfg: RunConfig, ins, from_version: int) -> tuple[Node | None, int]:
        """(the process's shared model brought to the instruction's global version, -1) — or (None, the version to
        report as "stale") when it cannot get there from what the message carries. As in the native simulation,
        the model is the global model at its version whichever client asks (every method's train restores it, a
        FedKSeed full-parameter model bit-exactly), so a node is only its version: the base is never copied."""
        node, target = self.shared, ins.base_version
        if node is not None and node.client is not None and node.version == target:
            return node, -1  # already the global model at this version: nothing to apply, setup or not
        if node is not None and (node.version > target or (ins.setup is not None and node.client is not None
                                                            and ins.setup.meta.get("algorithm", node.method)
                                                            != node.method)):
            self.key = None  # behind the model we hold (a resumed run) or another method: a fresh base
            self.ensure(cfg)
            node = None
        if node is None or node.client is None:
            if ins.setup is None:
                return None, -1  # the server resends a setup
            node = self.shared = Node(self.base.model, self.base.holding)
            node.apply(ins)
            return node, -1
        whole = node.client.sync_replaces_state and bool(ins.sync.tensors)  # the sync carries the whole state
        if node.version == from_version or whole:
            node.apply(dataclasses.replace(ins, setup=None))  # the base is set up already
            return node, -1
        return None, node.version  # the server resends the sync from the version we hold

    def node_data(self, cfg: RunConfig, spec: NodeSpec, index: int):
        from fedtune.data.prepare import context_length, prepare_data

        if spec.client_id not in self.data:
            if not spec.data and self.partitions is None:  # demo partitions: prepared once per process
                self.partitions = prepare_data(cfg, self.tok, context_len=context_length(self.base.model)).clients
            self.data[spec.client_id] = load_node_data(cfg, spec, self.tok, index, self.partitions)
        return self.data[spec.client_id]

    def new_node(self) -> NodeState:
        return NodeState(Node(copy.deepcopy(self.base.model), self.base.holding))

    def restore(self, plog: PayloadLog) -> NodeState:
        """A node model rebuilt from its stored payloads (setup, then every sync in order): its own disk, checked
        when they arrived."""
        state = self.new_node()
        state.node.replay(plog.setup, plog.syncs, plog.version, plog.client_state)
        state.plog = plog
        return state


_CACHE = _ProcessCache()


def cached_nodes() -> int:
    return len(_CACHE.nodes)


def check_dp_state(spec: NodeSpec, cfg: RunConfig) -> None:
    """Sample-level DP keeps a per-client accountant: it must survive Flower's process-per-message ClientApp
    (deployment) and a node moving between Ray workers (simulation), or ε would be under-reported."""
    if cfg.privacy_config().mode == "sample" and not spec.state_dir:
        raise ConfigError(f"node of {spec.client_id}: [privacy] mode = \"sample\" needs a node state dir (its DP "
                          "accountant must outlive the ClientApp process); add state-dir=\"/path\" to --node-config")


SECAGG = "fedtune.secagg"  # the record of a secure-aggregation stage message / a client's saved session


def _secagg_session(context: Context, params, cid: str):
    """The session of this attempt saved in the node's Context.state (None when there is none for it)."""
    from fedtune.secagg.protocol import ClientSession

    saved = context.state.config_records.get(SECAGG)
    if saved is None or str(saved["ctx"]) != params.ctx.hex():
        return None
    return ClientSession.from_state(cid, params, json.loads(str(saved["session"])), _unmasked(context))


def _unmasked(context: Context) -> set[bytes]:
    rec = context.state.config_records.get(SECAGG + ".done")
    return {bytes.fromhex(h) for h in json.loads(str(rec["ctx"]))} if rec is not None else set()


def _save_session(context: Context, session) -> None:
    if session.stage == "done":
        if SECAGG in context.state:
            del context.state[SECAGG]
        done = sorted(c.hex() for c in session.unmasked)[-64:]  # the attempts unmasked lately: never twice
        context.state[SECAGG + ".done"] = ConfigRecord({"ctx": json.dumps(done)})
    else:
        context.state[SECAGG] = ConfigRecord({"ctx": session.ctx.hex(), "session": json.dumps(session.to_state())})


def handle_secagg_query(msg: Message, cfg: RunConfig, spec: NodeSpec, context: Context) -> Message:
    """One key or unmask stage: advertise (a fresh session), share_keys (the roster → encrypted shares), unmask
    (the checked request → shares). The reply's "fedtune.secagg" record holds the answer as JSON."""
    from fedtune.secagg.protocol import ClientSession, ProtocolError, Roster, RoundParams, UnmaskRequest, _cts_to_dict

    rec = msg.content.config_records[SECAGG]
    stage, body = str(rec["stage"]), json.loads(str(rec["body"]))
    try:
        params = RoundParams.from_dict(body["params"])
        if stage == "advertise":
            with _CACHE.lock:
                _CACHE.ensure(cfg)
                data = _CACHE.node_data(cfg, spec, int(body.get("client_index", -1)))
            session = ClientSession(spec.client_id, params, _unmasked(context))
            out = session.advertise(len(data.train)).to_dict()
        else:
            session = _secagg_session(context, params, spec.client_id)
            if session is None:
                raise ProtocolError(f"no secure-aggregation session of this attempt on {spec.client_id}")
            if stage == "share_keys":
                out = _cts_to_dict(session.share_keys(Roster.from_dict(body["roster"])))
            elif stage == "unmask":
                out = session.unmask(UnmaskRequest.from_dict(body["request"])).to_dict()
            else:
                raise ProtocolError(f"unknown secagg stage {stage[:32]!r}")
    except (ProtocolError, KeyError, TypeError) as e:
        raise ValueError(f"secure aggregation, {stage[:32]}: {e}") from None  # an error reply: this client drops out
    _save_session(context, session)
    return Message(RecordDict({SECAGG: ConfigRecord({"stage": stage, "body": json.dumps(out)})}), reply_to=msg)


def secure_update(msg: Message, context: Context, spec: NodeSpec):
    """For a train message under secure aggregation: (check of the inbox before training, masking of the update)."""
    from fedtune.secagg.encode import ring_to_wire
    from fedtune.secagg.protocol import MASKED, ProtocolError, RoundParams, _cts_from_dict

    if SECAGG not in msg.content:
        return None, None
    ins, _ = serde.record_to_instruction(msg.content)
    params = RoundParams.from_dict(ins.train.get("secagg"))
    session = _secagg_session(context, params, spec.client_id)
    if session is None:
        raise ValueError(f"secure aggregation: no session of this attempt on {spec.client_id}")
    inbox = _cts_from_dict(json.loads(str(msg.content.config_records[SECAGG]["body"]))["inbox"], "inbox")
    if session.stage == "shared":
        try:
            session.receive_inbox(inbox)
        except ProtocolError as e:
            session.wipe()
            _save_session(context, session)
            raise ValueError(f"secure aggregation: {e}") from None

    def mask(update, node: Node):
        y, _ = session.masked_input(node.client.secure_vector(update, params.layout))
        _save_session(context, session)
        ring = torch.from_numpy(ring_to_wire(y))
        return dataclasses.replace(update, tensors={MASKED: ring})

    return session, mask


def shares_base(cfg: RunConfig) -> bool:
    """Whether a simulation process trains all its nodes on one shared model (else one model copy per node):
    always, except under sample-level DP, whose per-client accountants live in each node's state dir."""
    return cfg.privacy_config().mode != "sample"


def handle_train(msg: Message, cfg: RunConfig, spec: NodeSpec | None = None, secure=None,
                 share: bool = False) -> Message:
    """Sync the node's model to the instruction's version (setup / delta / "stale"), train, reply. The instruction
    (input from another organisation) is checked first, before anything is loaded, set up or synced.
    `share` (simulation): every node this process serves trains on one shared model (see shares_base)."""
    ins, from_version = serde.record_to_instruction(msg.content)
    check_instruction(ins, cfg.run.algorithm)  # before any model is loaded or copied for it (Node.apply checks again)
    cid = ins.client_id
    spec = spec or NodeSpec(cid, partition=int(cid.rsplit("-", 1)[1]))
    check_dp_state(spec, cfg)
    if share and shares_base(cfg):
        with _CACHE.lock:
            _CACHE.ensure(cfg)
            node, have = _CACHE.shared_node(cfg, ins, from_version)
            if node is None:
                log.info("%s: this process's model is at version %d, server assumed %d; asking for a resync", cid,
                         have, from_version)
                return Message(serde.stale_record(cid, have), reply_to=msg)
            data = _CACHE.node_data(cfg, spec, serde.record_client_index(msg.content))
            update = node.train(data.train, _CACHE.tok.pad_token_id, ins.train, client_id=cid)
            if secure is not None:
                update = secure(update, node)
        return Message(serde.update_to_record(update), reply_to=msg)
    limit = int(cfg.extra.get("flower", {}).get("client_cache", 0))
    store = NodeStore(spec.state_dir, cid, config_key(cfg.to_dict(), cid)) if spec.state_dir else None
    with _CACHE.lock:  # one message at a time per process (Ray actors are single-threaded anyway)
        _CACHE.ensure(cfg)
        cached = _CACHE.nodes.get(cid)
        at = -1 if cached is None else cached.node.version
        stored = store.load() if store is not None and at != from_version else None
        if ins.setup is not None:
            cached = _CACHE.new_node()
            kept = stored.client_state if stored is not None else None  # a re-setup keeps the DP accountants
            cached.node.apply(ins, client_id=cid, state=lambda: kept)
            cached.plog = PayloadLog(-1, ins.setup) if store is not None else None
        else:
            if stored is not None and stored.version == from_version:
                cached = _CACHE.restore(stored)
            elif at != from_version:
                have = stored.version if stored is not None else at
                log.info("%s: local model at version %d, server assumed %d; asking for a resync", cid, have,
                         from_version)
                return Message(serde.stale_record(cid, have), reply_to=msg)
            cached.node.apply(ins, client_id=cid)
        node = cached.node
        if cached.plog is not None:
            cached.plog.add_sync(ins.sync, ins.base_version, replaces=node.client.sync_replaces_state)
        _CACHE.nodes[cid] = cached
        _CACHE.nodes.move_to_end(cid)
        while limit and len(_CACHE.nodes) > limit:
            _CACHE.nodes.popitem(last=False)
        data = _CACHE.node_data(cfg, spec, serde.record_client_index(msg.content))
        update = node.train(data.train, _CACHE.tok.pad_token_id, ins.train, client_id=cid)
        if secure is not None:  # the masked vector instead of the update
            update = secure(update, node)
        if store is not None and cached.plog is not None:
            cached.plog.client_state = node.client.state_dict()
            store.save(cached.plog)
    return Message(serde.update_to_record(update), reply_to=msg)


def make_client_app(cfg: RunConfig | None = None, default_state_dir: str = "", share: bool = False) -> ClientApp:
    """The fedtune ClientApp. With `cfg` the config travels with the app object (in-process
    `run_simulation`); without, it is read from the Flower run config (`flwr run`, see runconfig.py).
    `default_state_dir`: the node state dir of nodes whose node config names none (the simulation engine
    passes <out>/flower-nodes, so a node keeps its DP accountant whichever Ray worker serves it). `share`
    (simulation engine): a process's nodes train on one shared model (handle_train)."""
    app = ClientApp()

    def spec_of(context: Context) -> tuple[RunConfig, NodeSpec]:
        run_cfg = cfg if cfg is not None else resolve_config(context.run_config)
        spec = node_spec(dict(context.node_config), run_cfg)
        if default_state_dir and not spec.state_dir:
            spec = dataclasses.replace(spec, state_dir=default_state_dir)
        check_dp_state(spec, run_cfg)
        return with_hardware(run_cfg, spec.hardware), spec

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        run_cfg, spec = spec_of(context)
        if SECAGG in msg.content:
            return handle_secagg_query(msg, run_cfg, spec, context)
        return Message(RecordDict({"fedtune": ConfigRecord({"client_id": spec.client_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg, spec = spec_of(context)
        got = str(msg.content.config_records["fedtune"]["client_id"])
        if got != spec.client_id:
            raise ValueError(f"message for {got} delivered to the node hosting {spec.client_id}")
        _, mask = secure_update(msg, context, spec)
        # a node without a state dir of its own keeps nothing but the process's model (`flwr run` on Ray too)
        return handle_train(msg, run_cfg, spec, secure=mask, share=share or not spec.state_dir)

    return app
