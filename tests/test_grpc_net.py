"""The coordinator against faulty and hostile clients at the network / identity level, on real processes on
127.0.0.1: clean end and bounded retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_grpc import IDS, _free_port, write_run

from fedtune.cli import main

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _fixed_port(cfg_path: Path, port: int, **replace: str) -> None:
    text = cfg_path.read_text().replace('address = "127.0.0.1:0"', f'address = "127.0.0.1:{port}"')
    for old, new in replace.items():
        text = text.replace(old, new)
    cfg_path.write_text(text)


def _fedtune(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], env=ENV, text=True, **kw)


def test_clients_exit_0_promptly_after_the_finish(tmp_path):
    """0.5 s heartbeat, 1 s poll: every client hears the finish (FINISHED pull or heartbeat reply) and exits 0
    within a few seconds of the server; the server drains until all three were told, not for the whole grace."""
    port = _free_port()
    cfg_path = write_run(tmp_path, rounds=1, extra=f'[client]\ntoken_file = "{tmp_path}/tokens.toml"\n'
                                                   "max_backoff_s = 1.0\nrpc_timeout_s = 20\n")
    _fixed_port(cfg_path, port, **{"heartbeat_interval_s = 0.2": "heartbeat_interval_s = 0.5",
                                   "poll_interval_s = 0.05": "poll_interval_s = 1.0",
                                   "finish_grace_s = 3.0": "finish_grace_s = 30.0\nevaluate = false"})
    srv = _fedtune("server", "--config", str(cfg_path), "--no-progress", stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    clients = [_fedtune("client", "--config", str(cfg_path), "--server", f"127.0.0.1:{port}", "--client-id", cid,
                        "--partition", str(i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for i, cid in enumerate(IDS)]
    try:
        out, _ = srv.communicate(timeout=120)
        t_server = time.monotonic()
        assert srv.returncode == 0, out
        for c in clients:
            c.wait(timeout=10)
            err = c.stderr.read()
            assert c.returncode == 0, err
            assert "run finished" in err
        assert time.monotonic() - t_server < 5.0  # all three within a few seconds of the server's exit
        assert "not told the run is finished" not in out  # drained because all were told, not by the grace
    finally:
        for p in [srv, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_client_gives_up_after_max_retry_s(tmp_path, capsys):
    """Nobody listening: the client retries (backoff) for [client] max_retry_s, then exits 4 with a clear line."""
    cfg_path = write_run(tmp_path, rounds=1, extra=f'[client]\ntoken_file = "{tmp_path}/tokens.toml"\n'
                                                   "max_backoff_s = 0.3\nmax_retry_s = 1.5\nrpc_timeout_s = 2\n")
    t0 = time.monotonic()
    rc = main(["client", "--config", str(cfg_path), "--server", f"127.0.0.1:{_free_port()}", "--client-id", IDS[0],
               "--partition", "0"])
    took = time.monotonic() - t0
    assert rc == 4
    err = capsys.readouterr().err
    assert "giving up ([client] max_retry_s = 1.5)" in err and "UNAVAILABLE" in err
    assert took < 15  # model + data load, then ~1.5 s of retries
