"""docker-compose.yml: static checks (default suite) and the end-to-end run from a fresh clone (opt-in).

The e2e tests (`pytest -m compose`; default addopts exclude them) run scripts/compose_e2e.sh: clone → the
commands of docs/deploy.md verbatim (docker → rootful podman via compose-here.sh) → per-organisation secrets checked inside each
container → one organisation SIGKILLed mid-run, survivors finish → server SIGKILLed, resumed with the documented
one-liner. Needs root, Debian packages (podman, docker-compose v1, debootstrap; installed by compose-here.sh),
~3 GB disk; ~10 min with a cached image, plus ~8 min for a cold build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compose_e2e.sh"
COMPOSE_HERE = Path(os.environ.get("COMPOSE_HERE", "/work/shared/recipes/compose-here.sh"))
ORGS = ["org-a", "org-b", "org-c"]


# ---- static: what each container is given -----------------------------------------------------------------

@pytest.fixture(scope="module")
def spec():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_each_organisation_mounts_only_its_own_certs(spec):
    for i, org in enumerate(ORGS):
        vols = spec[org]["volumes"]
        certs = [v for v in vols if v.startswith("./certs")]
        assert certs == [f"./certs/{org}:/certs:ro"], vols
        assert f"./state/{org}:/state" in vols
        assert spec[org]["command"][-4:] == ["--client-id", org, "--partition", str(i)]
    assert [v for v in spec["server"]["volumes"] if v.startswith("./certs")] == ["./certs/server:/certs:ro"]


def test_one_build_and_never_root(spec):
    assert [name for name, s in spec.items() if "build" in s] == ["certs"]
    assert {s["image"] for s in spec.values()} == {"localhost/fedtune:dev"}
    assert all(s["user"] == "${FEDTUNE_UID:-1000}:${FEDTUNE_GID:-1000}" for s in spec.values())
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 1000:1000$", dockerfile, re.MULTILINE)


def test_healthcheck_presents_the_health_cert_and_resume_switch(spec):
    test = spec["server"]["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "fedtune.transports.grpc.health"]
    assert all(" " not in a for a in test)  # podman 4.3's Docker API splits arguments at spaces
    assert test[test.index("--cert") + 1] == "/certs/health.pem"
    cmd = " ".join(spec["server"]["command"])
    assert "--resume" in cmd and "FEDTUNE_RESUME" in cmd
    assert spec["server"]["environment"]["FEDTUNE_RESUME"] == "${FEDTUNE_RESUME:-0}"


def test_e2e_script_runs_documented_commands_that_exist():
    readme = [line.split("  #")[0].strip() for line in (ROOT / "docs/deploy.md").read_text().splitlines()]
    cmds = re.findall(r'readme "([^"]+)"', SCRIPT.read_text())
    assert {"bash scripts/compose_prepare.sh", "docker compose build", "docker compose up -d",
            "FEDTUNE_RESUME=1 docker compose up -d", "docker compose down"} <= set(cmds)
    assert [c for c in cmds if c not in readme] == []


# ---- e2e (opt-in) ------------------------------------------------------------------------------------------

def _skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (rootful podman)"
    if not COMPOSE_HERE.is_file():
        return f"compose-here.sh not found at {COMPOSE_HERE} (set COMPOSE_HERE)"
    if shutil.which("apt-get") is None and shutil.which("podman") is None:
        return "needs podman or a Debian host to install it"
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                      check=False, capture_output=True, text=True).stdout.strip():
        pytest.fail("the e2e clones the committed state: commit (or stash) your changes first")
    return None


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # E2E_OUT: a fixed place for results and logs (pytest prunes old temp dirs, also while a long run goes on)
    out = Path(os.environ["E2E_OUT"]) if os.environ.get("E2E_OUT") else tmp_path_factory.mktemp("compose-e2e")
    env = os.environ | {"COMPOSE_HERE": str(COMPOSE_HERE), "E2E_OUT": str(out)}
    env.pop("E2E_KEEP", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600, check=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return proc, {r["check"]: r for r in rows}, (out / "summary.txt").read_text()


def _assert_checks(e2e, pattern: str, n: int):
    proc, checks, summary = e2e
    hits = {k: v for k, v in checks.items() if re.search(pattern, k)}
    assert len(hits) == n, (sorted(checks), summary, proc.stderr[-3000:])
    bad = {k: v["detail"] for k, v in hits.items() if not v["ok"]}
    assert not bad, (bad, summary)


@pytest.mark.compose
def test_compose_each_container_holds_only_its_secrets(e2e):
    _assert_checks(e2e, r"^org-.( sees only| token file|: no other)|^server holds", 3 * 3 + 1)


@pytest.mark.compose
def test_compose_containers_never_root_and_certs_read_only(e2e):
    _assert_checks(e2e, r"runs as|non-root|read-only", 1 + 3 + 3 + 1)


@pytest.mark.compose
def test_compose_run_completes_with_survivors(e2e):
    _assert_checks(e2e, r"^phase 1", 3)


@pytest.mark.compose
def test_compose_sigkilled_server_resumes_with_readme_one_liner(e2e):
    _assert_checks(e2e, r"^phase 2|clients alive", 5)


@pytest.mark.compose
def test_compose_outputs_owned_by_host_user_and_0644(e2e):
    _assert_checks(e2e, r"^outputs owned|^exported files", 2)


@pytest.mark.compose
def test_compose_script_passes(e2e):
    proc, checks, summary = e2e
    assert proc.returncode == 0 and "E2E PASSED" in proc.stderr, (summary, proc.stderr[-4000:])
    assert not [k for k in checks if k.startswith("docs have")], summary


def test_prepare_makes_dirs_and_env_for_a_non_root_uid(tmp_path):
    """scripts/compose_prepare.sh without the download (wheels up to date): dirs, modes, owner, .env."""
    for f in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "compose_prepare.sh", tmp_path / "scripts")
    (tmp_path / "wheels").mkdir()
    stamp = subprocess.run("cat pyproject.toml constraints.txt | sha256sum | cut -c1-16", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "wheels" / ".stamp").write_text(f"{stamp}-torch==2.13.0+cpu-\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDTUNE_")}
    for _ in range(2):  # idempotent
        r = subprocess.run(["bash", "scripts/compose_prepare.sh"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, check=False)
        assert r.returncode == 0, r.stderr
    assert "wheels up to date" in r.stderr
    uid, gid = (1000, 1000) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    assert (tmp_path / ".env").read_text() == f"FEDTUNE_UID={uid}\nFEDTUNE_GID={gid}\n"
    for d in ["runs", "certs/server", *(f"certs/{o}" for o in ORGS), *(f"state/{o}" for o in ORGS)]:
        st = (tmp_path / d).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), d
    assert all(((tmp_path / "certs" / d).stat().st_mode & 0o777) == 0o700 for d in ["server", *ORGS])
