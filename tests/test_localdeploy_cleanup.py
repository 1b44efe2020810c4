"""The local Flower deployment helper leaves no process behind, even when its process is ended by SIGTERM (a
pytest timeout). Fake `flower-superlink` / `flower-supernode` executables stand in for Flower's (fast, no
Flower needed): the superlink opens its port and, like the real one starting flower-superexec, spawns a child
in a session of its own; each supernode spawns a child in its group, like a flwr-clientapp."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedtune.transports.flower.localdeploy import marked

ROOT = Path(__file__).resolve().parents[1]

SUPERLINK = """\
import socket, subprocess, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)  # superexec
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port))
s.listen()
time.sleep(600)
"""
SUPERNODE = """\
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a ClientApp, same group
time.sleep(600)
"""
DRIVER = """\
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground pytest (a background job ignores it)
from fedtune.transports.flower.localdeploy import LocalFederation
fed = LocalFederation(Path(sys.argv[1]), [{{"partition-id": 0}}, {{"partition-id": 1}}], bin_dir=Path(sys.argv[2]))
fed.start()
print("ready", flush=True)
time.sleep(600)
"""


def _fake_bin(d: Path) -> Path:
    d.mkdir()
    for name, body in (("flower-superlink", SUPERLINK), ("flower-supernode", SUPERNODE)):
        f = d / name
        f.write_text(f"#!{sys.executable}\n" + body)
        f.chmod(0o755)
    return d


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_local_deployment_leaves_no_process(tmp_path, sig):
    work, bins = tmp_path / "fed", _fake_bin(tmp_path / "bin")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    drv = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER.format()), str(work), str(bins)],
                           stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert drv.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while len(marked(work / "flwr-home")) < 6 and time.monotonic() < deadline:  # link, superexec, 2 × (node, app)
            time.sleep(0.1)
        pids = marked(work / "flwr-home")
        assert len(pids) == 6
        groups = {os.getpgid(p) for p in pids}
        assert len(groups) == 4 and os.getpgrp() not in groups  # superexec in a session of its own
        drv.send_signal(sig)
        rc = drv.wait(timeout=60)
        assert rc != 0  # the signal still ends the process
        left = [p for p in pids if _alive(p)]
        assert not left and not marked(work / "flwr-home")
    finally:
        if drv.poll() is None:
            drv.kill()
        for p in marked(work / "flwr-home"):  # only this test's fake processes carry this FLWR_HOME
            os.kill(p, signal.SIGKILL)
