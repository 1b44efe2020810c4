"""`fedtune certs` per-party directories and the health probe under TLS / mTLS (real gRPC on 127.0.0.1)."""

import stat
import tomllib
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2_grpc

from fedtune.config import ClientSection, ConfigError
from fedtune.transports.grpc import health as healthcheck
from fedtune.transports.grpc.agent import resolve_token
from fedtune.transports.grpc.certs import certs_main
from fedtune.transports.grpc.security import server_credentials

ORGS = ["org-a", "org-b", "org-c"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "certs"
    assert certs_main(["--out", str(out), "--clients", ",".join(ORGS)]) == 0
    return out


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def cn(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert, cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_one_directory_per_party_with_only_its_secrets(out):
    assert sorted(p.name for p in out.iterdir()) == sorted(["server", *ORGS])
    assert sorted(p.name for p in (out / "server").iterdir()) == sorted(
        ["ca.pem", "server.pem", "server.key", "tokens.toml", "health.pem", "health.key"])
    all_tokens = tomllib.loads((out / "server" / "tokens.toml").read_text())["tokens"]
    assert sorted(all_tokens) == ORGS and len(set(all_tokens.values())) == 3
    ca = x509.load_pem_x509_certificate((out / "server" / "ca.pem").read_bytes())
    for org in ORGS:
        d = out / org
        assert sorted(p.name for p in d.iterdir()) == ["ca.pem", "client.key", "client.pem", "token.toml"]
        assert (d / "ca.pem").read_bytes() == (out / "server" / "ca.pem").read_bytes()
        assert tomllib.loads((d / "token.toml").read_text()) == {"tokens": {org: all_tokens[org]}}
        cert, name = cn(d / "client.pem")
        assert name == org
        cert.verify_directly_issued_by(ca)
        assert mode(d) == 0o700 and mode(d / "client.key") == 0o600 and mode(d / "token.toml") == 0o600
        assert mode(d / "client.pem") == 0o644 and mode(d / "ca.pem") == 0o644
        # the client config reads its own token; another org's id is not in its file
        assert resolve_token(ClientSection(client_id=org, token_file=str(d / "token.toml"))) == all_tokens[org]
        other = ORGS[(ORGS.index(org) + 1) % 3]
        with pytest.raises(ConfigError, match="no token for client"):
            resolve_token(ClientSection(client_id=other, token_file=str(d / "token.toml")))
    cert, name = cn(out / "server" / "health.pem")
    assert name == "healthcheck" and name not in all_tokens
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert all(mode(out / "server" / f) == 0o600 for f in ("server.key", "health.key", "tokens.toml"))


def test_certs_refuses_overwrite_and_reserved_ids(out, tmp_path, capsys):
    before = (out / "org-a" / "token.toml").read_bytes()
    assert certs_main(["--out", str(out), "--clients", "org-a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "org-a" / "token.toml").read_bytes() == before
    assert certs_main(["--out", str(tmp_path / "x"), "--clients", "healthcheck"]) == 2
    assert certs_main(["--out", str(tmp_path / "x"), "--clients", "server"]) == 2
    assert not (tmp_path / "x").exists()  # nothing written on error
    assert certs_main(["--out", str(tmp_path / "y"), "--clients", "org-a"]) == 0
    assert certs_main(["--out", str(tmp_path / "y"), "--clients", "org-a", "--force"]) == 0
    assert (tmp_path / "y" / "org-a" / "token.toml").read_bytes() != before


def serve_health(creds):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("mtls", [False, True])
def test_healthcheck_tls_and_mtls(out, mtls):
    s = out / "server"
    creds = server_credentials(s / "server.pem", s / "server.key", client_ca=s / "ca.pem" if mtls else None)
    server, addr = serve_health(creds)
    try:
        tls = ["--address", addr, "--ca", str(s / "ca.pem"), "--timeout", "5"]
        probe = ["--cert", str(s / "health.pem"), "--key", str(s / "health.key")]
        assert healthcheck.main(tls + probe) == 0
        assert healthcheck.main(tls) == (1 if mtls else 0)  # mTLS needs the probe's client cert
        assert healthcheck.main(["--address", addr, "--timeout", "2"]) == 1  # plaintext against TLS
    finally:
        server.stop(None)


def test_healthcheck_usage_errors(out, capsys):
    with pytest.raises(SystemExit) as e:
        healthcheck.main(["--ca", str(out / "server" / "ca.pem"), "--cert", str(out / "server" / "health.pem")])
    assert e.value.code == 2 and "--cert and --key go together" in capsys.readouterr().err
    assert healthcheck.main(["--ca", "/nonexistent/ca.pem"]) == 2
