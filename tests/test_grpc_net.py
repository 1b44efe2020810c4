"""The coordinator against faulty and hostile clients at the network / identity level, on real processes on
127.0.0.1: clean end and bounded retries, stream deadlines and limits, mTLS identity, token sources, plaintext
only with --insecure, escaped client strings in logs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from test_grpc import IDS, TOKENS, Server, _free_port, _health, _rss_mb, pull_until_task, write_run

from fedtune.algorithms.api import ClientUpdate, Instruction, Payload
from fedtune.cli import main
from fedtune.config import ClientSection, ConfigError, ServerSection
from fedtune.transports import wire
from fedtune.transports.base import RoundPlan
from fedtune.transports.grpc.agent import resolve_token
from fedtune.transports.grpc.coordinator import GrpcTransport, Interrupted, start_grpc_server
from fedtune.transports.grpc.security import auth_metadata, channel_credentials
from fedtune.transports.wire import fedtune_pb2 as pb2  # the test crafts raw and hostile messages

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _fixed_port(cfg_path: Path, port: int, **replace: str) -> None:
    text = cfg_path.read_text().replace('address = "127.0.0.1:0"', f'address = "127.0.0.1:{port}"')
    for old, new in replace.items():
        text = text.replace(old, new)
    cfg_path.write_text(text)


def _fedtune(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], env=ENV, text=True, **kw)


def test_clients_exit_0_promptly_after_the_finish(tmp_path, caplog):
    """3 client processes, 0.5 s heartbeat, 1 s poll: every client hears the finish (FINISHED pull or heartbeat
    reply) and exits 0 within a few seconds of the server (here in-process); the server drains until all three
    were told, not for the whole grace period."""
    port = _free_port()
    cfg_path = write_run(tmp_path, rounds=1, extra=f'[client]\ntoken_file = "{tmp_path}/tokens.toml"\n'
                                                   "max_backoff_s = 1.0\nrpc_timeout_s = 20\ninsecure = true\n")
    _fixed_port(cfg_path, port, **{"heartbeat_interval_s = 0.2": "heartbeat_interval_s = 0.5",
                                   "poll_interval_s = 0.05": "poll_interval_s = 1.0",
                                   "finish_grace_s = 3.0": "finish_grace_s = 30.0\nevaluate = false",
                                   "lease_timeout_s = 2.0": "lease_timeout_s = 300.0"})  # slow process starts
    srv = Server(cfg_path)
    logs = [tmp_path / f"client-{i}.log" for i in range(3)]
    clients = []
    for i, cid in enumerate(IDS):
        with logs[i].open("w") as f:
            clients.append(_fedtune("client", "--config", str(cfg_path), "--server", f"127.0.0.1:{port}",
                                    "--client-id", cid, "--partition", str(i), stdout=f, stderr=subprocess.STDOUT))
    try:
        srv.join(300)
        t_server = time.monotonic()
        assert srv.error is None, srv.error
        for c, log_path in zip(clients, logs, strict=True):
            c.wait(timeout=60)
            assert c.returncode == 0, log_path.read_text()
            assert "run finished" in log_path.read_text()
        # a few seconds on an idle machine (interpreter teardown included); generous for a loaded CI box
        assert time.monotonic() - t_server < 30.0
        # drained because all three were told, not by the 30 s grace
        assert not [r for r in caplog.records if "not told the run is finished" in r.getMessage()]
    finally:
        for p in clients:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_client_gives_up_after_max_retry_s(tmp_path, capsys, caplog):
    """Nobody listening: the client retries (backoff) for [client] max_retry_s, then exits 4 with a clear line.
    Started with the deprecated --token and --insecure: both warn."""
    cfg_path = write_run(tmp_path, rounds=1, extra="[client]\nmax_backoff_s = 0.3\nmax_retry_s = 1.5\nrpc_timeout_s = 2\n")
    rc = main(["client", "--config", str(cfg_path), "--server", f"127.0.0.1:{_free_port()}", "--client-id", IDS[0],
               "--partition", "0", "--token", TOKENS[IDS[0]], "--insecure"])
    t_end = time.time()
    assert rc == 4
    err = capsys.readouterr().err
    assert "giving up ([client] max_retry_s = 1.5)" in err and "UNAVAILABLE" in err
    retries = [r.created for r in caplog.records if "retrying in" in r.getMessage()]
    assert 1.0 < t_end - retries[0] < 6.0  # ~1.5 s from the first failure, not forever
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("--token is deprecated") for w in warnings)
    assert any(w.startswith("INSECURE: no TLS") for w in warnings)


def test_plaintext_needs_insecure_on_both_ends(tmp_path, capsys):
    """Without TLS and without --insecure, server and client refuse to start (exit 2, one clear line)."""
    cfg_path = write_run(tmp_path, rounds=1, extra=f'[client]\ntoken_file = "{tmp_path}/tokens.toml"\n')
    cfg_path.write_text(cfg_path.read_text().replace("insecure = true", ""))
    assert main(["server", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [server] tls_cert is empty: client tokens would travel in clear text")
    assert "--insecure" in err and err.count("\n") == 1
    assert main(["client", "--config", str(cfg_path), "--client-id", IDS[0], "--partition", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [client] tls_ca is empty: the token would travel in clear text")
    assert "--insecure" in err and err.count("\n") == 1


def test_token_sources(tmp_path, monkeypatch):
    """[client] token (or --token) > $FEDTUNE_TOKEN > the client's entry in [client] token_file."""
    (tmp_path / "tokens.toml").write_text('a = "from-file-a"\nb = "from-file-b"\n')
    c = ClientSection(client_id="b", token_file=str(tmp_path / "tokens.toml"))
    monkeypatch.delenv("FEDTUNE_TOKEN", raising=False)
    assert resolve_token(c) == "from-file-b"
    monkeypatch.setenv("FEDTUNE_TOKEN", "from-env")
    assert resolve_token(c) == "from-env"
    c.token = "from-config"
    assert resolve_token(c) == "from-config"
    monkeypatch.delenv("FEDTUNE_TOKEN")
    with pytest.raises(ConfigError, match="has no token for client 'z'"):
        resolve_token(ClientSection(client_id="z", token_file=str(tmp_path / "tokens.toml")))
    with pytest.raises(ConfigError, match="set FEDTUNE_TOKEN or"):
        resolve_token(ClientSection(client_id="z"))


