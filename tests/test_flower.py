"""Flower integration: serde is bit-exact; a run through Flower's simulation engine (Ray) ends in the same
global model as the in-process simulation; the Flower app starts under the `flwr` CLI."""

import json
import os
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
from fedtune.algorithms.base import ClientUpdate, Instruction, Payload
from fedtune.flower import serde

ROOT = Path(__file__).resolve().parents[1]
FAST = {"model.name": "tiny", "federation.num_clients": 3, "train.local_steps": 3, "train.lr": 5e-3,
        "data.max_train_per_client": 48, "data.max_seq_len": 64, "run.rounds": 2, "run.seed": 3}

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
    from fedtune.flower import run_flower_simulation
    from fedtune.simulation import simulate

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
    env = dict(os.environ, FLWR_HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
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
        assert summary["engine"] == "flower" and summary["rounds_completed"] == 1
        assert [r["round"] for r in _rows(out)] == [0, 1]
        assert (out / "adapter/adapter_model.safetensors").exists()
    finally:  # stop the local SuperLink this test started (identified by its FLWR_HOME log path)
        for p in psutil.process_iter(["pid", "cmdline"]):
            if str(home) in " ".join(p.info["cmdline"] or []):
                try:
                    os.kill(p.info["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass


def test_a_node_that_lost_its_model_is_resynced_by_the_engine(tmp_path):
    """Round 2: client-1's worker lost its model (a fresh Ray worker). It answers "stale"; the transport
    resends the engine's own instruction_for(client-1, -1) (setup + every missed FLoRA merge) and the run
    still equals the native simulation."""
    from fedtune.flower import client as flower_client
    from fedtune.flower.transport import FlowerTransport
    from fedtune.simulation import simulate

    over = {**FAST, "run.algorithm": "flora", "federation.batch_clients": False}
    cfg = config.load(None, {**over, "run.out": str(tmp_path / "flower")})

    class LocalGrid:  # delivers each message to the client-side handler in this process
        calls = 0

        def send_and_receive(self, messages, timeout):
            if LocalGrid.calls == 1:  # before round 2
                flower_client._CACHE.nodes.pop(1, None)
            LocalGrid.calls += 1
            return [flower_client.handle_train(m, cfg) for m in messages]

    made = []

    def factory(engine, gm, data, pad_id):
        made.append(FlowerTransport(LocalGrid(), {f"client-{i}": 101 + i for i in range(3)}, engine.algo).attach(engine))
        return made[0]

    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as in a ServerApp; Message() needs them
    try:
        simulate(cfg, progress=False, transport_factory=factory)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    simulate(config.load(None, {**over, "run.out": str(tmp_path / "native")}), progress=False)
    assert made[0].resyncs == 1 and LocalGrid.calls == 3
    a = load_file(str(tmp_path / "native/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(max_abs(a[k], b[k]) for k in a) <= 1e-6
