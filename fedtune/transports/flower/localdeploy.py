"""A Flower deployment on localhost: one `flower-superlink` + N `flower-supernode` processes (ports picked
free) and `flwr run` against them — the commands of docs/flower.md's deployment section, for the
`flower_deploy` tests and simulations/bench/flower_deploy.py.

Each SuperNode runs in its own process group, so `kill(i)` (SIGKILL to the group) takes the node and the
ClientApp it may be running down at once, like a lost machine. TLS: pass `tls={"ca", "cert", "key"}` (e.g.
`fedtune certs` output); node authentication: `auth_keys=[private key path per node]` (OpenSSH ECDSA keys,
`ssh-keygen -t ecdsa -b 384`), registered with `flwr supernode register` before the nodes start.

Nothing outlives the federation: every process it starts runs in its own process group, and `stop()` ends those
groups plus every process carrying this federation's FLWR_HOME in its environment (flower-superlink starts
flower-superexec in a session of its own, which a group kill misses). `stop()` runs on `with` exit, at interpreter
exit (atexit) and on SIGTERM / SIGINT (a handler that stops every live federation, then lets the signal go on).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
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


_LIVE: weakref.WeakSet[LocalFederation] = weakref.WeakSet()
_HOOKED: list[bool] = []


def stop_all() -> None:
    for fed in list(_LIVE):
        fed.stop()


def _on_signal(signum: int, frame) -> None:
    stop_all()
    prev = _PREV.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)  # SIGINT: KeyboardInterrupt, as before
    else:  # the default action (end the process) with the signal's own exit status
        signal.signal(signum, signal.SIG_DFL if prev is None else prev)
        signal.raise_signal(signum)


_PREV: dict[int, Any] = {}


def _hook() -> None:
    """atexit and SIGTERM/SIGINT handlers, once per process (signal handlers only from the main thread)."""
    if _HOOKED:
        return
    _HOOKED.append(True)
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            prev = signal.getsignal(sig)
            if prev is not signal.SIG_IGN:
                _PREV[sig] = prev
                signal.signal(sig, _on_signal)


def marked(home: Path) -> list[int]:
    """Pids of this user's processes whose environment holds FLWR_HOME=`home` (Linux /proc)."""
    tag, out = f"FLWR_HOME={home}".encode() + b"\0", []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if tag in (d / "environ").read_bytes():
                    out.append(int(d.name))
            except OSError:  # gone, or another user's
                pass
    return out


def end_groups(pids: list[int], grace_s: float = 10.0, children: list[subprocess.Popen] = ()) -> None:
    """SIGTERM the process group of each pid (never this process's own), SIGKILL what is left after `grace_s`.
    `children`: this process's own among them, reaped while waiting (a zombie still counts as a group member)."""
    own = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            if os.getpgid(pid) != own:
                groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for g in list(groups):
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                groups.discard(g)
        deadline = time.monotonic() + wait
        while groups and time.monotonic() < deadline:
            time.sleep(0.1)
            for p in children:
                p.poll()
            for g in list(groups):
                try:
                    os.killpg(g, 0)
                except ProcessLookupError:
                    groups.discard(g)


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
        self.started: list[subprocess.Popen] = []  # every process spawned (flwr run and flwr register too)
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
        _hook()
        _LIVE.add(self)
        out = open(self.work / log, "ab")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                             start_new_session=True)
        self.started.append(p)
        return p

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
        """End every process of this federation: the groups it started and whatever carries its FLWR_HOME
        (collected before anything is killed: an orphan keeps its environment, not its parent)."""
        pids = [p.pid for p in self.started if p.poll() is None] + marked(self.home)
        end_groups(pids, children=self.started)
        end_groups(marked(self.home), grace_s=0.0)  # anything started meanwhile
        for p in self.started:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