def test_mtls_certificate_must_name_the_token_client(tmp_path):
    """Under mTLS the token's client must be the certificate's (CN written by fedtune certs): client-1's
    certificate with client-0's token is PERMISSION_DENIED; the matching pair is accepted."""
    cfg_path = write_run(tmp_path, rounds=1, tls=True)
    srv = Server(cfg_path, **{"federation.round_timeout_s": 60.0})
    certs = tmp_path / "certs"

    def heartbeat(cert_of: str, token_of: str):
        creds = channel_credentials(certs / "ca.pem", certs / f"{cert_of}.pem", certs / f"{cert_of}.key")
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            return wire.from_proto(wire.CoordinatorStub(ch).Heartbeat(
                pb2.HeartbeatRequest(client_id=token_of), metadata=auth_metadata(TOKENS[token_of]), timeout=10))

    try:
        with pytest.raises(grpc.RpcError) as e:
            heartbeat(IDS[1], IDS[0])
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "token of 'client-0' with a client certificate that names 'client-1'"
        assert heartbeat(IDS[0], IDS[0]).known
        assert heartbeat(IDS[1], IDS[1]).known
    finally:
        srv.stop.set()
        srv.join(30)


def test_client_strings_cannot_forge_log_lines(tmp_path, caplog):
    """A fingerprint / version / claimed id with newlines and 10 KB of text: every server log line and error
    detail stays one escaped, length-capped line."""
    cfg_path = write_run(tmp_path, rounds=1)
    caplog.set_level(logging.INFO, logger="fedtune")
    srv = Server(cfg_path, **{"federation.round_timeout_s": 60.0})
    forged = "ab\nINFO client-1 joined\r\x1b[2K" + "z" * 10_000
    md = auth_metadata(TOKENS[IDS[0]])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=wire.channel_options()) as ch:
            stub = wire.CoordinatorStub(ch)
            reply = wire.from_proto(stub.Join(pb2.JoinRequest(client_id=IDS[0], base_fingerprint=forged),
                                               metadata=md, timeout=10))
            assert not reply.accepted and "\n" not in reply.reason and "'ab\\nINFO client" in reply.reason
            good = pb2.JoinRequest(client_id=IDS[0], client_version=forged,
                                   base_fingerprint=_server_fingerprint(stub, md))
            assert wire.from_proto(stub.Join(good, metadata=md, timeout=10)).accepted
            with pytest.raises(grpc.RpcError) as e:
                stub.Heartbeat(pb2.HeartbeatRequest(client_id=forged), metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "\n" not in e.value.details() and len(e.value.details()) < 200
    finally:
        srv.stop.set()
        srv.join(30)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fedtune.server")]
    assert any(line.startswith("INSECURE: no TLS") for line in lines)
    refused = [line for line in lines if line.startswith("refused client-0")]
    joined = [line for line in lines if line.startswith("client-0 joined (fedtune 'ab\\nINFO client-1 joined")]
    assert refused and joined
    for line in lines:
        assert not any(ch in line for ch in "\n\r\x1b"), line
        assert len(line) < 400, line


def _server_fingerprint(stub, md) -> str:
    reply = wire.from_proto(stub.Join(pb2.JoinRequest(client_id=IDS[0], base_fingerprint="0"), metadata=md, timeout=10))
    return reply.expected_fingerprint


MiB = 1 << 20


def _stalled(task_id: str, cid: str, release: threading.Event, size: int, *, chunks: int = 7):
    """An upload declaring `size` bytes (a multiple of 8) in 8 chunks that sends 7 and then withholds the last one."""
    for i in range(chunks):
        msg = pb2.UpdateChunk(task_id=task_id, index=i, total=8, total_bytes=size, sha256=b"\0" * 32,
                              data=b"x" * (size // 8))
        if i == 0:
            msg.client_id, msg.num_examples = cid, 1
        yield msg
    release.wait(60)


def _dribble(task_id: str, cid: str, release: threading.Event):
    """A 100-byte upload sent one byte every 0.3 s: never idle, but too slow in total."""
    for i in range(100):
        msg = pb2.UpdateChunk(task_id=task_id, index=i, total=100, total_bytes=100, sha256=b"\0" * 32, data=b"x")
        if i == 0:
            msg.client_id, msg.num_examples = cid, 1
        yield msg
        if release.wait(0.3):
            return


def _timed(call) -> float:
    t0 = time.monotonic()
    call()
    return time.monotonic() - t0


def test_stalled_uploads_cannot_hold_the_server(tmp_path):
    """20 uploads that withhold their last chunk (from all three clients, each holding an open task), each
    declaring the size of the client's assigned update (no more is accepted at chunk 0): one upload per client at
    a time and an in-flight budget of 2.5 updates leave 2 open, 18 are refused (ABORTED) at once; Heartbeat,
    Join and the health check answer within 1 s meanwhile; the 2 are cut 2 s after their last chunk
    (stream_idle_timeout_s), a dribbling upload at stream_timeout_s; server RSS grows by < 50 MB; then an
    honest upload is accepted."""
    from fedtune.algorithms import get_algorithm
    from fedtune.models import load_model
    from fedtune.transports.wire.tensors import pack_parts

    size = sum(map(len, pack_parts(get_algorithm("fedavg").initialize(load_model("tiny", seed=0)[0], seed=0).tensors)))
    port = _free_port()
    budget = f"{2.5 * size / MiB:.6f}"
    cfg_path = write_run(tmp_path, rounds=1, server=f"max_upload_mb = {budget}\nmax_inflight_mb = {budget}\n"
                                                    "stream_idle_timeout_s = 2.0\nstream_timeout_s = 4.0\n")
    _fixed_port(cfg_path, port, **{"lease_timeout_s = 2.0": "lease_timeout_s = 900.0"})
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        srv = _fedtune("server", "--config", str(cfg_path), "--no-progress", stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())
    stub = wire.CoordinatorStub(channel)
    md = {cid: auth_metadata(TOKENS[cid]) for cid in IDS}
    release = threading.Event()
    try:
        grpc.channel_ready_future(channel).result(timeout=180)  # a server process starts slowly on a busy machine
        tasks = {cid: pull_until_task(stub, cid, md[cid]) for cid in IDS}
        rss0 = _rss_mb(srv.pid)
        calls = [stub.PushUpdate.future(_stalled(tasks[IDS[i % 3]].task_id, IDS[i % 3], release, size),
                                        metadata=md[IDS[i % 3]], timeout=60) for i in range(20)]
        t_open = time.monotonic()
        while sum(c.done() for c in calls) < 18:
            assert time.monotonic() - t_open < 10, [c.done() for c in calls]
            time.sleep(0.05)
        refused = [c.exception() for c in calls if c.done()]
        assert {e.code() for e in refused} == {grpc.StatusCode.ABORTED}
        details = " ".join(e.details() for e in refused)
        assert "already in flight" in details and f"max_inflight_mb = {float(budget):g}" in details
        time.sleep(0.3)  # the two survivors have sent their 7 chunks by now
        held = [c for c in calls if not c.done()]
        assert len(held) == 2
        hb = pb2.HeartbeatRequest(client_id=IDS[0])
        assert _timed(lambda: stub.Heartbeat(hb, metadata=md[IDS[0]], timeout=5)) < 1.0
        join = pb2.JoinRequest(client_id=IDS[1], base_fingerprint="ab" * 32)
        assert _timed(lambda: stub.Join(join, metadata=md[IDS[1]], timeout=5)) < 1.0
        assert _timed(lambda: _health(channel)) < 1.0
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        grown = _rss_mb(srv.pid) - rss0
        for c in held:
            assert c.exception(timeout=10).code() == grpc.StatusCode.CANCELLED
        assert 1.5 < time.monotonic() - t_open < 15.0
        assert grown < 50, grown
        # a dribbling upload: a chunk every 0.3 s is never idle, the 4 s total cuts it
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.PushUpdate(_dribble(tasks[IDS[2]].task_id, IDS[2], release), metadata=md[IDS[2]], timeout=30)
        assert e.value.code() == grpc.StatusCode.CANCELLED
        assert 3.5 < time.monotonic() - t0 < 15.0
        # slots and budget are free again: an honest upload goes through
        upd = ClientUpdate(IDS[0], 5, {k: v.clone() for k, v in tasks[IDS[0]].instruction.sync.tensors.items()})
        reply = wire.from_proto(stub.PushUpdate(wire.update_to_chunks(upd, tasks[IDS[0]].task_id),
                                                 metadata=md[IDS[0]], timeout=10))
        assert reply.accepted, reply.reason
        assert srv.poll() is None
    finally:
        release.set()
        srv.kill()
        srv.wait()
        channel.close()
    log_text = log_path.read_text()
    assert "cut the upload stream of 'client-" in log_text and "stream_idle_timeout_s = 2" in log_text
    assert "stream_timeout_s = 4" in log_text


def test_stalled_download_is_cut_and_frees_the_slot():
    """A client that stops reading its 24 MiB task mid-stream (64 KiB HTTP/2 window, no BDP growth): the server's
    send is parked; a second PullTask of that client is ABORTED meanwhile; the watchdog cuts the stream after
    stream_idle_timeout_s, and then the same client downloads its task in full."""
    cid = IDS[0]
    scfg = ServerSection(address="127.0.0.1:0", insecure=True, stream_idle_timeout_s=1.0, poll_interval_s=0.05)
    transport = GrpcTransport(roster=[cid], tokens={cid: TOKENS[cid]}, fingerprint="f" * 64, model_name="tiny",
                              run_name="t", algorithm="fedavg", cfg=scfg)
    ins = Instruction(1, cid, 1, {"steps": 1}, Payload({"w": torch.ones(6 * MiB)}))  # 24 MiB of float32
    plan = RoundPlan(round=1, version=1, instructions={cid: ins}, versions={cid: 0}, min_clients=1, roster=[cid],
                     instruction_for=lambda _cid, _version: ins, check_update=None, expected_update=None,
                     sync_payload=None)
    server, port, _ = start_grpc_server(transport, scfg.address, scfg)

    def one_round():
        with contextlib.suppress(Interrupted):  # ended by the test
            transport.run_round(plan, 60.0)

    rounds = threading.Thread(target=one_round, daemon=True)
    rounds.start()
    md = auth_metadata(TOKENS[cid])
    req = pb2.TaskRequest(client_id=cid)
    slow = grpc.insecure_channel(f"127.0.0.1:{port}", options=[*wire.channel_options(), ("grpc.http2.bdp_probe", 0)])
    fast = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())
    try:
        for _ in range(100):  # until the round has opened its task
            with transport.lock:
                if transport.book is not None:
                    break
            time.sleep(0.05)
        stalled = wire.CoordinatorStub(slow).PullTask(req, metadata=md, timeout=30)
        assert pb2.TaskChunk.FromString(next(stalled)).index == 0  # then stop reading (the stub yields bytes)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as e:
            list(wire.CoordinatorStub(fast).PullTask(req, metadata=md, timeout=10))
        assert e.value.code() == grpc.StatusCode.ABORTED and "download" in e.value.details()
        t0 = time.monotonic()
        while transport.streams:
            assert time.monotonic() - t0 < 10, "the stalled download was not cut"
            time.sleep(0.05)
        assert 0.5 < time.monotonic() - t0
        with pytest.raises(grpc.RpcError) as e:
            list(stalled)
        assert e.value.code() == grpc.StatusCode.CANCELLED
        task = wire.read_task(wire.CoordinatorStub(fast).PullTask(req, metadata=md, timeout=30), max_bytes=1 << 30)
        assert torch.equal(task.instruction.sync.tensors["w"], ins.sync.tensors["w"])
    finally:
        transport.stop_event.set()
        rounds.join(5)
        server.stop(grace=None)
        transport.closed.set()
        slow.close()
        fast.close()
