"""`fedtune init`: a federation kit, one directory per party, ready to start.

  DIR/ca/        ca.pem ca.key kit.toml   the CA key and the kit's settings: kept apart, never inside a kit
  DIR/server/    server.toml admin.toml ca.pem server.pem server.key tokens.toml revoked.toml health.pem health.key
  DIR/<org>/     client.toml ca.pem client.pem client.key token.toml

Every path in server.toml / client.toml is relative to that file's directory (fedtune.config resolves them), so
each directory can be copied anywhere. `--add-org` issues one more organisation with the kept CA (the others'
files are not touched); `--revoke` lists an organisation in server/revoked.toml, which the coordinator reads at
start: its token is dropped, so neither its token nor its certificate (whose CN names only it) is accepted.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedtune.transports.grpc.certs import (
    HEALTH_CN,
    _cert,
    _check_ids,
    _pem_pair,
    _san,
    _write,
    make_tokens,
    write_tokens_toml,
)

ORG_FILES = ("client.toml", "ca.pem", "client.pem", "client.key", "token.toml")


class KitError(ValueError):
    """A kit that cannot be written as asked (the message says why and what to do)."""


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KitError(f"--address must be HOST:PORT (the address the organisations dial), got {address!r}")
    return host.strip("[]"), int(port)


def _q(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ids(ids: Sequence[str]) -> str:
    return "[" + ", ".join(_q(c) for c in ids) + "]"


def server_toml(kit: dict, orgs: Sequence[str]) -> str:
    _, port = _host_port(kit["address"])
    return f"""# fedtune federation kit: the coordinator. Start it with
#   fedtune server --config server.toml          (paths below are relative to this file's directory)
# The organisations' own data never comes here: [data] below is only the policy they apply (max_seq_len,
# eval_fraction) and what the coordinator would evaluate on; evaluate = false, since it holds none of it.
# Written by `fedtune init`; `fedtune init DIR --add-org/--revoke` rewrite the roster lines (clients, num_clients).

[run]
name = {_q(kit["name"])}
seed = {kit["seed"]}
rounds = {kit["rounds"]}
algorithm = {_q(kit["algorithm"])}

[model]
name = {_q(kit["model"])}

[data]
source = "chatterbot"        # only sizes the roster here (evaluate = false); each organisation trains on its own files
max_seq_len = {kit["max_seq_len"]}

[federation]
num_clients = {len(orgs)}
min_clients = 1

[server]
address = "0.0.0.0:{port}"
clients = {_ids(orgs)}
tokens_file = "tokens.toml"
revoked_file = "revoked.toml"
admin_token_file = "admin.toml"   # fedtune status --config server.toml
# metrics_port = 9464             # Prometheus text of the same numbers (plain HTTP: keep it internal)
tls_cert = "server.pem"
tls_key = "server.key"
tls_client_ca = "ca.pem"     # mTLS: a token only counts with the certificate of its organisation
evaluate = false
"""


def client_toml(kit: dict, org: str) -> str:
    return f"""# fedtune federation kit: organisation {org}. Start it with
#   fedtune client --config client.toml --data /path/to/your.jsonl
# (paths below are relative to this file's directory: copy the directory anywhere). Only your data, your model
# path (--model) and how you hold it (--device/--dtype/--quantization) are yours to set; the rest is the
# coordinator's and must stay as written.

[run]
seed = {kit["seed"]}
algorithm = {_q(kit["algorithm"])}

[model]
name = {_q(kit["model"])}

[data]
source = "jsonl"             # your own files: give them with --data (or list them in paths)
paths = []
max_seq_len = {kit["max_seq_len"]}

