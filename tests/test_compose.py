"""docker-compose.yml end to end: certs → TLS coordinator → 3 edge clients → 3 FLoRA rounds, in containers.

Opt-in (`pytest -m compose`; the default addopts exclude it). Needs root, Debian packages (podman,
docker-compose v1, debootstrap; installed by compose-here.sh) and ~2 GB disk; takes a few minutes.
Runs scripts/compose_e2e.sh, which sets up, builds, runs, checks and tears down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compose_e2e.sh"
COMPOSE_HERE = Path(os.environ.get("COMPOSE_HERE", "/work/shared/recipes/compose-here.sh"))
ROUNDS, CLIENTS = 3, 3

pytestmark = pytest.mark.compose


def _skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (rootful podman)"
    if not COMPOSE_HERE.is_file():
        return f"compose-here.sh not found at {COMPOSE_HERE} (set COMPOSE_HERE)"
    if shutil.which("apt-get") is None and shutil.which("podman") is None:
        return "needs podman or a Debian host to install it"
    return None


@pytest.fixture(scope="module")
def e2e() -> subprocess.CompletedProcess:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = os.environ | {"COMPOSE_HERE": str(COMPOSE_HERE)}
    env.pop("E2E_KEEP", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)


def test_compose_e2e_script_passes(e2e):
    tail = (e2e.stdout[-4000:] + "\n--- stderr ---\n" + e2e.stderr[-6000:])
    assert e2e.returncode == 0, tail
    assert "E2E PASSED" in e2e.stderr, tail


def test_compose_metrics_three_rounds_all_clients(e2e):
    path = ROOT / "runs" / "compose-demo" / "metrics.jsonl"
    assert path.is_file(), e2e.stderr[-4000:]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "clients_completed" in r]  # round 0 = baseline eval only
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    assert all(r["clients_completed"] == CLIENTS for r in rows), rows
    assert all(r["clients_sampled"] == CLIENTS for r in rows), rows
    assert all(r["algorithm"].startswith("flora") for r in rows), rows
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows), rows


def test_compose_server_exited_zero(e2e):
    summary = (ROOT / "runs" / "compose-e2e.summary").read_text()
    assert "compose=0" in summary and "server=0" in summary, summary
