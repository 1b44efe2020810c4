"""Token auth interceptor, TLS / mTLS with dev certs, certs CLI — over real gRPC on 127.0.0.1."""

import stat
import tomllib
from concurrent import futures

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.algorithms.api import ClientUpdate
from fedtune.transports import wire
from fedtune.transports.grpc.certs import certs_main, make_dev_certs, make_tokens, write_tokens_toml
from fedtune.transports.grpc.security import (
    TokenAuthInterceptor,
    auth_metadata,
    bearer_token,
    channel_credentials,
    server_credentials,
    token_ok,
)

T = 5  # seconds: deadline of every RPC in these tests
TOKENS = {"org-a": "token-a-" + "x" * 30, "org-b": "token-b-" + "y" * 30}


class Servicer(wire.CoordinatorServicer):
    """Echoes the authenticated client; accepts uploads up to 1 MiB for task "t-<client>"."""

    def __init__(self, auth: TokenAuthInterceptor) -> None:
        self.auth = auth

    def Join(self, request, context):
        cid = self.auth.authenticated_client(context)
        return wire.to_proto(wire.JoinReply(accepted=cid == request.client_id, reason=cid))

    def PullTask(self, request, context):
        self.auth.authenticated_client(context)
        yield from wire.wait_chunks(1.0, "no task")

    def PushUpdate(self, request_iterator, context):
        cid = self.auth.authenticated_client(context)
        with wire.abort_on_wire_error(context):
            task_id, upd = wire.read_update(
                request_iterator, max_bytes=1 << 20, expected_task_id=f"t-{cid}", expected_client_id=cid
            )
        return wire.to_proto(wire.PushReply(True, f"{task_id}:{upd.num_examples}"))

    def Heartbeat(self, request, context):
        self.auth.authenticated_client(context)
        return wire.to_proto(wire.HeartbeatReply(known=True, heartbeat_interval_s=5.0))


def start_server(creds=None):
    auth = TokenAuthInterceptor(TOKENS)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[auth], options=wire.channel_options()
    )
    wire.add_servicer(server, Servicer(auth))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def plain():
    server, addr = start_server()
    channel = grpc.insecure_channel(addr, options=wire.channel_options())
    yield channel
    channel.close()
    server.stop(None)


def call_all(channel, metadata):
    """Every Coordinator RPC once; returns {rpc: status code}."""
    stub = wire.CoordinatorStub(channel)
    upd = ClientUpdate("org-a", 3, {"w": torch.ones(4)}, {"loss": 0.5})
    calls = {
        "Join": lambda: stub.Join(wire.to_proto(wire.JoinRequest("org-a", "ab")), metadata=metadata, timeout=T),
        "PullTask": lambda: list(
            stub.PullTask(wire.to_proto(wire.TaskRequest("org-a")), metadata=metadata, timeout=T)
        ),
        "PushUpdate": lambda: stub.PushUpdate(wire.update_to_chunks(upd, "t-org-a"), metadata=metadata, timeout=T),
        "Heartbeat": lambda: stub.Heartbeat(
            wire.to_proto(wire.HeartbeatRequest("org-a")), metadata=metadata, timeout=T
        ),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[name] = e.code()
    return codes


def health_check(channel, metadata=None):
    return (
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=T).status
    )


# --- tokens ----------------------------------------------------------------------------------


def test_token_ok_and_parsing():
    assert token_ok("abc", "abc") and not token_ok("abc", "abd") and not token_ok("abc", "ab")
    assert not token_ok("", "") and not token_ok("é", "e")
    assert bearer_token(auth_metadata("tok")) == "tok"
    assert bearer_token((("authorization", "bearer tok"),)) == "tok"
    assert bearer_token((("authorization", "Basic tok"),)) is None
    assert bearer_token((("authorization", "Bearer a"), ("authorization", "Bearer b"))) is None
    assert bearer_token(None) is None
    with pytest.raises(ValueError, match="share a token"):
        TokenAuthInterceptor({"a": "t", "b": "t"})
    with pytest.raises(ValueError, match="empty token"):
        TokenAuthInterceptor({"a": ""})


def test_no_or_wrong_token_is_unauthenticated(plain):
    unauth = {rpc: grpc.StatusCode.UNAUTHENTICATED for rpc in ("Join", "PullTask", "PushUpdate", "Heartbeat")}
    assert call_all(plain, None) == unauth
    assert call_all(plain, auth_metadata("wrong")) == unauth
    assert call_all(plain, (("authorization", TOKENS["org-a"]),)) == unauth  # missing "Bearer"