[client]
server = {_q(kit["address"])}
client_id = {_q(org)}
token_file = "token.toml"
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client.key"
state_dir = "state"
"""


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as e:
        raise KitError(f"{e.filename} is missing: --add-org needs the kit's CA (DIR/ca/ from fedtune init)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError(f"{ca_dir / 'ca.key'}: not an EC key written by fedtune init")
    return cert, key


def _issue_client(org: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int):
    key = ec.generate_private_key(ec.SECP256R1())
    return _cert(org, key, ca.subject, ca_key, days, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]), key


def _write_org(out: Path, kit: dict, org: str, ca, ca_key, token: str) -> Path:
    d = out / org
    d.mkdir(mode=0o700)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    cert_pem, key_pem = _pem_pair(*_issue_client(org, ca, ca_key, kit["days"]))
    _write(d / "ca.pem", ca_pem, secret=False)
    _write(d / "client.pem", cert_pem, secret=False)
    _write(d / "client.key", key_pem, secret=True)
    write_tokens_toml(d / "token.toml", {org: token})
    _write(d / "client.toml", client_toml(kit, org).encode(), secret=False)
    return d


def _read_tokens(path: Path) -> dict[str, str]:
    raw = tomllib.loads(path.read_text())
    return dict(raw.get("tokens", raw))


def _read_revoked(path: Path) -> list[str]:
    return list(tomllib.loads(path.read_text()).get("revoked", [])) if path.is_file() else []


def _write_revoked(path: Path, ids: Sequence[str]) -> None:
    text = ("# organisations the coordinator refuses (fedtune init --revoke); read at its start\n"
            f"revoked = {_ids(sorted(ids))}\n")
    _write(path, text.encode(), secret=False)


def _set_roster(server_dir: Path, roster: Sequence[str]) -> None:
    """Rewrite the two roster lines of server.toml (the rest, perhaps edited by the operator, stays)."""
    p = server_dir / "server.toml"
    text = p.read_text()
    text, n1 = re.subn(r"(?m)^clients = \[.*\]$", f"clients = {_ids(roster)}", text)
    text, n2 = re.subn(r"(?m)^num_clients = \d+$", f"num_clients = {len(roster)}", text)
    if n1 != 1 or n2 != 1:
        raise KitError(f"{p}: expected one `clients = [...]` and one `num_clients = N` line to update; set them to "
                       f"{_ids(roster)} and {len(roster)} by hand")
    _write(p, text.encode(), secret=False)


def init_kit(out_dir: str | Path, orgs: Sequence[str], address: str, *, server_names: Sequence[str] = (),
             model: str = "tiny", algorithm: str = "", rounds: int = 3, seed: int = 0, max_seq_len: int = 256,
             name: str = "federation", days: int = 365) -> dict[str, Path]:
    """Write a new kit in `out_dir` (which must not hold one). Returns {"ca", "server", <org>: directory}."""
    from fedtune.transports.grpc.certs import _issue

    orgs = _check_ids(orgs)
    if not orgs:
        raise KitError("--orgs needs at least one organisation id")
    host, _ = _host_port(address)
    names = list(dict.fromkeys([host, *server_names]))
    for n in names:
        _san(n)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"{out} is not empty; use a new directory (or --add-org ORG to extend the kit there)")
    if not algorithm:
        from fedtune.algorithms.registry import default_method

        algorithm = default_method()
    kit = {"name": name, "address": address, "server_names": names, "model": model, "algorithm": algorithm,
           "rounds": rounds, "seed": seed, "max_seq_len": max_seq_len, "days": days}
    issued = _issue(names, [HEALTH_CN], days)
    ca, ca_key = issued["ca"]
    tokens = make_tokens(orgs)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {d: out / d for d in ("ca", "server")}
    for d in dirs.values():
        d.mkdir(mode=0o700)
    ca_pem, ca_key_pem = _pem_pair(ca, ca_key)
    _write(dirs["ca"] / "ca.pem", ca_pem, secret=False)
    _write(dirs["ca"] / "ca.key", ca_key_pem, secret=True)
    lines = [f"{k} = {_q(v) if isinstance(v, str) else (_ids(v) if isinstance(v, list) else v)}"
             for k, v in kit.items()]
    _write(dirs["ca"] / "kit.toml", ("# fedtune init settings (read by --add-org)\n" + "\n".join(lines) + "\n").encode(),
           secret=False)
    srv = dirs["server"]
    _write(srv / "ca.pem", ca_pem, secret=False)
    for stem, fname in (("server", "server"), (HEALTH_CN, "health")):
        cert_pem, key_pem = _pem_pair(*issued[stem])
        _write(srv / f"{fname}.pem", cert_pem, secret=False)
        _write(srv / f"{fname}.key", key_pem, secret=True)
    write_tokens_toml(srv / "tokens.toml", tokens)
    _write_revoked(srv / "revoked.toml", [])
    admin = secrets.token_urlsafe(32)  # the operator's credential for fedtune status (never a client's)
    _write(srv / "admin.toml", f'# fedtune status credential: secret\n[admin]\ntoken = "{admin}"\n'.encode(), secret=True)
    _write(srv / "server.toml", server_toml(kit, orgs).encode(), secret=False)
    for org in orgs:
        dirs[org] = _write_org(out, kit, org, ca, ca_key, tokens[org])
    return dirs


def _kit(out: Path) -> dict:
    p = out / "ca" / "kit.toml"
    if not p.is_file():
        raise KitError(f"{p} not found: {out} is not a kit written by fedtune init")
    return tomllib.loads(p.read_text())


def add_org(out_dir: str | Path, org: str) -> Path:
    """Issue one more organisation with the kit's CA: DIR/<org>/, its token in server/tokens.toml, the roster."""
    out = Path(out_dir)
    kit = _kit(out)
    [org] = _check_ids([org])
    srv = out / "server"
    tokens = _read_tokens(srv / "tokens.toml")
    if org in _read_revoked(srv / "revoked.toml"):
        raise KitError(f"{org} was revoked; a revoked id is not reissued: pick another id")
    if org in tokens or (out / org).exists():
        raise KitError(f"{org} is already in the kit ({out / org}); pick another id")
    ca, ca_key = _load_ca(out / "ca")
    token = make_tokens([org])[org]
    d = _write_org(out, kit, org, ca, ca_key, token)
    write_tokens_toml(srv / "tokens.toml", tokens | {org: token})
    roster = tomllib.loads((srv / "server.toml").read_text()).get("server", {}).get("clients", [])
    _set_roster(srv, [*roster, org])
    return d


