"""A Flower deployment on localhost: one `flower-superlink` + N `flower-supernode` processes (ports picked
free) and `flwr run` against them — the commands of docs/flower.md's deployment section, for the
`flower_deploy` tests and simulations/bench/flower_deploy.py.

Each SuperNode runs in its own process group, so `kill(i)` (SIGKILL to the group) takes the node and the
ClientApp it may be running down at once, like a lost machine. TLS: pass `tls={"ca", "cert", "key"}` (e.g.
`fedtune certs` output); node authentication: `auth_keys=[private key path per node]` (OpenSSH ECDSA keys,
`ssh-keygen -t ecdsa -b 384`), registered with `flwr supernode register` before the nodes start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config(values: dict[str, Any]) -> str:
    """--node-config text: strings double-quoted (Flower parses the values as TOML)."""
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in values.items())


def run_config(values: dict[str, Any]) -> str:
    """--run-config text; strings in single quotes (TOML literal strings: no escapes, may hold double quotes)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"'{v}'" if isinstance(v, str) else repr(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())


class LocalFederation:
    def __init__(self, work: Path, nodes: list[dict[str, Any]], *, tls: dict[str, str] | None = None,
                 auth_keys: list[str] | None = None, bin_dir: Path | None = None) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.nodes, self.tls, self.auth_keys = nodes, tls, auth_keys
        self.bin = Path(bin_dir or Path(sys.executable).parent)
        self.port = free_port()
        self.home = self.work / "flwr-home"
        self.link: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self.env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                        PATH=os.pathsep.join([str(self.bin), os.environ.get("PATH", "")]))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _tls_server(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        return ["--ssl-certfile", self.tls["cert"], "--ssl-keyfile", self.tls["key"], "--ssl-ca-certfile", self.tls["ca"]]

    def _tls_client(self) -> list[str]:
        return ["--root-certificates", self.tls["ca"]] if self.tls else ["--insecure"]

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.work / log, "ab")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)

    def write_flower_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        conn = [f'address = "{self.address}"']
        conn.append(f'root-certificates = "{self.tls["ca"]}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text('[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                               + "\n".join(conn) + "\n")

    def start_superlink(self, timeout_s: float = 120.0) -> None:
        self.write_flower_config()
        args = [str(self.bin / "flower-superlink"), *self._tls_server(), "--host", "127.0.0.1",
                "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.auth_keys:
            args.append("--enable-supernode-auth")
        self.link = self._spawn(args, "superlink.log")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.link.poll() is not None:
                raise RuntimeError(f"flower-superlink exited {self.link.returncode}: "
                                   + (self.work / "superlink.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("flower-superlink did not open its port in time")

    def register(self, public_key: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "flwr"), "supernode", "register", public_key, "deploy"],
                              check=False, env=self.env, cwd=self.work, capture_output=True, text=True,
                              timeout=300)

    def start_supernode(self, i: int) -> subprocess.Popen:
        args = [str(self.bin / "flower-supernode"), *self._tls_client(), "--superlink", self.address,
                "--port", str(free_port()), "--node-config", node_config(self.nodes[i])]
        if self.auth_keys:
            args += ["--auth-supernode-private-key", self.auth_keys[i]]
        p = self._spawn(args, f"supernode-{i}.log")
        while len(self.supernodes) <= i:
            self.supernodes.append(None)
        self.supernodes[i] = p
        return p

    def start(self) -> LocalFederation:
        self.start_superlink()
        for i in range(len(self.nodes)):
            self.start_supernode(i)
        return self

    def flwr_run(self, app: Path, config: dict[str, Any], *, timeout_s: float = 1800) -> subprocess.Popen:
        """`flwr run APP deploy --stream --run-config …` (returns the running process; output in flwr-run.log)."""
        args = [str(self.bin / "flwr"), "run", str(app), "deploy", "--stream", "--run-config", run_config(config)]
        return self._spawn(args, "flwr-run.log")

    def kill(self, i: int) -> None:
        p = self.supernodes[i]
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        for p in [*self.supernodes, self.link]:
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            except ProcessLookupError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
