"""Flower integration: serde is bit-exact; a run through Flower's simulation engine (Ray) ends in the same
global model as the in-process simulation; the Flower app starts under the `flwr` CLI."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import max_abs
from safetensors.torch import load_file

from fedtune import config
from fedtune.algorithms.api import ClientUpdate, Instruction, Payload
from fedtune.transports.flower import records as serde

ROOT = Path(__file__).resolve().parents[1]
FAST = {"model.name": "tiny", "federation.num_clients": 3, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 48, "data.max_seq_len": 64, "run.rounds": 2, "run.seed": 3}

# the fake-grid tests: one local step on a few examples, clients one by one (as Flower nodes compute)
QUICK = {**FAST, "train.local_steps": 1, "data.max_train_per_client": 16, "federation.batch_clients": False,
         "run.threads": 1}

pytest.importorskip("ray")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.q_proj.A": torch.randn(4, 16, generator=g),
        "layers.0.q_proj.B": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=g).half(),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "ids": torch.arange(-5, 6),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 8),
        "specials": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, x in a.items():
        y = b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.view(-1).view(torch.uint8) if x.numel() else x,
                           y.view(-1).view(torch.uint8) if y.numel() else y), k  # bit-exact, NaN too


def test_tensor_record_round_trip_is_bit_exact():
    t = _tensors()
    rec = serde.tensors_to_record(t)
    assert rec["layers.0.q_proj.A"].stype == "numpy.ndarray"  # Flower-standard where numpy can carry it
    assert rec["layers.0.q_proj.B"].stype == serde.RAW_STYPE
    _same(t, serde.record_to_tensors(rec))
    # survives Flower's own (de)serialisation of the record tree too
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    rd = RecordDict({"x": rec})
    objs = {}

    def collect(o):
        objs[o.object_id] = o.deflate()
        for oid, ch in (o.children or {}).items():
            if oid not in objs:
                collect(ch)

    collect(rd)
    back = inflate_object_from_contents(rd.object_id, objs, keep_object_contents=True)
    _same(t, serde.record_to_tensors(back.array_records["x"]))


def test_instruction_and_update_round_trip():
    t = _tensors()
    ins = Instruction(round=4, client_id="client-2", base_version=3,
                      train={"steps": 5, "lr": 1e-3, "rank": 8, "seed": 123, "nested": {"a": [1, 2.5, None]}},
                      sync=Payload({k: t[k] for k in ("f64", "ids")}, {"merge_versions": [2, 3], "version": 3}),
                      setup=Payload({"layers.0.q_proj.B": t["layers.0.q_proj.B"]},
                                    {"algorithm": "fedsb", "target_modules": ["q_proj", "v_proj"]}))
    back, from_v = serde.record_to_instruction(serde.instruction_to_record(ins, from_version=1))
    assert from_v == 1
    assert (back.round, back.client_id, back.base_version, back.train) == (4, "client-2", 3, ins.train)
    assert back.sync.meta == ins.sync.meta and back.setup.meta == ins.setup.meta
    _same(ins.sync.tensors, back.sync.tensors)
    _same(ins.setup.tensors, back.setup.tensors)
    no_setup, _ = serde.record_to_instruction(serde.instruction_to_record(Instruction(1, "client-0", 0, {})))
    assert no_setup.setup is None and no_setup.sync.tensors == {} and no_setup.sync.meta == {}

    u = ClientUpdate("client-1", 37, t, {"train_loss": 1.25, "epsilon": float("inf")})
    rd = serde.update_to_record(u)
    ub = serde.record_to_update(rd)
    assert (ub.client_id, ub.num_examples, ub.metrics) == ("client-1", 37, u.metrics)
    _same(t, ub.tensors)
    assert rd.metric_records["metrics"]["train_loss"] == 1.25
    payload = sum(x.numel() * x.element_size() for x in t.values())
    assert serde.message_nbytes(rd) > payload  # Flower's own serialized size: tensors + headers


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsb", "flora"])
def test_flower_engine_matches_native_simulation(tmp_path, algorithm):
    from fedtune.run.assemble import simulate
    from fedtune.run.flower import run_flower_simulation

    # native clients one by one, as the Flower nodes compute (batched native equals it only to ~1e-5)
    over = {**FAST, "run.algorithm": algorithm, "federation.batch_clients": False}
    simulate(config.load(None, {**over, "run.out": str(tmp_path / "native")}), progress=False)
    flower = run_flower_simulation(config.load(None, {**over, "run.out": str(tmp_path / "flower")}))
    a = load_file(str(tmp_path / "native/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert max(max_abs(a[k], b[k]) for k in a) <= 1e-6
    assert max(a[k].abs().max().item() for k in a) > 0  # the adapters are not trivially zero
    rn, rf = _rows(tmp_path / "native"), _rows(tmp_path / "flower")
    assert [r["round"] for r in rf] == [0, 1, 2]
    for x, y in zip(rn[1:], rf[1:]):
        assert x["clients_completed"] == y["clients_completed"] == 3
        assert x["bytes_up"] == y["bytes_up"] and x["payload_bytes_up"] == y["payload_bytes_up"]
        assert y["bytes_down"] >= x["bytes_down"]  # equal unless a node had to be resynced (extra message)
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5 and abs(x["eval_loss"] - y["eval_loss"]) < 1e-5
    assert flower["engine"] == "flower" and flower["rounds_completed"] == 2
    assert flower["flower"]["message_bytes_up_total"] > 0
    for f in ("summary.json", "metrics.csv", "adapter/adapter_config.json", "checkpoints"):
        assert (tmp_path / "flower" / f).exists(), f


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_flower_app_runs_under_flwr_cli(tmp_path):
    """`flwr run <app> local --stream` (managed local SuperLink, simulation runtime) trains and writes outputs."""
    import psutil

    app = tmp_path / "app"
    shutil.copytree(ROOT / "simulations/flower_app", app, ignore=shutil.ignore_patterns(".flwr", "__pycache__"))
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # app needs fedtune
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # flower-superlink
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))
    out = tmp_path / "out"
    flwr = Path(sys.executable).with_name("flwr")
    try:
        proc = subprocess.run(
            [str(flwr), "run", str(app), "local", "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=2",
             "--run-config", f'fedtune.run.out="{out}" fedtune.run.rounds=1'],
            check=False, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for _ in range(60):  # --stream returns when the run finished; outputs are written just before
            if (out / "summary.json").exists():
                break
            time.sleep(1)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["engine"] == "flower" and summary["rounds_completed"] == 1 and summary["status"] == "completed"
        assert [r["round"] for r in _rows(out)] == [0, 1]
        assert (out / "adapter/adapter_model.safetensors").exists()
    finally:  # stop the local SuperLink this test started (identified by its FLWR_HOME log path)
        for p in psutil.process_iter(["pid", "cmdline"]):
            if str(home) in " ".join(p.info["cmdline"] or []):
                try:
                    os.kill(p.info["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass


# -- deployment runtime logic with fake grids (no Ray, no SuperLink) -----------------------------------------

SUPERLINK = 1  # the SuperLink's node id: the sender of its own "node unavailable" replies


@pytest.fixture
def flower_task():
    """Message() needs a task identity (set by Flower in a ServerApp process)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    """A Grid that hands each message to the ClientApp logic of the node it is addressed to, in this process.

    nodes: node id → NodeSpec. Knobs, from the end of node discovery on: `dead` (node ids the SuperLink
    reports unavailable: error replies sent by the SuperLink), `offline` (not in get_node_ids), `fresh_process` (drop the in-memory node models before
    every message, as flwr 1.41's process-per-message ClientApp does), replies come back in reverse order,
    one per pull, with a stray reply to an unknown message in front."""

    def __init__(self, cfg, nodes, *, dead=(), offline=(), fresh_process=False):
        from uuid import uuid4

        self.cfg, self.nodes, self.dead, self.offline = cfg, nodes, set(dead), set(offline)
        self.fresh_process, self.uuid = fresh_process, uuid4
        self.outbox, self.pushed, self.pulls, self.discovered = [], 0, 0, False

    def get_node_ids(self):
        return [n for n in self.nodes if not (self.discovered and n in self.offline)]

    def _answer(self, msg):
        from flwr.app import ConfigRecord, Error, Message, RecordDict

        from fedtune.transports.flower import client as fc

        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "query":
            self.discovered = True
        elif node in self.dead:
            reply = Message(error=Error(5, "Error: Node Unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK
            return reply
        spec = self.nodes[node]
        if msg.metadata.message_type == "query":
            return Message(RecordDict({"fedtune": ConfigRecord({"client_id": spec.client_id})}), reply_to=msg)
        if self.fresh_process:
            fc._CACHE.nodes.clear()
        return fc.handle_train(msg, self.cfg, spec)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = self.uuid().hex
            ids.append(m.metadata.message_id)
            self.outbox.append(self._answer(m))
            self.pushed += 1
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Error, Message

        self.pulls += 1
        wanted = set(message_ids)
        mine = [r for r in self.outbox if r.metadata.reply_to_message_id in wanted]
        if not mine:
            return []
        reply = mine[-1]  # newest first: out of order
        self.outbox.remove(reply)
        stray = Message(error=Error(3, "stray"), reply_to=reply)
        stray.metadata.__dict__["_reply_to_message_id"] = "not-a-message-of-this-round"
        return [stray, reply]


def _specs(n, **kw):
    from fedtune.transports.flower.client import NodeSpec

    return {100 + i: NodeSpec(f"client-{i}", partition=i, **kw) for i in range(n)}


def _adapter(out):
    return load_file(str(out / "adapter/adapter_model.safetensors"))


def _native_without(cfg, drop):
    """fedtune simulate in-process, with the updates of `drop` discarded (what a transport does on failure)."""
    from fedtune.run.assemble import simulate
    from fedtune.transports.inprocess import InProcessTransport

    def factory(run):
        inner = InProcessTransport(run.gm, run.data, run.tokenizer.pad_token_id, progress=False, batch_clients=False)

        class Dropping:
            def run_round(self, plan, timeout_s):
                res = inner.run_round(plan, timeout_s)
                res.failed += [u.client_id for u in res.updates if u.client_id in drop]
                res.updates = [u for u in res.updates if u.client_id not in drop]
                return res

        return Dropping()

    return simulate(cfg, progress=False, transport_factory=factory)


def test_error_replies_and_out_of_order_replies_count_failed_clients(tmp_path, flower_task):
    """client-2's node is gone: the SuperLink answers for it (sender = SuperLink, not the node). Replies come
    one per pull, newest first, after a stray reply. The round goes on with the two survivors (min_clients = 2),
    the metrics name the failed client, and the result equals a native run without client-2's updates."""
    from fedtune.run.flower import run_server

    over = {**QUICK, "run.algorithm": "fedavg", "federation.min_clients": 2}
    cfg = config.load(None, {**over, "run.out": str(tmp_path / "flower")})
    grid = FakeGrid(cfg, _specs(3), dead={102})
    summary = run_server(grid, cfg)
    _native_without(config.load(None, {**over, "run.out": str(tmp_path / "native")}), {"client-2"})
    rows = _rows(tmp_path / "flower")
    assert [(r["clients_completed"], r["clients_failed"]) for r in rows[1:]] == [(2, ["client-2"])] * 2
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert all("Node Unavailable" in r["failed"]["client-2"] for r in summary["flower"]["rounds"])
    a, b = _adapter(tmp_path / "native"), _adapter(tmp_path / "flower")
    assert a.keys() == b.keys() and max(max_abs(a[k], b[k]) for k in a) <= 1e-6


def test_a_run_that_fails_leaves_a_summary_saying_why(tmp_path, flower_task):
    """Two of three nodes gone, min_clients = 2: every attempt of round 1 aborts, nothing is written for the
    round, and summary.json says the run failed and why (flwr run itself exits 0)."""
    from fedtune.run.engine import RoundAborted
    from fedtune.run.flower import run_server

    cfg = config.load(None, {**QUICK, "run.algorithm": "fedavg", "federation.min_clients": 2,
                             "federation.max_round_retries": 1, "run.out": str(tmp_path / "out")})
    grid = FakeGrid(cfg, _specs(3), dead={101}, offline={102})
    with pytest.raises(RoundAborted):
        run_server(grid, cfg)
    s = json.loads((tmp_path / "out/summary.json").read_text())
    assert s["status"] == "failed" and "round 1 failed 2 times" in s["error"] and s["rounds_completed"] == 0
    assert [r["round"] for r in _rows(tmp_path / "out")] == [0]
    assert not list((tmp_path / "out/checkpoints").glob("round-*"))
    fails = [r["failed"] for r in s["flower"]["rounds"]]
    assert len(fails) == 2 and all(set(f) == {"client-1", "client-2"} for f in fails)
    assert all(f["client-2"] == "its Flower node is offline" for f in fails)
    # the offline node got no message at all: 3 queries + 2 attempts × 2 train messages
    assert grid.pushed == 3 + 2 * 2


def test_discovery_refuses_a_misconfigured_node_before_round_1(tmp_path, flower_task):
    from fedtune.run.flower import run_server

    cfg = config.load(None, {**QUICK, "run.out": str(tmp_path / "out")})
    specs = _specs(3)
    specs[102].client_id = "client-1"  # two nodes claim client-1
    with pytest.raises(RuntimeError, match="two nodes claim client-1"):
        run_server(FakeGrid(cfg, specs), cfg)
    assert json.loads((tmp_path / "out/summary.json").read_text())["status"] == "failed"


def test_node_state_on_disk_survives_a_process_per_message(tmp_path, flower_task):
    """flwr 1.41 deployment: a fresh ClientApp process per message (the grid drops every in-memory node model
    before each message). With state-dir each node rebuilds its FLoRA model from the payloads it stored, so
    from round 2 on it gets only the delta (no "stale", no resync: the same bytes as the native simulation)
    and the run equals the native simulation."""
    from fedtune.run.assemble import simulate
    from fedtune.run.flower import run_server

    over = {**QUICK, "run.algorithm": "flora", "run.rounds": 3}
    simulate(config.load(None, {**over, "run.out": str(tmp_path / "native")}), progress=False)
    cfg = config.load(None, {**over, "run.out": str(tmp_path / "disk")})
    summary = run_server(FakeGrid(cfg, _specs(3, state_dir=str(tmp_path / "state")), fresh_process=True), cfg)
    assert summary["flower"]["resyncs"] == 0
    native, disk = _rows(tmp_path / "native"), _rows(tmp_path / "disk")
    assert [r["bytes_down"] for r in disk[1:]] == [r["bytes_down"] for r in native[1:]]  # deltas only
    a, b = _adapter(tmp_path / "native"), _adapter(tmp_path / "disk")
    assert max(max_abs(a[k], b[k]) for k in a) <= 1e-6
    node = json.loads((tmp_path / "state/client-1/node.json").read_text())
    assert node["version"] == 2 and len(node["syncs"]) == 3  # FLoRA: every merge (versions 0, 1, 2)
    files = {p.name for p in (tmp_path / "state/client-1").iterdir()}
    assert files == {"node.json", node["setup"]["file"], *(s["file"] for s in node["syncs"])}  # no tmp, no orphans


def test_regenerating_the_apps_keys_keeps_the_values_it_sets(tmp_path):
    """`python -m fedtune.transports.flower.runconfig --write` re-declares the keys and keeps what the app sets (its
    model, method, rounds, out); a value for a key fedtune no longer has is dropped."""
    import tomllib

    from fedtune.transports.flower.runconfig import write_block

    app = tmp_path / "pyproject.toml"
    text = (ROOT / "simulations/flower_app/pyproject.toml").read_text()
    app.write_text(text.replace("[tool.flwr.app.config.fedtune.run]\n", "[tool.flwr.app.config.fedtune.run]\ngone = 1\n"))
    assert write_block(app) is True
    assert app.read_text() == text  # the unknown key dropped, every set value kept, nothing else changed
    values = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]["fedtune"]
    assert (values["model"]["name"], values["run"]["algorithm"], values["run"]["rounds"]) == ("tiny", "flora", 2)
    assert write_block(app) is False


def test_run_config_reaches_every_fedtune_key_and_validates_it(tmp_path):
    """The app declares every fedtune key (Flower refuses undeclared --run-config keys); values go through
    fedtune's config: lists as TOML arrays in strings, wrong types and unknown keys are clear errors."""
    import tomllib

    from fedtune.config import ConfigError
    from fedtune.transports.flower.runconfig import declared_keys, resolve

    app = tomllib.loads((ROOT / "simulations/flower_app/pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else {f"{prefix}{k}": v}.items())}

    declared = flat(app)
    assert sorted(k for k in declared if k.startswith("fedtune.")) == declared_keys()
    assert {"fedtune.train.lr", "fedtune.privacy.mode", "fedtune.flora.ranks", "fedtune.data.paths"} <= set(declared)
    cfg, resume = resolve({**declared, "fedtune-config": "", "fedtune-resume": True, "fedtune.train.lr": 2e-3,
                           "fedtune.federation.round_timeout_s": 30, "fedtune.flora.ranks": "[8, 4]",
                           "fedtune.data.paths": '["/d/a.jsonl", "/d/b.jsonl"]', "fedtune.data.source": "jsonl",
                           "fedtune.federation.num_clients": 2, "fedtune.privacy.mode": "client",
                           "fedtune.privacy.noise_multiplier": 1})
    assert resume is True and cfg.train.lr == 2e-3 and cfg.federation.round_timeout_s == 30.0
    assert cfg.algorithms["flora"]["ranks"] == [8, 4] and cfg.data.paths == ["/d/a.jsonl", "/d/b.jsonl"]
    assert cfg.privacy_config().noise_multiplier == 1 and cfg.run.algorithm == "flora"  # the app's own value
    assert cfg.run.seed == 0  # "" = not set: fedtune's default
    for bad, msg in [({"fedtune.run.rounds": "3"}, "expected int .*without quotes"),
                     ({"fedtune.run.rounds": 0}, "run.rounds must be ≥ 1"),
                     ({"fedtune.train.nope": 1}, "unknown keys \\['nope'\\]"),
                     ({"fedtune.data.paths": "[unclosed"}, "not a TOML array"),
                     ({"fedtune-resume": "yes"}, "fedtune-resume must be true or false")]:
        with pytest.raises(ConfigError, match=msg):
            resolve({**declared, "fedtune-config": "", **bad})


def test_node_config_is_validated_with_the_fix_in_the_message(tmp_path):
    from fedtune.config import ConfigError
    from fedtune.transports.flower.client import node_spec

    cfg = config.load(None, {"federation.num_clients": 3})
    f = tmp_path / "org.jsonl"
    f.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert node_spec({"data": str(f), "client-name": "org-a", "state-dir": "/s"}, cfg).client_id == "org-a"
    s = node_spec({"partition-id": 2, "num-partitions": 3}, cfg)
    assert (s.client_id, s.partition, s.data) == ("client-2", 2, "")
    for nc, msg in [({"partition-id": 1, "num-partitions": 4}, "num-partitions=4 but the run has federation.num_clients = 3"),
                    ({"partition-id": 3}, "partition-id=3 must be an integer in \\[0, 3\\)"),
                    ({"data": str(f)}, "data needs client-name"),
                    ({"data": str(tmp_path / "none.jsonl"), "client-name": "x"}, "no such file on this node"),
                    ({"data": str(f), "partition-id": 0}, "both data and partition-id"),
                    ({}, "this SuperNode has no data"),
                    ({"partition-id": 0, "state_dir": "/s"}, "unknown node-config keys \\['state_dir'\\]")]:
        with pytest.raises(ConfigError, match=msg):
            node_spec(nc, cfg)


def test_node_data_from_own_file_is_split_like_simulate_splits_client_k(tmp_path, tok):
    """A node with its own file, told it is client k of the roster, trains on exactly the examples
    `fedtune simulate` gives client k of data.paths."""
    from fedtune.data.prepare import prepare_data
    from fedtune.transports.flower.client import NodeSpec, load_node_data

    paths = []
    for k in range(3):
        p = tmp_path / f"org-{k}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"q{k}-{i}", "response": f"a{k}-{i}"}) + "\n" for i in range(20)))
        paths.append(str(p))
    cfg = config.load(None, {"federation.num_clients": 3, "data.source": "jsonl", "data.paths": paths,
                             "data.eval_fraction": 0.25, "data.test_fraction": 0.0, "run.seed": 5})
    sim = prepare_data(cfg, tok).clients  # no global test split: a node never sees the other files
    for k in range(3):
        mine = load_node_data(cfg, NodeSpec(f"org-{k}", data=paths[k]), tok, k)
        assert mine.train == sim[f"client-{k}"].train and mine.eval == sim[f"client-{k}"].eval
    assert load_node_data(cfg, NodeSpec("org-1", data=paths[1]), tok, 0).train != sim["client-1"].train


def test_node_store_is_atomic_keyed_and_compacted(tmp_path):
    from fedtune.algorithms.api import Payload
    from fedtune.transports.flower.nodestate import NodeStore, PayloadLog

    store = NodeStore(tmp_path, "org/a", "key-1")
    plog = PayloadLog(-1, Payload({"A": torch.ones(2, 3)}, {"algorithm": "fedavg"}))
    for v in range(3):
        plog.add_sync(Payload({"B": torch.full((3,), float(v))}, {"version": v}), v, replaces=True)
        store.save(plog)
    d = tmp_path / "org_a"
    assert sorted(p.suffix for p in d.iterdir()) == [".json", ".safetensors", ".safetensors"]  # setup + latest
    back = NodeStore(tmp_path, "org/a", "key-1").load()
    assert back.version == 2 and torch.equal(back.syncs[0].tensors["B"], torch.full((3,), 2.0))
    assert back.setup.meta == {"algorithm": "fedavg"} and len(back.syncs) == 1
    assert NodeStore(tmp_path, "org/a", "another-config").load() is None
    (d / "node.json").write_text("{not json")
    assert NodeStore(tmp_path, "org/a", "key-1").load() is None
    replay = PayloadLog(-1, Payload({}, {}))
    for v in range(3):
        replay.add_sync(Payload({f"r{v}": torch.zeros(1)}, {"merge_versions": [v]}), v, replaces=False)
    assert [p.meta["merge_versions"] for p in replay.syncs] == [[0], [1], [2]]


def test_a_node_that_lost_its_model_is_resynced_by_the_engine(tmp_path, flower_task):
    """Round 2: client-1's worker lost its model (a fresh Ray worker). It answers "stale"; the transport
    resends the engine's own instruction_for(client-1, -1) (setup + every missed FLoRA merge) and the run
    still equals the native simulation."""
    from fedtune.run.assemble import simulate
    from fedtune.run.flower import run_server
    from fedtune.transports.flower import client as flower_client

    over = {**QUICK, "run.algorithm": "flora"}
    cfg = config.load(None, {**over, "run.out": str(tmp_path / "flower")})

    class Forgetful(FakeGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.content.config_records["fedtune"].get("round") == 2 for m in messages):
                flower_client._CACHE.nodes.pop("client-1", None)
            return super().push_messages(messages)

    summary = run_server(Forgetful(cfg, _specs(3)), cfg)
    simulate(config.load(None, {**over, "run.out": str(tmp_path / "native")}), progress=False)
    assert summary["flower"]["resyncs"] == 1
    a, b = _adapter(tmp_path / "native"), _adapter(tmp_path / "flower")
    assert a.keys() == b.keys() and max(max_abs(a[k], b[k]) for k in a) <= 1e-6


def test_an_unusable_reply_fails_only_its_client(tmp_path, flower_task):
    """A node's reply is hostile input: a reply for another client, one without the fedtune header, one with an
    undecodable tensor, ones whose metrics are not a map of numbers and an error reply whose text would forge a
    log line each fail their client with the (escaped) reason; the round goes on."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

    from fedtune.run.flower import run_server

    cfg = config.load(None, {**QUICK, "run.algorithm": "fedavg", "run.rounds": 1, "federation.num_clients": 7,
                             "federation.min_clients": 1, "run.out": str(tmp_path / "out")})

    class Hostile(FakeGrid):
        def _answer(self, msg):
            reply = super()._answer(msg)
            if msg.metadata.message_type == "query":
                return reply
            node = msg.metadata.dst_node_id
            if node == 101:  # claims to be client-0
                reply.content.config_records["fedtune"]["client_id"] = "client-0"
            elif node == 102:
                return Message(RecordDict({"x": ConfigRecord({"status": "ok"})}), reply_to=msg)
            elif node == 103:
                bad = Array(dtype="no_such_dtype", shape=(2,), stype="fedtune.torch.raw", data=b"\0" * 8)
                reply.content["update"] = ArrayRecord({"lora.A": bad})
            elif node == 104:
                reply.content.config_records["fedtune"]["metrics"] = '{"train_loss": [1e30]}'
            elif node == 105:
                reply.content.config_records["fedtune"]["metrics"] = "[" * 100_000 + "]" * 100_000
            elif node == 106:  # the text of a node's error reply is the node's: it must not forge a log line
                return Message(error=Error(0, "boom\nWARNING round 1: client-0 failed: forged"), reply_to=msg)
            return reply

    summary = run_server(Hostile(cfg, _specs(7)), cfg)
    failed = summary["flower"]["rounds"][0]["failed"]
    assert sorted(failed) == [f"client-{i}" for i in range(1, 7)] and summary["status"] == "completed"
    assert failed["client-6"] == "'boom\\nWARNING round 1: client-0 failed: forged' (Flower error code 0)"
    assert "'client-0'" in failed["client-1"] and "KeyError" in failed["client-2"]
    assert "raw array of unsupported dtype 'no_such_dtype'" in failed["client-3"]
    assert "metric train_loss is a list, not a number" in failed["client-4"]
    assert "RecursionError" in failed["client-5"]
    assert _rows(tmp_path / "out")[1]["clients_completed"] == 1


def test_reply_numbers_and_array_headers_are_checked_before_use(tmp_path, flower_task):
    """Each of these replies ended the whole run (an exception outside the transport's guard): num_examples =
    1e400 (a float inf: OverflowError in int()), -1 (WireError when the reply was sized); a "stale" reply
    with have_version = inf; an update array whose .npy header declares 10^12 floats over 0 data bytes (np.load
    allocated the declared 3.6 TiB first: MemoryError). Now each fails only its client, with the reason."""
    import io

    import numpy as np
    from flwr.app import Array, ConfigRecord, Message, RecordDict

    from fedtune.run.flower import run_server

    cfg = config.load(None, {**QUICK, "run.algorithm": "fedavg", "run.rounds": 1, "federation.num_clients": 5,
                             "federation.min_clients": 1, "run.out": str(tmp_path / "out")})
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})

    class Hostile(FakeGrid):
        def _answer(self, msg):
            reply = super()._answer(msg)
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "query" or node == 100:
                return reply
            head = reply.content.config_records["fedtune"]
            if node in (101, 102):
                head["num_examples"] = {101: float("1e400"), 102: -1}[node]
            elif node == 103:
                return Message(RecordDict({"fedtune": ConfigRecord({"status": "stale", "client_id": "client-3",
                                                                    "have_version": float("inf")})}), reply_to=msg)
            elif node == 104:
                name = next(iter(reply.content.array_records["update"]))
                reply.content.array_records["update"][name] = Array(
                    dtype="float32", shape=(10**12,), stype="numpy.ndarray", data=npy.getvalue())
            return reply

    summary = run_server(Hostile(cfg, _specs(5)), cfg)
    failed = summary["flower"]["rounds"][0]["failed"]
    assert summary["status"] == "completed" and sorted(failed) == [f"client-{i}" for i in range(1, 5)]
    assert "num_examples must be an integer in [0, 9223372036854775807], got 'inf'" in failed["client-1"]
    assert "num_examples must be an integer in [0, 9223372036854775807], got '-1'" in failed["client-2"]
    assert "have_version must be an integer in [-1, 9223372036854775807], got 'inf'" in failed["client-3"]
    assert "shape (1000000000000,) of torch.float32 does not match its 0 data bytes" in failed["client-4"]
    assert _rows(tmp_path / "out")[1]["clients_completed"] == 1


def test_array_decoding_refuses_what_fedtune_never_sends():
    """dtype whitelist and shape ↔ data length, both encodings, before any allocation."""
    import io

    import numpy as np
    from flwr.app import Array

    def npy(descr, shape, data):
        b = io.BytesIO()
        np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
        return Array(dtype="x", shape=shape, stype=serde.NUMPY_STYPE, data=b.getvalue() + data)

    raw = lambda dtype, shape, n: Array(dtype=dtype, shape=shape, stype=serde.RAW_STYPE, data=b"\0" * n)
    for a, msg in [(raw("Tensor", (2,), 8), "raw array of unsupported dtype 'Tensor'"),
                   (raw("qint8", (8,), 8), "unsupported dtype 'qint8'"),
                   (raw("float32", (-1,), 8), "shape (-1,) of torch.float32 does not match its 8 data bytes"),
                   (raw("bfloat16", (3,), 8), "shape (3,) of torch.bfloat16 does not match its 8 data bytes"),
                   (npy("|O", (1,), b"\0" * 8), "numpy array of unsupported dtype '|O'"),
                   (npy(">f4", (2,), b"\0" * 8), "unsupported dtype '>f4'"),
                   (npy("<f8", (2, 3), b"\0" * 40), "shape (2, 3) of torch.float64 does not match its 40 data bytes"),
                   (Array(dtype="x", shape=(1,), stype=serde.NUMPY_STYPE, data=b"\x93NUMPY"), "EOF"),
                   (Array(dtype="x", shape=(1,), stype="pickle", data=b""), "unsupported stype 'pickle'")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            serde.array_to_tensor(a)
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert torch.equal(serde.array_to_tensor(Array(fortran)), torch.arange(6, dtype=torch.int16).reshape(2, 3))
    assert torch.equal(serde.array_to_tensor(Array(np.array([True, False]))), torch.tensor([True, False]))


def test_a_restarted_supernode_is_found_again_at_the_next_round(tmp_path, flower_task):
    """client-2's SuperNode is offline in round 1 (failed at once, no message); in round 2 a new node (new node
    id, as a restarted flower-supernode gets) says it hosts client-2 and takes part again."""
    from fedtune.run.flower import run_server
    from fedtune.transports.flower.client import NodeSpec

    cfg = config.load(None, {**QUICK, "run.algorithm": "fedavg", "federation.min_clients": 2,
                             "run.out": str(tmp_path / "out")})

    class Restarting(FakeGrid):
        calls = 0

        def get_node_ids(self):
            if not self.discovered:
                return [100, 101, 102]
            Restarting.calls += 1
            return [100, 101] if Restarting.calls == 1 else [100, 101, 202]

    specs = _specs(3) | {202: NodeSpec("client-2", partition=2)}
    summary = run_server(Restarting(cfg, specs), cfg)
    rows = _rows(tmp_path / "out")
    assert [(r["clients_completed"], r["clients_failed"]) for r in rows[1:]] == [(2, ["client-2"]), (3, [])]
    assert summary["flower"]["node_of"]["client-2"] == "202"



def test_dp_accountants_survive_a_process_per_message(tmp_path, flower_task):
    """Sample-level DP on a node whose ClientApp process is new for every message (flwr 1.41 deployment; in
    simulation a node may land on another Ray worker): its accountant lives in the node's state dir, so the
    ε of every round equals the native simulation's (never under-reported). Without a state dir the node
    refuses with the fix instead of silently restarting its accountant."""
    from fedtune.config import ConfigError
    from fedtune.run.assemble import simulate
    from fedtune.run.flower import run_server
    from fedtune.transports.flower.client import NodeSpec, check_dp_state

    over = {**QUICK, "run.algorithm": "fedavg", "run.rounds": 3, "privacy.mode": "sample",
            "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0, "privacy.noise_seed": 3}
    simulate(config.load(None, {**over, "run.out": str(tmp_path / "native")}), progress=False)
    cfg = config.load(None, {**over, "run.out": str(tmp_path / "disk")})
    run_server(FakeGrid(cfg, _specs(3, state_dir=str(tmp_path / "state")), fresh_process=True), cfg)
    eps_native = [r["epsilon"] for r in _rows(tmp_path / "native")[1:]]
    eps_flower = [r["epsilon"] for r in _rows(tmp_path / "disk")[1:]]
    assert eps_native == sorted(eps_native) and eps_native[0] < eps_native[-1]
    assert eps_flower == pytest.approx(eps_native, rel=1e-9)
    with pytest.raises(ConfigError, match="needs a node state dir"):
        check_dp_state(NodeSpec("client-0", partition=0), cfg)


def test_straggler_timeout_stops_waiting_for_a_node_that_never_answers(tmp_path, flower_task):
    """A node that never replies holds a round until federation.round_timeout_s (here 60 s); with [flower]
    straggler_timeout_s = 0.5 the round ends 0.5 s after min_clients = 2 replies, that client failed."""
    import time

    from fedtune.run.flower import run_server

    cfg = config.load(None, {**QUICK, "run.algorithm": "fedavg", "run.rounds": 1, "federation.num_clients": 3,
                             "federation.min_clients": 2, "federation.round_timeout_s": 60.0,
                             "run.out": str(tmp_path / "out")})
    cfg.extra["flower"] = {"straggler_timeout_s": 0.5}

    class Silent(FakeGrid):  # node 102 (client-2) answers discovery, then never a training message
        def _answer(self, msg):
            reply = super()._answer(msg)
            if msg.metadata.message_type != "query" and msg.metadata.dst_node_id == 102:
                reply.metadata.__dict__["_reply_to_message_id"] = "never-delivered"
            return reply

    t0 = time.monotonic()
    summary = run_server(Silent(cfg, _specs(3)), cfg)
    assert time.monotonic() - t0 < 45 and summary["status"] == "completed"
    failed = summary["flower"]["rounds"][0]["failed"]
    assert list(failed) == ["client-2"] and "straggler_timeout_s" in failed["client-2"]
    row = _rows(tmp_path / "out")[1]
    assert row["clients_completed"] == 2 and row["wall_s"] < 30


def _storage_bytes(models) -> int:
    """Bytes of the distinct tensor storages behind `models`' parameters and buffers (a shared tensor once)."""
    seen = {}
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _cache_models(cache):
    return [*([cache.shared.model] if cache.shared is not None else []),
            *(s.node.base if s.node.model is None else s.node.model for s in cache.nodes.values())]


@pytest.mark.parametrize("algorithm", ["flora", "fedkseed"])
def test_a_process_shares_one_base_across_its_nodes_and_equals_native(tmp_path, flower_task, monkeypatch,
                                                                      algorithm):
    """Two simulated actor processes serve 4 nodes: round 1 all on the first, then each node moving to the other
    actor every round (Flower picks the actor). Each process holds ONE model for all its nodes (its parameter storages weigh one base,
    where a model per node weighs one base per node), a node arriving from a version its actor does not hold is
    resynced, and the run's global model is bit-identical to the native simulation's (FedKSeed: a full-parameter
    model, restored bit-exactly after every client)."""
    from fedtune.run.assemble import simulate
    from fedtune.run.flower import run_server
    from fedtune.transports.flower import client as fc

    over = {**QUICK, "run.algorithm": algorithm, "federation.num_clients": 4, "run.rounds": 3}
    cfg = config.load(None, {**over, "run.out": str(tmp_path / "flower")})
    actors = [fc._ProcessCache(), fc._ProcessCache()]

    class Actors(FakeGrid):
        def _answer(self, msg):
            if msg.metadata.message_type != "train":
                return super()._answer(msg)
            rnd = int(msg.content.config_records["fedtune"]["round"])
            monkeypatch.setattr(fc, "_CACHE", actors[(msg.metadata.dst_node_id + rnd) % 2 if rnd > 1 else 0])
            return fc.handle_train(msg, self.cfg, self.nodes[msg.metadata.dst_node_id], share=True)

    summary = run_server(Actors(cfg, _specs(4)), cfg)
    native = simulate(config.load(None, {**over, "run.out": str(tmp_path / "native")}), progress=False)
    assert summary["rounds_completed"] == 3
    assert summary["global_model_fingerprint"] == native["global_model_fingerprint"]
    assert summary["flower"]["resyncs"] > 0  # the FLoRA merges / seeds a moved node missed came as a resync
    base = sum(t.numel() * t.element_size() for t in actors[0].base.model.parameters())
    for a in actors:
        assert not a.nodes and a.shared is not None
        assert _storage_bytes(_cache_models(a)) <= 1.05 * base
    a = actors[0]  # the measure can fail: a model copy per node weighs a base each
    for cid in ("x", "y", "z"):
        a.nodes[cid] = a.new_node()
    assert _storage_bytes(_cache_models(a)) >= 3.9 * base


def test_flower_sends_a_large_tensor_as_chunks_below_grpc_limits():
    """flwr ≥ 1.19 moves a message as an object tree whose arrays are split into chunks of at most
    FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MB), each pushed/pulled in its own request: gRPC's 2 GiB message limit
    binds per chunk, not per message, so FLoRA's multi-GB catch-up crosses (docs/flower.md, Large messages). A 12 MB
    tensor becomes ≥ 3 objects, none above the chunk size, and decodes bit-exactly."""
    from flwr.app import RecordDict
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    t = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB
    rd = RecordDict({"sync": serde.tensors_to_record({"cum/x.D": t})})
    sizes = {}

    def walk(obj):
        for oid, child in (obj.children or {}).items():
            sizes[oid] = len(child.deflate())
            walk(child)

    walk(rd)
    assert max(sizes.values()) <= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 1024
    assert sum(s > 2**20 for s in sizes.values()) >= 3 and serde.message_nbytes(rd) >= t.numel() * 4
    back = serde.record_to_tensors(rd.array_records["sync"])["cum/x.D"]
    assert torch.equal(back, t)


def test_a_payload_above_max_message_gb_stops_the_run_before_the_round(tmp_path, flower_task):
    """FLoRA's round-1 setup carries no tensors, round 2's sync carries round 1's stacks: with a 1-byte limit round
    1 completes, and round 2 stops before any of its messages leaves, with the fix in the error."""
    from fedtune.run.flower import run_server
    from fedtune.transports.flower.options import backend_config

    cfg = config.load(None, {**QUICK, "run.algorithm": "flora", "run.out": str(tmp_path / "out")})
    cfg.extra["flower"] = {"max_message_gb": 1e-9}
    grid = FakeGrid(cfg, _specs(3))
    with pytest.raises(config.ConfigError, match=r"above \[flower\] max_message_gb = 1e-09.*fewer target modules"):
        run_server(grid, cfg)
    s = json.loads((tmp_path / "out/summary.json").read_text())
    assert s["status"] == "failed" and s["rounds_completed"] == 1 and "max_message_gb" in s["error"]
    assert grid.pushed == 3 + 3  # the queries and round 1's train messages; none of round 2
    # GPUs per actor reach Ray's client resources (Ray then sets each actor's CUDA_VISIBLE_DEVICES)
    cfg.extra["flower"] = {"gpus_per_actor": 0.5, "num_actors": 4}
    assert backend_config(cfg) == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.5}, "init_args": {"num_cpus": 4}}
    cfg.extra["flower"] = {}
    assert backend_config(cfg)["init_args"] == {"num_cpus": 2, "num_gpus": 0}
