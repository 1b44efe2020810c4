"""Flower's deployment runtime for real (opt-in: `pytest -m flower_deploy`): a flower-superlink and
flower-supernode processes on localhost (ports picked free), each SuperNode with its own JSONL file and
state dir, `flwr run` of simulations/flower_app. Minutes each on a busy 2-CPU machine: flwr 1.41 starts a
fresh ClientApp process (torch import, model, data) for every message."""

import json
import time
from pathlib import Path

import pytest
from conftest import max_abs
from safetensors.torch import load_file

from fedtune import config
from fedtune.data import load_chatterbot, partition
from fedtune.transports.flower.localdeploy import LocalFederation

pytestmark = pytest.mark.flower_deploy

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "simulations/flower_app"
ORGS = ["org-a", "org-b", "org-c"]


def _org_files(tmp: Path) -> list[str]:
    """Three organisations' own files: the chatterbot demo split by category, 40 examples each."""
    shards = partition(load_chatterbot(), 3, method="by_category", seed=0)
    paths = []
    for org, shard in zip(ORGS, shards, strict=True):
        p = tmp / f"{org}.jsonl"
        p.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response, "category": e.category}) + "\n"
                             for e in shard[:40]))
        paths.append(str(p))
    return paths


def _setup(tmp: Path, **extra):
    paths = _org_files(tmp)
    nodes = [{"data": p, "client-name": org, "state-dir": str(tmp / "state" / org)} for p, org in zip(paths, ORGS)]
    run_cfg = {"fedtune.run.out": str(tmp / "flower"), "fedtune.run.rounds": 3, "fedtune.run.threads": 1,
               "fedtune.data.source": "jsonl", "fedtune.data.paths": json.dumps(paths),
               "fedtune.flower.clients": json.dumps(ORGS), "fedtune.federation.round_timeout_s": 900.0,
               "fedtune.data.test_fraction": 0.0,  # simulate's global test split is drawn from all files together
               **extra}
    over = {k[len("fedtune."):]: json.loads(v) if isinstance(v, str) and v.startswith("[") else v
            for k, v in run_cfg.items()}
    return nodes, run_cfg, over


def _wait(proc, fed: LocalFederation, timeout_s: float = 2400) -> str:
    proc.wait(timeout=timeout_s)
    return (fed.work / "flwr-run.log").read_text()


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_deployment_with_own_data_per_node_equals_fedtune_simulate(tmp_path):
    from fedtune.run.assemble import simulate

    nodes, run_cfg, over = _setup(tmp_path)
    t0 = time.perf_counter()
    with LocalFederation(tmp_path / "fed", nodes) as fed:
        log = _wait(fed.flwr_run(APP, run_cfg), fed)
    wall = time.perf_counter() - t0
    summary = json.loads((tmp_path / "flower/summary.json").read_text())
    assert summary["status"] == "completed", log[-3000:]
    assert summary["rounds_completed"] == 3 and summary["flower"]["resyncs"] == 0  # node state on disk: deltas only
    over.pop("flower.clients")
    ref = config.load(APP / "fedtune.toml", {**over, "run.algorithm": "flora", "model.name": "tiny",
                                            "federation.batch_clients": False, "run.out": str(tmp_path / "native")})
    simulate(ref, progress=False, roster=ORGS)
    a = load_file(str(tmp_path / "native/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flower/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(a[k].abs().max().item() for k in a) > 0
    assert max(max_abs(a[k], b[k]) for k in a) <= 1e-6
    rn, rf = _rows(tmp_path / "native"), _rows(tmp_path / "flower")
    assert [r["bytes_down"] for r in rf[1:]] == [r["bytes_down"] for r in rn[1:]]
    print(f"\ndeployment: {wall:.0f} s; wall per round {[r['wall_s'] for r in rf[1:]]}; "
          f"bytes down {[r['bytes_down'] for r in rf[1:]]}")


def test_a_killed_supernode_fails_its_client_and_the_run_completes_with_the_survivors(tmp_path):
    nodes, run_cfg, _ = _setup(tmp_path, **{"fedtune.federation.min_clients": 2})
    out = tmp_path / "flower"
    with LocalFederation(tmp_path / "fed", nodes) as fed:
        proc = fed.flwr_run(APP, run_cfg)
        deadline = time.monotonic() + 1800
        while not ((out / "metrics.jsonl").is_file() and len(_rows(out)) >= 2):  # round 1 done
            assert proc.poll() is None and time.monotonic() < deadline, (fed.work / "flwr-run.log").read_text()[-3000:]
            time.sleep(1)
        fed.kill(2)  # SIGKILL to org-c's SuperNode and whatever ClientApp it runs
        t_kill = time.monotonic()
        log = _wait(proc, fed)
        after = time.monotonic() - t_kill
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", log[-3000:]
    rows = _rows(out)
    assert [(r["round"], r["clients_completed"], r["clients_failed"]) for r in rows[1:]] == [
        (1, 3, []), (2, 2, ["org-c"]), (3, 2, ["org-c"])]
    reasons = [r["failed"].get("org-c", "") for r in summary["flower"]["rounds"][1:]]
    assert "Node Unavailable" in reasons[0] or "offline" in reasons[0]
    assert reasons[1] == "its Flower node is offline"  # no message, no wait
    assert (out / "adapter/adapter_model.safetensors").is_file()
    print(f"\nafter the kill: {after:.0f} s to finish rounds 2-3; failures {reasons}")


def _ssh_ecdsa_key(path: Path) -> tuple[str, str]:
    """An OpenSSH ECDSA P-384 key pair, as `ssh-keygen -t ecdsa -b 384 -N '' -f path` makes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub = path.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return str(path), str(pub)


def test_tls_and_supernode_authentication(tmp_path):
    """SuperLink with TLS (`fedtune certs` CA + server cert) and --enable-supernode-auth: the two registered
    SuperNodes (own keys, --root-certificates) train a round; an unregistered third node is refused."""
    from fedtune.transports.grpc.certs import make_dev_certs

    certs = make_dev_certs(tmp_path / "certs")
    tls = {"ca": str(certs["ca"]), "cert": str(certs["server"]), "key": str(certs["server_key"])}
    nodes, run_cfg, _ = _setup(tmp_path, **{"fedtune.run.rounds": 1, "fedtune.run.algorithm": "fedavg",
                                            "fedtune.federation.num_clients": 2, "fedtune.federation.min_clients": 2})
    run_cfg["fedtune.data.paths"] = json.dumps(json.loads(run_cfg["fedtune.data.paths"])[:2])
    run_cfg["fedtune.flower.clients"] = json.dumps(ORGS[:2])
    keys = [_ssh_ecdsa_key(tmp_path / f"{org}.key") for org in ORGS]
    fed = LocalFederation(tmp_path / "fed", nodes, tls=tls, auth_keys=[k for k, _ in keys])
    try:
        fed.start_superlink()
        for _, pub in keys[:2]:
            reg = fed.register(pub)
            assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
        for i in range(3):
            fed.start_supernode(i)
        log = _wait(fed.flwr_run(APP, run_cfg), fed)
        refused = fed.work / "supernode-2.log"
        deadline = time.monotonic() + 300  # the unregistered node retries for a while, then gives up
        while "Failed to activate SuperNode" not in refused.read_text() and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        fed.stop()
    summary = json.loads((tmp_path / "flower/summary.json").read_text())
    assert summary["status"] == "completed", log[-3000:]
    assert sorted(summary["flower"]["node_of"]) == ORGS[:2] and summary["rounds_completed"] == 1
    assert "Failed to activate SuperNode" in refused.read_text()  # flower-supernode exit code 305
