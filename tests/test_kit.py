"""`fedtune init`: a federation kit, copied into each organisation's own directory, run over mTLS to completion;
the CA key kept apart; an address the certificate does not name fails fast; revocation; an organisation added
later joins the next run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from test_grpc import _free_port

from fedtune import config
from fedtune.cli import main
from fedtune.transports.grpc.kit import KitError, add_org, init_kit, revoke_org

# fast timings for the test (appended to the kit's [server], the file's last section)
FAST = "heartbeat_interval_s = 0.5\npoll_interval_s = 0.2\nfinish_grace_s = 5\nlease_timeout_s = 60\n"


def _jsonl(path: Path, org: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{org} question {i}", "response": f"{org} answer {i}"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def _copy_org(kit: Path, org: str, home: Path, n: int) -> Path:
    """The organisation's own machine: its kit directory copied into its own HOME, its own data."""
    home.mkdir()
    shutil.copytree(kit / org, home / org)
    _jsonl(home / "mine.jsonl", org, n)
    return home


def _fedtune(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, HOME=str(cwd), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, env=env, text=True,
                                stdout=f, stderr=subprocess.STDOUT)


def _client(home: Path, org: str) -> subprocess.Popen:
    return _fedtune("client", "--config", f"{org}/client.toml", "--data", "mine.jsonl", cwd=home, log=home / "client.log")


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_kit_holds_each_partys_files_and_nothing_else(tmp_path):
    dirs = init_kit(tmp_path / "kit", ["org-a", "org-b"], "fed.example.org:50051", server_names=["10.0.0.5"])
    kit = tmp_path / "kit"
    assert sorted(p.name for p in kit.iterdir()) == ["ca", "org-a", "org-b", "server"]
    assert sorted(p.name for p in (kit / "org-a").iterdir()) == ["ca.pem", "client.key", "client.pem", "client.toml",
                                                                  "token.toml"]
    assert (kit / "ca" / "ca.key").is_file() and not list(kit.glob("[!c]*/ca.key")) and not list(kit.glob("org-*/ca.key"))
    assert (kit / "org-a" / "client.key").stat().st_mode & 0o777 == 0o600
    tokens = tomllib.loads((kit / "server" / "tokens.toml").read_text())["tokens"]
    own = tomllib.loads((kit / "org-a" / "token.toml").read_text())["tokens"]
    assert own == {"org-a": tokens["org-a"]} and tokens["org-a"] != tokens["org-b"]
    # the organisation's directory works wherever it is copied: its paths resolve against client.toml
    moved = tmp_path / "elsewhere" / "org-a"
    shutil.copytree(dirs["org-a"], moved)
    data = _jsonl(tmp_path / "mine.jsonl", "org-a", 5)
    cfg = config.load(moved / "client.toml", {"data.paths": [str(data)]})
    c = cfg.section("client", config.ClientSection)
    assert (c.tls_ca, c.token_file, c.state_dir) == (str(moved / "ca.pem"), str(moved / "token.toml"),
                                                   str(moved / "state"))
    assert (c.server, c.client_id) == ("fed.example.org:50051", "org-a")
    srv = config.load(kit / "server" / "server.toml")
    s = srv.section("server", config.ServerSection)
    assert s.clients == ["org-a", "org-b"] and srv.federation.num_clients == 2 and s.address == "0.0.0.0:50051"
    assert s.tls_client_ca == str(kit / "server" / "ca.pem")
    with pytest.raises(KitError, match="not empty"):
        init_kit(kit, ["org-c"], "fed.example.org:50051")


def test_add_org_leaves_the_others_alone_and_revoke_takes_one_off(tmp_path):
    kit = tmp_path / "kit"
    init_kit(kit, ["org-a", "org-b"], "127.0.0.1:50051")
    before = {p: p.read_bytes() for p in (kit / "org-a").iterdir()}
    add_org(kit, "org-c")
    assert {p: p.read_bytes() for p in (kit / "org-a").iterdir()} == before
    tokens = tomllib.loads((kit / "server" / "tokens.toml").read_text())["tokens"]
    assert sorted(tokens) == ["org-a", "org-b", "org-c"]
    assert config.load(kit / "server" / "server.toml").section("server", config.ServerSection).clients == \
        ["org-a", "org-b", "org-c"]
    # org-c's certificate is signed by the kit's one CA
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((kit / "ca" / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate((kit / "org-c" / "client.pem").read_bytes()).verify_directly_issued_by(ca)
    with pytest.raises(KitError, match="already in the kit"):
        add_org(kit, "org-c")
    revoke_org(kit, "org-b")
    srv = config.load(kit / "server" / "server.toml")
    assert srv.section("server", config.ServerSection).clients == ["org-a", "org-c"]
    assert srv.federation.num_clients == 2
    assert tomllib.loads((kit / "server" / "revoked.toml").read_text())["revoked"] == ["org-b"]
    with pytest.raises(KitError, match="was revoked"):
        add_org(kit, "org-b")


def test_a_roster_naming_a_revoked_org_does_not_start(tmp_path, capsys):
    kit = tmp_path / "kit"
    init_kit(kit, ["org-a", "org-b"], "127.0.0.1:50051")
    (kit / "server" / "revoked.toml").write_text('revoked = ["org-b"]\n')  # revoked by hand, roster left as it was
    assert main(["server", "--config", str(kit / "server" / "server.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "[server] clients lists ['org-b'], revoked in" in capsys.readouterr().err


def test_init_cli_errors(tmp_path, capsys):
    assert main(["init", str(tmp_path / "k"), "--orgs", "org-a"]) == 2
    assert "needs --orgs ORG,ORG and --address HOST:PORT" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "k"), "--orgs", "org-a", "--address", "nohost"]) == 2
    assert "--address must be HOST:PORT" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "k"), "--orgs", "org-a", "--address", "h:1", "--algorithm", "nope"]) == 2
    assert "unknown --algorithm 'nope'" in capsys.readouterr().err