def test_right_token_ok_and_identifies_client(plain):
    codes = call_all(plain, auth_metadata(TOKENS["org-a"]))
    assert set(codes.values()) == {grpc.StatusCode.OK}
    stub = wire.CoordinatorStub(plain)
    reply = wire.from_proto(
        stub.Join(wire.to_proto(wire.JoinRequest("org-a", "ab")), metadata=auth_metadata(TOKENS["org-b"]), timeout=T)
    )
    assert reply == wire.JoinReply(accepted=False, reason="org-b")  # org-b's token cannot join as org-a


def test_upload_errors_map_to_status(plain):
    stub = wire.CoordinatorStub(plain)
    md = auth_metadata(TOKENS["org-b"])
    upd = ClientUpdate("org-b", 1, {"w": torch.zeros(1 << 19)}, {})  # 2 MiB > 1 MiB limit
    with pytest.raises(grpc.RpcError) as e:
        stub.PushUpdate(wire.update_to_chunks(upd, "t-org-b"), metadata=md, timeout=T)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = ClientUpdate("org-b", 1, {"w": torch.zeros(4)}, {})
    with pytest.raises(grpc.RpcError) as e:  # org-a's task
        stub.PushUpdate(wire.update_to_chunks(small, "t-org-a"), metadata=md, timeout=T)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = wire.from_proto(stub.PushUpdate(wire.update_to_chunks(small, "t-org-b"), metadata=md, timeout=T))
    assert reply == wire.PushReply(True, "t-org-b:1")


def test_health_needs_no_token(plain):
    assert health_check(plain) == health_pb2.HealthCheckResponse.SERVING


# --- TLS / mTLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    good = tmp_path_factory.mktemp("certs")
    other = tmp_path_factory.mktemp("other")
    return make_dev_certs(good, clients=["org-a"]), make_dev_certs(other, clients=["org-a"])


def test_dev_certs_contents(pki):
    files, _ = pki
    assert sorted(p.name for p in files.values()) == sorted(
        ["ca.pem", "server.pem", "server.key", "org-a.pem", "org-a.key"]
    )
    for name in ("server_key", "org-a_key"):
        assert stat.S_IMODE(files[name].stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate(files["server"].read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "server"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = x509.load_pem_x509_certificate(files["org-a"].read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "org-a"
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    client.verify_directly_issued_by(ca)
    with pytest.raises(FileExistsError):
        make_dev_certs(files["ca"].parent, clients=["org-a"])
    with pytest.raises(ValueError, match="invalid client id"):
        make_dev_certs(files["ca"].parent / "x", clients=["../evil"])


def test_tls(pki):
    files, _ = pki
    server, addr = start_server(server_credentials(files["server"], files["server_key"]))
    try:
        with grpc.secure_channel(addr, channel_credentials(files["ca"])) as ch:
            assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
            assert set(call_all(ch, auth_metadata(TOKENS["org-a"])).values()) == {grpc.StatusCode.OK}
            assert call_all(ch, None)["Join"] == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError) as e:
            health_check(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_mtls(pki):
    files, other = pki
    creds = server_credentials(files["server"].read_bytes(), files["server_key"].read_bytes(), client_ca=files["ca"])
    server, addr = start_server(creds)
    try:
        with grpc.secure_channel(addr, channel_credentials(files["ca"], files["org-a"], files["org-a_key"])) as ch:
            assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
        bad = [
            channel_credentials(files["ca"]),  # no client cert
            channel_credentials(files["ca"], other["org-a"], other["org-a_key"]),  # cert from another CA
        ]
        for creds in bad:
            with grpc.secure_channel(addr, creds) as ch, pytest.raises(grpc.RpcError) as e:
                health_check(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
    with pytest.raises(ValueError, match="both"):
        channel_credentials(files["ca"], cert=files["org-a"])


def test_certs_main_and_tokens(tmp_path, capsys):
    out = tmp_path / "certs"
    assert certs_main(["--out", str(out), "--clients", "org-a, org-b"]) == 0
    tokens = tomllib.loads((out / "server" / "tokens.toml").read_text())["tokens"]
    assert sorted(tokens) == ["org-a", "org-b"] and len(set(tokens.values())) == 2
    assert all(len(t) >= 40 for t in tokens.values())
    assert stat.S_IMODE((out / "server" / "tokens.toml").stat().st_mode) == 0o600
    assert (out / "org-b" / "client.pem").exists() and (out / "org-b" / "client.key").exists()  # see test_certs.py
    assert certs_main(["--out", str(out), "--clients", "org-a"]) == 2  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err
    assert certs_main(["--out", str(out), "--clients", "org-a", "--force"]) == 0
    assert certs_main(["--out", str(tmp_path / "bad"), "--clients", "ca"]) == 2
    p = write_tokens_toml(tmp_path / "t.toml", make_tokens(["x"]))
    assert list(tomllib.loads(p.read_text())["tokens"]) == ["x"]
