"""A hostile organisation against a real `fedtune server` process on localhost (FLoRA, tiny model): one
authenticated client pushes a crafted update each round (broken tensors, or valid tensors with lying metrics);
the coordinator refuses it with INVALID_ARGUMENT, stays up and SERVING, the two honest clients finish, and the
final adapter and the reported train loss and ε are identical to a run in which the hostile client never
reported (same transport, same honest clients)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from test_grpc import IDS, TOKENS, Server, _free_port, _health, adapters, agent, rows, run_agents, write_run

from fedtune.algorithms.api import ClientUpdate
from fedtune.algorithms.common.lora import DEFAULT_TARGETS, lora_shapes
from fedtune.models import fingerprint, load_model
from fedtune.transports import wire
from fedtune.transports.grpc.security import auth_metadata

HOSTILE = IDS[2]


def _attack(name: str, rank: int, shapes: dict[str, tuple[int, int]]) -> ClientUpdate:
    """An update of the assigned rank, then broken the named way."""
    r = 20_000 if name == "rank_20000" else rank
    t = {}
    for m, (d_out, d_in) in sorted(shapes.items()):
        t[f"{m}.A"], t[f"{m}.B"] = torch.full((r, d_in), 0.01), torch.full((d_out, r), 0.01)
    n = 48
    first = min(t)
    if name == "missing_tensor":
        del t[first]
    elif name == "shape_4x63":
        t[first] = torch.zeros(rank, t[first].shape[1] - 1)
    elif name == "nan_and_2^62_examples":
        t = {k: torch.full_like(v, float("nan")) for k, v in t.items()}
        n = 2**62
    elif name.startswith("entry_"):  # finite, right shapes: one value huge (issue: 1e19 lost the whole run)
        t[first].view(-1)[0] = float(name.removeprefix("entry_"))
    elif name == "times_1000":  # an honest-size update scaled ×1000
        t = {k: v * 1000 for k, v in t.items()}
    metrics = {"train_loss": -1e30, "epsilon": 0.5} if name == "poisoned_metrics" else {"train_loss": 1.0}
    return ClientUpdate(HOSTILE, n, t, metrics)


ATTACKS = {  # round → (attack, what the refusal names)
    1: ("missing_tensor", "1 expected tensor(s) missing"),
    2: ("shape_4x63", "has shape (4, 63), expected (4, 64)"),
    3: ("nan_and_2^62_examples", f"num_examples = {2**62} exceeds the allowed 48"),
    4: ("rank_20000", "bytes; the update assigned to it this round takes at most"),  # refused at chunk 0
    5: ("poisoned_metrics", "metric train_loss = -1e+30 is outside [0, 10000]"),  # valid tensors, lying metrics
    6: ("entry_1e19", "moves 1e+19 from 0; local training as configured moves no value more than"),
    7: ("entry_3e38", "moves 3e+38 from 0"),
    8: ("times_1000", "moves 10 from 0"),  # FLoRA, 3 AdamW steps at lr 5e-3: |A| ≤ 0.245, |s·B| ≤ 0.24
}


def _task(stub, md, rnd: int, deadline: float) -> wire.Task:
    while time.monotonic() < deadline:
        res = wire.read_task(stub.PullTask(wire.to_proto(wire.TaskRequest(HOSTILE, None)), metadata=md, timeout=10),
                              max_bytes=1 << 30)
        if isinstance(res, wire.Task) and res.instruction.round == rnd:
            return res
        time.sleep(0.05)
    raise AssertionError(f"no round-{rnd} task for the hostile client")


def _refused(stub, md, task_id: str, update: ClientUpdate, code) -> str:
    """Push `update`; it must be refused with `code`. Returns the error details."""
    try:
        stub.PushUpdate(wire.update_to_chunks(update, task_id), metadata=md, timeout=30)
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        return e.details()
    raise AssertionError("accepted")


def test_hostile_updates_are_refused_and_the_honest_run_is_unchanged(tmp_path):
    cfg_path = write_run(tmp_path, algorithm="flora", rounds=len(ATTACKS), extra="[flora]\nrank = 4\nalpha = 8.0\n")
    port = _free_port()
    text = cfg_path.read_text().replace('address = "127.0.0.1:0"', f'address = "127.0.0.1:{port}"')
    cfg_path.write_text(text.replace("lease_timeout_s = 2.0", "lease_timeout_s = 60.0"))  # clients load slowly
    srv = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "server", "--config", str(cfg_path), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agents = [agent(cfg_path, port, i) for i in range(2)]  # honest clients load while the server starts
    ref_agents = [agent(cfg_path, 0, i) for i in range(2)]  # and those of the reference run
    base, _ = load_model("tiny", seed=0)
    shapes = lora_shapes(base, DEFAULT_TARGETS)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())
        grpc.channel_ready_future(channel).result(timeout=90)
        threads, results = run_agents(agents)
        stub, md = wire.CoordinatorStub(channel), auth_metadata(TOKENS[HOSTILE])
        for bogus in ("²", "9" * 5000, "-1", "0"):  # a declared example count must be a plain positive integer
            with pytest.raises(grpc.RpcError) as e:
                stub.Join(wire.to_proto(wire.JoinRequest(HOSTILE, fingerprint(base), {"train_examples": bogus}, "x")),
                          metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bogus
        join = wire.from_proto(stub.Join(wire.to_proto(wire.JoinRequest(
            HOSTILE, fingerprint(base), {"train_examples": "48"}, "evil")), metadata=md, timeout=10))
        assert join.accepted
        deadline = time.monotonic() + 600  # generous: the machine may be busy
        for rnd, (name, message) in ATTACKS.items():
            task = _task(stub, md, rnd, deadline)
            assert task.instruction.train["rank"] == 4
            details = _refused(stub, md, task.task_id, _attack(name, 4, shapes), grpc.StatusCode.INVALID_ARGUMENT)
            assert message in details, (name, details)
            assert srv.poll() is None, f"{name}: the coordinator died"
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            # failed for this round: no second try, not even with a valid update
            _refused(stub, md, task.task_id, _attack("none", 4, shapes), grpc.StatusCode.PERMISSION_DENIED)
        while not isinstance(wire.read_task(stub.PullTask(wire.to_proto(wire.TaskRequest(HOSTILE, None)),
                                                           metadata=md, timeout=10), max_bytes=1 << 20), wire.Finished):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the reference, while the server finishes: the same gRPC run in which client-2 never shows up
        # (dropped each round when its lease expires), with the same honest clients
        ref = Server(cfg_path, **{"run.out": str(tmp_path / "ref"), "server.address": "127.0.0.1:0",
                                  "server.lease_timeout_s": 1.5})
        for a in ref_agents:
            a.c.server = f"127.0.0.1:{ref.port}"
        ref_threads, ref_results = run_agents(ref_agents)
        out, _ = srv.communicate(timeout=300)
        assert srv.returncode == 0, out
        ref.join(300)
        for t in [*threads, *ref_threads]:
            t.join(30)
    finally:
        for a in [*agents, *ref_agents]:
            a.stop.set()  # never leave a client retrying when an assertion fails
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    assert results == ref_results == dict.fromkeys(IDS[:2], 0) and ref.error is None
    assert out.count("refused the update of client-2") == len(ATTACKS), out
    r = rows(tmp_path / "out")[1:]
    assert [(x["clients_completed"], x["updates_rejected"]) for x in r] == [(2, 1)] * len(ATTACKS)
    assert [x["clients_completed"] for x in rows(tmp_path / "ref")[1:]] == [2] * len(ATTACKS)
    assert adapters(tmp_path / "out", tmp_path / "ref") == 0.0  # bit-identical to the honest-only run
    # and so is what the run reports: the refused metrics reached neither the train loss nor ε
    assert [(x["train_loss"], x["epsilon"]) for x in r] == [(x["train_loss"], x["epsilon"]) for x in rows(tmp_path / "ref")[1:]]


def test_a_client_that_heartbeats_but_never_uploads_cannot_hold_the_rounds(tmp_path):
    """A hostile client keeps its lease alive (heartbeats) and pulls its task but never uploads: without
    [server] straggler_timeout_s each round would wait round_timeout_s (here 120 s) for it; with 1 s the rounds
    end 1 s after the min_clients = 2 honest updates, the hostile client failed, the run completes."""
    cfg_path = write_run(tmp_path, rounds=2)
    port = _free_port()
    text = cfg_path.read_text().replace('address = "127.0.0.1:0"', f'address = "127.0.0.1:{port}"')
    text = text.replace("lease_timeout_s = 2.0", "lease_timeout_s = 60.0\nstraggler_timeout_s = 1.0")
    cfg_path.write_text(text.replace("max_round_retries = 0", "max_round_retries = 0\nround_timeout_s = 120"))
    srv = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "server", "--config", str(cfg_path), "--no-progress"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agents = [agent(cfg_path, port, i) for i in range(2)]
    stop = threading.Event()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())
        grpc.channel_ready_future(channel).result(timeout=90)
        stub, md = wire.CoordinatorStub(channel), auth_metadata(TOKENS[HOSTILE])
        base, _ = load_model("tiny", seed=0)
        assert wire.from_proto(stub.Join(wire.to_proto(wire.JoinRequest(
            HOSTILE, fingerprint(base), {"train_examples": "48"}, "idle")), metadata=md, timeout=10)).accepted

        def hold() -> None:  # pull each round's task, then only heartbeat
            while not stop.is_set():
                try:
                    res = wire.read_task(stub.PullTask(wire.to_proto(wire.TaskRequest(HOSTILE, None)), metadata=md,
                                                        timeout=10), max_bytes=1 << 24)
                    task_id = res.task_id if isinstance(res, wire.Task) else ""
                    stub.Heartbeat(wire.to_proto(wire.HeartbeatRequest(HOSTILE, task_id)), metadata=md, timeout=10)
                except grpc.RpcError:
                    pass  # the server is gone at the end
                stop.wait(0.2)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        t0 = time.monotonic()
        threads, results = run_agents(agents)
        out, _ = srv.communicate(timeout=300)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        for a in agents:
            a.stop.set()
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    assert srv.returncode == 0, out
    assert results == dict.fromkeys(IDS[:2], 0)
    r = rows(tmp_path / "out")[1:]
    assert [(x["clients_completed"], x["clients_failed"]) for x in r] == [(2, [HOSTILE])] * 2
    assert all(x["wall_s"] < 60 for x in r) and took < 120, (took, [x["wall_s"] for x in r])
    assert out.count("(straggler_timeout_s); not waiting for ['client-2']") == 2, out


def test_claims_are_bounded_not_believed(tmp_path):
    """A client that declares 10^6 examples at Join and claims them, with train_loss 9000 and ε = 1e300 in a run
    without DP, and a valid update: it is aggregated with at most half the round's weight ([federation]
    max_client_weight = 0.5), the round's train loss is the honest median, and no ε is reported anywhere."""
    import json

    cfg_path = write_run(tmp_path, rounds=2, algorithm="fedsb")
    srv = Server(cfg_path)
    agents = [agent(cfg_path, srv.port, i) for i in range(2)]
    base, _ = load_model("tiny", seed=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=wire.channel_options())
    stub, md = wire.CoordinatorStub(channel), auth_metadata(TOKENS[HOSTILE])
    assert wire.from_proto(stub.Join(wire.to_proto(wire.JoinRequest(
        HOSTILE, fingerprint(base), {"train_examples": str(10**6)}, "liar")), metadata=md, timeout=10)).accepted
    threads, results = run_agents(agents)
    deadline = time.monotonic() + 300
    for rnd in (1, 2):
        task = _task(stub, md, rnd, deadline)
        ins = task.instruction
        mods, rank = sorted({k[:-2] for k in ins.setup.tensors}), ins.setup.meta["rank"]  # never synced: a setup
        r = ins.sync.tensors.get("R", torch.zeros(len(mods), rank, rank)) + 0.001  # an honest-size change of R
        up = ClientUpdate(HOSTILE, 10**6, {"R": r}, {"train_loss": 9000.0, "epsilon": 1e300})
        reply = wire.from_proto(stub.PushUpdate(wire.update_to_chunks(up, task.task_id), metadata=md, timeout=30))
        assert reply.accepted, reply.reason
    srv.join(300)
    for t in threads:
        t.join(30)
    assert srv.error is None and results == dict.fromkeys(IDS[:2], 0)
    got = rows(tmp_path / "out")[1:]
    assert all(x["clients_weight_capped"] == [HOSTILE] and x["clients_completed"] == 3 for x in got)
    assert all(x["epsilon"] is None and x["train_loss"] < 100 for x in got)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary.get("epsilon") is None and "1e+300" not in json.dumps(summary)
