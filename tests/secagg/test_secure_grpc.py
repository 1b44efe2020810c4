"""Secure aggregation over real gRPC (TLS + mTLS on 127.0.0.1): the coordinator receives only masked vectors and
protocol messages, learns what the simulation learns, survives a client lost mid-round, and a SIGKILLed coordinator
resumes without ever summing a second set of the same round's updates."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_grpc import Server, _free_port, rows

from fedtune import config
from fedtune.config import ClientSection
from fedtune.run.assemble import simulate
from fedtune.secagg.protocol import MASKED, ClientSession
from fedtune.transports.grpc import coordinator as coord
from fedtune.transports.grpc import secure
from fedtune.transports.grpc.agent import Agent
from fedtune.transports.grpc.certs import make_dev_certs

IDS = [f"org-{i}" for i in range(4)]
TOKENS = {c: f"token-{c}-0123456789abcdef" for c in IDS}


def write_run(tmp: Path, *, rounds=2, algorithm="fedavg", port=0, extra="", tls=True) -> Path:
    (tmp / "tokens.toml").write_text("".join(f'{c} = "{t}"\n' for c, t in TOKENS.items()))
    make_dev_certs(tmp / "certs", clients=IDS)
    tls_lines = (f'tls_cert = "{tmp}/certs/server.pem"\ntls_key = "{tmp}/certs/server.key"\n'
                 f'tls_client_ca = "{tmp}/certs/ca.pem"' if tls else "insecure = true  # plaintext on loopback")
    p = tmp / "run.toml"
    p.write_text(f"""