def test_two_organisations_from_a_kit_run_to_completion(tmp_path, capsys):
    """init on localhost; org-a (30 examples) and org-b (60) each in their own HOME; org-c revoked before the
    start is refused; a kit dialling a name its certificate does not hold exits in seconds naming the cause;
    then org-d is added and joins the next run."""
    port = _free_port()
    kit = tmp_path / "kit"
    assert main(["init", str(kit), "--orgs", "org-a,org-b,org-c", "--address", f"127.0.0.1:{port}", "--rounds", "2"]) == 0
    assert main(["init", str(kit), "--revoke", "org-c"]) == 0
    server_toml = kit / "server" / "server.toml"
    server_toml.write_text(server_toml.read_text() + FAST)
    homes = {org: _copy_org(kit, org, tmp_path / f"home-{org}", n) for org, n in (("org-a", 30), ("org-b", 60),
                                                                                    ("org-c", 10))}
    wrong = tmp_path / "home-wrong"  # org-a's kit, but dialling "localhost": the certificate names 127.0.0.1 only
    _copy_org(kit, "org-a", wrong, 5)
    ct = wrong / "org-a" / "client.toml"
    ct.write_text(ct.read_text().replace(f'"127.0.0.1:{port}"', f'"localhost:{port}"'))
    srv = _fedtune("server", "--config", str(server_toml), "--out", str(tmp_path / "run1"), "--no-progress",
                   cwd=tmp_path, log=tmp_path / "server.log")
    procs = {org: _client(homes[org], org) for org in ("org-a", "org-b")}
    bad = None
    status = ["status", "--config", str(server_toml), "--address", f"127.0.0.1:{port}", "--json"]
    try:
        deadline, st, seen, t_bad = time.monotonic() + 180, None, False, None
        while time.monotonic() < deadline and not (seen and t_bad):
            if bad is not None and t_bad is None and bad.poll() is not None:
                t_bad = time.monotonic()
            capsys.readouterr()
            if not seen and main(status) == 0:  # the operator's view while the run is live: both organisations
                if bad is None:  # the coordinator is up: now a kit that dials a name its certificate lacks, and
                    t0, bad = time.monotonic(), _client(wrong, "org-a")  # the revoked org (no backoff race)
                    procs["org-c"] = _client(homes["org-c"], "org-c")
                st = json.loads(capsys.readouterr().out)
                seen = all(st["clients"][o]["declared_examples"] for o in ("org-a", "org-b"))
            time.sleep(0.5)
        assert t_bad is not None and t_bad - t0 < 30  # the name mismatch ended that client within seconds
        assert st is not None and sorted(st["clients"]) == ["org-a", "org-b"], st
        assert {o: st["clients"][o]["declared_examples"] for o in ("org-a", "org-b")} == {"org-a": 27, "org-b": 54}
        assert st["rounds_total"] == 2 and st["algorithm"] == "flora"
        # a client's token is not the admin credential
        fake = tmp_path / "fake-admin.toml"
        fake.write_text(f'[admin]\ntoken = "{tomllib.loads((kit / "org-a" / "token.toml").read_text())["tokens"]["org-a"]}"\n')
        other = tmp_path / "other-server.toml"
        other.write_text(server_toml.read_text().replace('admin_token_file = "admin.toml"', f'admin_token_file = "{fake}"')
                         .replace('"tokens.toml"', f'"{kit}/server/tokens.toml"').replace('"revoked.toml"', f'"{kit}/server/revoked.toml"')
                         .replace('"server.pem"', f'"{kit}/server/server.pem"').replace('"server.key"', f'"{kit}/server/server.key"')
                         .replace('"ca.pem"', f'"{kit}/server/ca.pem"'))
        capsys.readouterr()
        assert main(["status", "--config", str(other), "--address", f"127.0.0.1:{port}"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert bad.wait(timeout=60) == 3
        assert "Hostname Verification Check failed" in (wrong / "client.log").read_text()
        assert procs["org-c"].wait(timeout=120) == 3
        assert "UNAUTHENTICATED" in (homes["org-c"] / "client.log").read_text()
        assert srv.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()
        for org in ("org-a", "org-b"):
            assert procs[org].wait(timeout=60) == 0, (homes[org] / "client.log").read_text()
    finally:
        _stop(srv, *([bad] if bad else []), *procs.values())
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    # each organisation's own examples: 30 and 60 lines, less the 10 % eval hold-out
    assert summary["clients"] == {"org-a": {"train_examples": 27, "source": "declared by the client at Join"},
                                  "org-b": {"train_examples": 54, "source": "declared by the client at Join"}}
    assert summary["rounds_completed"] == 2

    assert main(["init", str(kit), "--add-org", "org-d"]) == 0
    homes["org-d"] = _copy_org(kit, "org-d", tmp_path / "home-org-d", 20)
    srv = _fedtune("server", "--config", str(server_toml), "--out", str(tmp_path / "run2"), "--no-progress",
                   cwd=tmp_path, log=tmp_path / "server2.log")
    procs = {org: _client(homes[org], org) for org in ("org-a", "org-b", "org-d")}
    try:
        assert srv.wait(timeout=240) == 0, (tmp_path / "server2.log").read_text()
        for org, p in procs.items():
            assert p.wait(timeout=60) == 0, (homes[org] / "client.log").read_text()
    finally:
        _stop(srv, *procs.values())
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert {c: v["train_examples"] for c, v in summary["clients"].items()} == {"org-a": 27, "org-b": 54, "org-d": 18}
