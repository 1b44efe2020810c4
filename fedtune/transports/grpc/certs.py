"""Development PKI for `fedtune certs`: a CA, a server cert, one client cert and token per organisation.

`fedtune certs --out OUT` writes one directory per party, each holding only that party's secrets:
  OUT/server/  ca.pem  server.pem server.key  tokens.toml (every client's token)  health.pem health.key
  OUT/<org>/   ca.pem  client.pem client.key  token.toml (this org's token only)
health.pem/.key is a client certificate (CN "healthcheck") for the server's own health probe under mTLS.
Keys are ECDSA P-256, written with mode 0600 in 0700 directories; the CA key is not kept. For development and
compose only: a production deployment should use its own PKI. `make_dev_certs` writes the flat layout (tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = {"ca", "server", "tokens", "healthcheck"}


def check_client_id(cid: str) -> str:
    if not CLIENT_ID.match(cid) or cid.lower() in RESERVED:
        raise ValueError(
            f"invalid client id {cid!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric, not {sorted(RESERVED)}"
        )
    return cid


def _write(path: Path, data: bytes, secret: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        if secret:
            os.fchmod(f.fileno(), 0o600)  # also when the file existed with wider permissions
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune dev"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
    usage: Sequence = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _issue(
    server_names: Sequence[str], clients: Sequence[str], days: int
) -> dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]:
    """{"ca", "server", *clients: (cert, key)}; clients get CN = id and clientAuth only."""
    if not server_names:
        raise ValueError("need at least one server name")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fedtune dev CA", ca_key, _name("fedtune dev CA"), ca_key, days, ca=True)
    issued = {"ca": (ca, ca_key)}
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [_san(n) for n in server_names]
    issued["server"] = (
        _cert(server_names[0], key, ca.subject, ca_key, days, sans=sans, usage=[ExtendedKeyUsageOID.SERVER_AUTH]),
        key,
    )
    for cid in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        issued[cid] = (_cert(cid, key, ca.subject, ca_key, days, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]), key)
    return issued


def _pem_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())


def _check_ids(clients: Sequence[str]) -> list[str]:
    clients = [check_client_id(c) for c in clients]
    if len(set(clients)) != len(clients):
        raise ValueError(f"duplicate client ids in {clients}")
    return clients


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use overwrite=True / --force)")


def make_dev_certs(
    out_dir: str | os.PathLike,
    server_names: Sequence[str] = ("localhost", "server", "127.0.0.1"),
    clients: Sequence[str] = (),
    *,
    days: int = 365,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Flat layout in one directory: a dev CA, a server cert (SANs: DNS names and IPs) and a client cert per
    client id (CN = client id). The CA key is discarded. Returns {"ca", "server", "server_key", "<client>",
    "<client>_key": path}. For tests and single-machine setups; deployments use `make_deployment`."""
    clients = _check_ids(clients)
    out = Path(out_dir)
    stems = ["ca", "server", *clients]
    files = {s: out / f"{s}.pem" for s in stems} | {f"{s}_key": out / f"{s}.key" for s in stems[1:]}
    _refuse_existing(list(files.values()), overwrite)
    issued = _issue(server_names, clients, days)
    out.mkdir(parents=True, exist_ok=True)
    for stem, (cert, key) in issued.items():
        cert_pem, key_pem = _pem_pair(cert, key)
        _write(files[stem], cert_pem, secret=False)
        if stem != "ca":
            _write(files[f"{stem}_key"], key_pem, secret=True)
    return files


HEALTH_CN = "healthcheck"


def make_deployment(
    out_dir: str | os.PathLike,
    server_names: Sequence[str] = ("localhost", "server", "127.0.0.1"),
    clients: Sequence[str] = (),
    *,
    days: int = 365,
    overwrite: bool = False,
) -> dict[str, Path]:
    """One directory per party (see the module docstring), so each organisation is handed only its own:
    OUT/server (server cert/key, all tokens, a health-probe client cert) and OUT/<client> (its cert/key, its
    token, the CA). Returns {"server": dir, "<client>": dir}."""
    clients = _check_ids(clients)
    out = Path(out_dir)
    names = {"server": ["ca.pem", "server.pem", "server.key", "tokens.toml", "health.pem", "health.key"]}
    names |= {c: ["ca.pem", "client.pem", "client.key", "token.toml"] for c in clients}
    _refuse_existing([out / d / n for d, ns in names.items() for n in ns], overwrite)
    issued = _issue(server_names, [*clients, HEALTH_CN], days)
    tokens = make_tokens(clients)
    ca_pem = issued["ca"][0].public_bytes(serialization.Encoding.PEM)
    dirs = {d: out / d for d in names}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)  # secrets inside; the party's own user reads them
        _write(d / "ca.pem", ca_pem, secret=False)
    srv = dirs["server"]
    for stem, cert_name in (("server", "server"), (HEALTH_CN, "health")):
        cert_pem, key_pem = _pem_pair(*issued[stem])
        _write(srv / f"{cert_name}.pem", cert_pem, secret=False)
        _write(srv / f"{cert_name}.key", key_pem, secret=True)
    write_tokens_toml(srv / "tokens.toml", tokens)
    for c in clients:
        cert_pem, key_pem = _pem_pair(*issued[c])
        _write(dirs[c] / "client.pem", cert_pem, secret=False)
        _write(dirs[c] / "client.key", key_pem, secret=True)
        write_tokens_toml(dirs[c] / "token.toml", {c: tokens[c]})
    return dirs


def make_tokens(clients: Sequence[str]) -> dict[str, str]:
    """A fresh random token per client (`secrets.token_urlsafe(32)`)."""
    return {check_client_id(c): secrets.token_urlsafe(32) for c in clients}


def write_tokens_toml(path: str | os.PathLike, tokens: Mapping[str, str]) -> Path:
    """tokens.toml (mode 0600): a `[tokens]` table client_id = token. The server reads all of
    them; give each client only its own."""
    lines = ["# fedtune client tokens: secret. The server needs all; each client only its own.", "[tokens]"]
    lines += [f'"{check_client_id(c)}" = "{t}"' for c, t in sorted(tokens.items())]
    p = Path(path)
    _write(p, ("\n".join(lines) + "\n").encode(), secret=True)
    return p


def certs_parser() -> argparse.ArgumentParser:
    """The arguments of `fedtune certs`."""
    ap = argparse.ArgumentParser(
        prog="fedtune certs",
        description="Make a dev CA and one directory per party: OUT/server (server cert/key, all tokens, health "
        "cert) and OUT/<client> (its cert/key, its token, the CA). Hand each organisation only its directory.",
    )
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--clients", default="", help="comma-separated client ids (one directory, cert and token each)")
    ap.add_argument("--server-names", default="localhost,server,127.0.0.1", help="comma-separated DNS names / IPs")
    ap.add_argument("--days", type=int, default=365, help="validity in days")
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    return ap


def certs_main(argv: Sequence[str] | None = None) -> int:
    """`fedtune certs --out certs/ --clients org-a,org-b [--server-names ...] [--days N] [--force]`."""
    args = certs_parser().parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    clients, names = split(args.clients), split(args.server_names)
    try:
        dirs = make_deployment(args.out, names, clients, days=args.days, overwrite=args.force)
    except (ValueError, OSError) as e:
        print(f"fedtune certs: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: server/ ({', '.join(names)}; all tokens; health cert) and one directory per client: "
          + (", ".join(f"{c}/" for c in clients) or "none"))
    print(f"give {dirs['server']} to the coordinator and {Path(args.out) / '<client>'} to each organisation only")
    return 0