def revoke_org(out_dir: str | Path, org: str) -> Path:
    """List `org` in server/revoked.toml and take it off the roster; returns revoked.toml."""
    out = Path(out_dir)
    _kit(out)
    srv = out / "server"
    if org not in _read_tokens(srv / "tokens.toml"):
        raise KitError(f"{org} is not an organisation of the kit in {out}")
    revoked = _read_revoked(srv / "revoked.toml")
    if org not in revoked:
        _write_revoked(srv / "revoked.toml", [*revoked, org])
    roster = tomllib.loads((srv / "server.toml").read_text()).get("server", {}).get("clients", [])
    if org in roster:
        _set_roster(srv, [c for c in roster if c != org])
    return srv / "revoked.toml"


def add_init_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("init", help="write a federation kit: DIR/server, DIR/<org> per organisation, DIR/ca")
    p.add_argument("dir", help="kit directory (new; or an existing kit with --add-org / --revoke)")
    p.add_argument("--orgs", help="comma-separated organisation ids (a new kit)")
    p.add_argument("--address", help="HOST:PORT the organisations dial (the server certificate names HOST)")
    p.add_argument("--server-names", default="", help="more DNS names / IPs for the server certificate")
    p.add_argument("--model", default="tiny", help='base model of the run ("tiny", "smollm2", an HF dir, a .gguf)')
    p.add_argument("--algorithm", default="", help="the method (fedtune.algorithms.available()); default: the "
                                                   "default method of a run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--days", type=int, default=365, help="certificate validity")
    p.add_argument("--add-org", help="add one organisation to an existing kit (the others are not touched)")
    p.add_argument("--revoke", help="revoke an organisation: the coordinator refuses it from its next start")
    return p


def init_main(args: argparse.Namespace) -> int:
    try:
        if args.add_org or args.revoke:
            if args.orgs or args.address:
                raise KitError("--add-org / --revoke change an existing kit; --orgs and --address make a new one")
            if args.add_org:
                d = add_org(args.dir, args.add_org)
                print(f"added {args.add_org}: give {d}/ to that organisation; restart the coordinator to let it in")
            if args.revoke:
                p = revoke_org(args.dir, args.revoke)
                print(f"revoked {args.revoke} in {p}: the coordinator refuses its token and certificate from its "
                      "next start")
            return 0
        if not args.orgs or not args.address:
            raise KitError("a new kit needs --orgs ORG,ORG and --address HOST:PORT")
        from fedtune.algorithms import available

        if args.algorithm and args.algorithm not in available():
            raise KitError(f"unknown --algorithm {args.algorithm!r}; one of {available()}")
        orgs = _split(args.orgs)
        init_kit(args.dir, orgs, args.address, server_names=_split(args.server_names), model=args.model,
                        algorithm=args.algorithm, rounds=args.rounds, days=args.days)
    except (ValueError, OSError) as e:
        print(f"fedtune init: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.dir)
    print(f"wrote kit {out}: ca/ (keep private), server/, " + ", ".join(f"{o}/" for o in orgs))
    print(f"  coordinator:  fedtune server --config {out / 'server' / 'server.toml'}")
    print(f"  organisation: copy {out}/<org>/ to it; there: fedtune client --config <org>/client.toml --data FILE")
    return 0