[run]
name = "sa"
rounds = {rounds}
algorithm = "{algorithm}"
out = "{tmp}/out"
[model]
name = "tiny"
[federation]
num_clients = 4
min_clients = 3
max_round_retries = 1
batch_clients = false
[train]
local_steps = 3
lr = 5e-3
[data]
max_train_per_client = 40
max_seq_len = 48
[secagg]
enabled = true
key_timeout_s = 20
[server]
address = "127.0.0.1:{port}"
tokens_file = "{tmp}/tokens.toml"
{tls_lines}
poll_interval_s = 0.05
heartbeat_interval_s = 0.2
lease_timeout_s = 2.0
finish_grace_s = 3.0
{extra}
""")
    return p


def agent(cfg_path: Path, port: int, i: int, *, insecure: bool = False) -> Agent:
    d = cfg_path.parent / "certs"
    c = ClientSection(server=f"localhost:{port}", client_id=IDS[i], partition=i, token=TOKENS[IDS[i]],
                      rpc_timeout_s=20, max_backoff_s=1.0, state_dir=str(cfg_path.parent / f"state-{i}"),
                      tls_ca=str(d / "ca.pem"), tls_cert=str(d / f"{IDS[i]}.pem"), tls_key=str(d / f"{IDS[i]}.key"))
    if insecure:  # a plaintext coordinator (the client checks TLS at construction)
        c.server, c.tls_ca, c.tls_cert, c.tls_key, c.insecure = f"127.0.0.1:{port}", "", "", "", True
    return Agent(config.load(cfg_path), c)


def run_all(cfg_path: Path, agents: list[Agent]):
    import threading

    srv = Server(cfg_path)
    for a in agents:
        a.c.server = f"localhost:{srv.port}"
    results = {}
    threads = [threading.Thread(target=lambda a=a: results.setdefault(a.c.client_id, _run(a)), daemon=True)
               for a in agents]
    for t in threads:
        t.start()
    srv.join(180)
    for t in threads:
        t.join(30)
    assert srv.error is None, srv.error
    return srv, results


def _run(a: Agent):
    try:
        return a.run()
    except Exception as e:  # noqa: BLE001 - a client made to die in a test
        return e


def test_coordinator_sees_only_masked_vectors_and_learns_what_the_simulation_learns(tmp_path, monkeypatch):
    """Everything the coordinator receives is recorded: updates hold only "secagg/y", no SecAgg message holds a
    client's private key or self-mask seed, each masked vector is uncorrelated with that client's delta; the losses
    equal the simulation's (which sums the same updates without a network) within 1e-5."""
    received, bodies, sessions, plain = [], [], [], {}
    real_result, real_secagg = coord.GrpcTransport._result, coord.GrpcTransport.SecAgg
    real_init, real_masked = ClientSession.__init__, ClientSession.masked_input

    def result(self, book):
        received.extend(book.updates.values())
        return real_result(self, book)

    def secagg(self, request, context):
        bodies.append(bytes(request.body))
        return real_secagg(self, request, context)

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        sessions.append((self.cid, self.c_sk, self.s_sk, self.b))

    def masked(self, parts, rng=None):
        plain[(self.cid, self.params.round)] = np.concatenate([np.ravel(parts[p.name]) for p in self.params.layout])
        return real_masked(self, parts, rng)

    monkeypatch.setattr(coord.GrpcTransport, "_result", result)
    monkeypatch.setattr(coord.GrpcTransport, "SecAgg", secagg)
    monkeypatch.setattr(ClientSession, "__init__", init)
    monkeypatch.setattr(ClientSession, "masked_input", masked)
    cfg_path = write_run(tmp_path)
    srv, results = run_all(cfg_path, [agent(cfg_path, 0, i) for i in range(4)])
    assert results == dict.fromkeys(IDS, 0)
    got = rows(tmp_path / "out")
    assert [r["secagg_clients"] for r in got[1:]] == [4, 4]
    assert received and all(set(u.tensors) == {MASKED} for u in received)
    for u in received:
        y = u.tensors[MASKED].numpy().astype(np.float64)
        x = plain[(u.client_id, 1)] if u.tensors[MASKED].numel() == plain[(u.client_id, 1)].size else None
        if x is not None and x.std() > 0:
            assert abs(np.corrcoef(x, y)[0, 1]) < 0.1
    blob = b"".join(bodies)
    assert len(sessions) == 8 and bodies
    for cid, *secrets in sessions:
        for secret in secrets:
            assert secret not in blob and base64.b64encode(secret) not in blob, cid
    sim = simulate(config.load(cfg_path, {"run.out": str(tmp_path / "sim"), "server.tls_cert": "",
                                          "server.tls_key": "", "server.tls_client_ca": ""}), progress=False)
    for a, b in zip(got, rows(tmp_path / "sim"), strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
    assert srv.result["rounds_completed"] == sim["rounds_completed"] == 2


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsb"])
def test_distributed_dp_over_grpc_the_coordinator_unmasks_only_a_noised_sum(tmp_path, monkeypatch, algorithm):
    """[privacy] mode = "distributed" across 4 organisations over mTLS: what the coordinator unmasks differs from the
    sum of the clients' clipped changes by noise of the planned scale (ddp_noise_std, within 10 %), and ε per round
    is the simulation's (the same plan and survivors)."""
    from fedtune.secagg.protocol import ServerSession

    plain, decoded = {}, []
    real_masked, real_finish = ClientSession.masked_input, ServerSession.finish

    def masked(self, parts, rng=None):
        x = np.concatenate([np.ravel(parts[p.name]) for p in self.params.layout])
        plain[(self.cid, self.params.round)] = x * min(1.0, self.params.l2_clip / np.linalg.norm(x))
        return real_masked(self, parts, rng)

    def finish(self):
        res = real_finish(self)
        decoded.append((self.params.round, np.concatenate([np.ravel(res.parts[p.name]) for p in self.params.layout])))
        return res

    monkeypatch.setattr(ClientSession, "masked_input", masked)
    monkeypatch.setattr(ServerSession, "finish", finish)
    ddp = '[privacy]\nmode = "distributed"\nnoise_multiplier = 0.7\nclip_norm = 0.05\n'
    cfg_path = write_run(tmp_path, extra=ddp, algorithm=algorithm)
    _, results = run_all(cfg_path, [agent(cfg_path, 0, i) for i in range(4)])
    assert results == dict.fromkeys(IDS, 0)
    got = rows(tmp_path / "out")[1:]
    for (rnd, z), r in zip(decoded, got, strict=True):
        diff = z - sum(plain[(c, rnd)] for c in IDS)
        assert r["secagg_clients"] == 4 and abs(diff.std() / r["ddp_noise_std"] - 1) < 0.1
    simulate(config.load(cfg_path, {"run.out": str(tmp_path / "sim"), "server.tls_cert": "", "server.tls_key": "",
                                    "server.tls_client_ca": ""}), progress=False)
    assert [r["epsilon"] for r in got] == [r["epsilon"] for r in rows(tmp_path / "sim")[1:]]
    assert got[-1]["epsilon"] > got[0]["epsilon"] > 0


def test_a_client_with_a_noise_floor_refuses_tasks_below_it():
    """[client] min_noise_multiplier: a task without distributed DP, or whose noise at min_survivors survivors gives
    a smaller σ, is refused; one at or above it is taken. σ = √(min_survivors · μ) / Δ₂."""
    from fedtune.algorithms.api import InstructionRejected
    from fedtune.secagg.encode import Part
    from fedtune.secagg.noise import NoiseParams, rounded_l2_bound
    from fedtune.secagg.protocol import RoundParams

    l2 = rounded_l2_bound(1e4 * 0.05, 100)
    p = RoundParams(run="r", round=1, attempt=0, bits=32, threshold=2 / 3, degree=0, weights="uniform", max_weight=1,
                    layout=(Part("x", (100,), 0.05, weighted=False),), min_survivors=4, l2_clip=0.05,
                    noise=NoiseParams(1e4, (0.8 * l2) ** 2 / 4, l2))
    assert p.noise_floor() == pytest.approx(0.8)
    secure.check_noise_floor({"secagg": p.to_dict()}, 0.8 - 1e-9)
    with pytest.raises(InstructionRejected, match="σ = 0.8"):
        secure.check_noise_floor({"secagg": p.to_dict()}, 1.0)
    plain = {**p.to_dict(), "noise": None, "weights": "examples", "l2_clip": 0.0}
    for train in ({"steps": 1}, {"secagg": plain}):
        with pytest.raises(InstructionRejected, match="adds no noise"):
            secure.check_noise_floor(train, 0.5)
    secure.check_noise_floor({"steps": 1}, 0.0)


def test_a_client_lost_after_sharing_keys_is_unmasked_out(tmp_path, monkeypatch):
    """org-3 shares its keys in round 1, then dies before sending its masked vector: its lease lapses, the three
    survivors are summed (its pairwise masks rebuilt from their shares), and round 2 goes on without it."""
    real = secure.SecureTask.mask

    def mask(self, update, client):
        if self.cid == "org-3":
            raise RuntimeError("org-3 crashed while training")
        return real(self, update, client)

    monkeypatch.setattr(secure.SecureTask, "mask", mask)
    cfg_path = write_run(tmp_path)
    _, results = run_all(cfg_path, [agent(cfg_path, 0, i) for i in range(4)])
    assert isinstance(results["org-3"], RuntimeError) and all(results[c] == 0 for c in IDS[:3])
    r1, r2 = rows(tmp_path / "out")[1:]
    assert (r1["secagg_clients"], r1["secagg_dropped"], r1["clients_completed"]) == (3, 1, 3)
    assert r2["secagg_clients"] == 3


@pytest.mark.parametrize("when", [pytest.param("started", marks=pytest.mark.slow), "unmask"])
def test_coordinator_sigkilled_mid_protocol_resumes_safely(tmp_path, when):
    """The coordinator process is SIGKILLed in round 2 once its journal shows the attempt started (key stages) or its
    survivors fixed (unmask): --resume goes on at the next attempt — over exactly the journaled survivors in the
    second case — and the run completes with every round."""
    port = _free_port()
    cfg_path = write_run(tmp_path, rounds=3, port=port, tls=False,
                         extra="[client]\nmax_backoff_s = 1.0\ninsecure = true\n")
    text = cfg_path.read_text().replace("lease_timeout_s = 2.0", "lease_timeout_s = 30.0")
    cfg_path.write_text(text)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server_cmd = [sys.executable, "-m", "fedtune.cli", "server", "--config", str(cfg_path), "--no-progress"]
    srv = subprocess.Popen(server_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "client", "--config", str(cfg_path), "--server", f"127.0.0.1:{port}",
         "--client-id", IDS[i], "--partition", str(i)],
        env=dict(env, FEDTUNE_TOKEN=TOKENS[IDS[i]]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ) for i in range(4)]
    try:
        journal = tmp_path / "out/secagg/r0002.json"
        t0 = time.monotonic()
        while True:
            assert time.monotonic() - t0 < 180, "round 2 never reached the stage"
            assert srv.poll() is None, srv.stdout.read()
            if journal.exists():
                try:
                    rec = json.loads(journal.read_text())
                except ValueError:
                    rec = {}
                if when == "started" or rec.get("survivors"):
                    break
            time.sleep(0.01)
        srv.send_signal(signal.SIGKILL)
        srv.wait()
        rec = json.loads(journal.read_text())
        srv2 = subprocess.Popen([*server_cmd, "--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            out, _ = srv2.communicate(timeout=240)
        finally:
            if srv2.poll() is None:
                srv2.kill()
        assert srv2.returncode == 0, out
        for c in clients:
            c.wait(timeout=60)
            assert c.returncode == 0, c.stderr.read()
        got = rows(tmp_path / "out")
        assert [r["round"] for r in got] == [0, 1, 2, 3]
        if rec.get("survivors"):
            assert "can only sum exactly those clients" in out or "journaled" in out
            assert got[2]["secagg_clients"] == len(rec["survivors"])
        assert not list((tmp_path / "out/secagg").glob("r*"))
    finally:
        for p in [srv, *clients]:
            if p.poll() is None:
                p.kill()


def test_one_secagg_poll_per_client(tmp_path):
    """A SecAgg poll parks a coordinator thread (≤ 10 s): a client gets one at a time, a second concurrent one is
    ABORTED, so no client can exhaust the server's threads; the run goes on without that client."""
    import threading

    import grpc

    from fedtune.models import fingerprint, load_model
    from fedtune.transports import wire
    from fedtune.transports.grpc.security import auth_metadata

    cfg_path = write_run(tmp_path, rounds=1, tls=False)
    srv = Server(cfg_path)
    agents = [agent(cfg_path, srv.port, i, insecure=True) for i in range(3)]
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=wire.channel_options())
    stub, md, cid = wire.CoordinatorStub(channel), auth_metadata(TOKENS["org-3"]), "org-3"
    base, _ = load_model("tiny", seed=0)
    assert wire.from_proto(stub.Join(wire.to_proto(wire.JoinRequest(cid, fingerprint(base), {"train_examples": "40"},
                                                                     "x")), metadata=md, timeout=10)).accepted
    for _ in range(600):  # the round's task for org-3
        task = wire.read_task(stub.PullTask(wire.to_proto(wire.TaskRequest(cid, None)), metadata=md, timeout=10),
                              max_bytes=1 << 30)
        if isinstance(task, wire.Task):
            break
        time.sleep(0.05)
    assert isinstance(task, wire.Task) and "secagg" in task.instruction.train
    poll = wire.to_proto(wire.SecAggRequest(cid, task.task_id, "roster", b""))
    first = threading.Thread(target=lambda: stub.SecAgg(poll, metadata=md, timeout=30), daemon=True)
    first.start()
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as e:
        stub.SecAgg(poll, metadata=md, timeout=30)
    assert e.value.code() == grpc.StatusCode.ABORTED and "already in flight" in e.value.details()
    results = {}
    threads = [threading.Thread(target=lambda a=a: results.setdefault(a.c.client_id, a.run()), daemon=True) for a in agents]
    for t in threads:
        t.start()
    srv.join(180)
    for t in threads:
        t.join(30)
    assert srv.error is None and results == dict.fromkeys(IDS[:3], 0)
    assert rows(tmp_path / "out")[1]["secagg_clients"] == 3
