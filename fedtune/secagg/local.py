"""The protocol with every party in this process: the in-process simulation's transport and the tests drive it.

Messages go through their wire form (to_dict → JSON bytes → from_dict) so the byte counts are what a network would
carry and the parsers are exercised. `drop[stage]`: clients that vanish before sending that stage's message (and
everything after it): "advertise", "share_keys", "masked_input", "unmask".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedtune.secagg.protocol import (
    Advertise,
    ClientSession,
    ProtocolError,
    Roster,
    RoundParams,
    SecureSum,
    ServerSession,
    UnmaskReply,
    UnmaskRequest,
    _cts_from_dict,
    _cts_to_dict,
)

STAGES = ("advertise", "share_keys", "masked_input", "unmask")


def wire(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def unwire(b: bytes) -> dict:
    return json.loads(b)


@dataclass
class Traffic:
    """Bytes each way and protocol seconds (training excluded), summed over clients / for the server."""

    up: int = 0
    down: int = 0
    client_s: dict[str, float] = field(default_factory=dict)
    server_s: float = 0.0

    def client(self, cid: str, t0: float) -> None:
        self.client_s[cid] = self.client_s.get(cid, 0.0) + time.perf_counter() - t0


def run_local(params: RoundParams, vectors: Mapping[str, Mapping[str, np.ndarray]], weights: Mapping[str, int], *,
              min_clients: int = 1, drop: Mapping[str, set[str]] | None = None,
              sessions: dict[str, ClientSession] | None = None,
              tamper: Callable[[str, str, object], object] | None = None,
              unmasked: Mapping[str, set[bytes]] | None = None, require: frozenset[str] | None = None,
              on_unmask: Callable[[list[str]], None] | None = None) -> tuple[SecureSum, Traffic]:
    """One attempt over `vectors` (client → {part: float array}); raises protocol.Abort when it cannot finish.
    `tamper(stage, cid, message)` may replace a client's outgoing message (tests of hostile clients)."""
    drop = {k: set(v) for k, v in (drop or {}).items()}
    gone: set[str] = set()
    tr = Traffic()
    server = ServerSession(params, sorted(vectors), min_clients, require)
    clients = sessions if sessions is not None else {}

    def timed_server(f, *a):
        t0 = time.perf_counter()
        try:
            return f(*a)
        finally:
            tr.server_s += time.perf_counter() - t0

    def alive(stage: str) -> list[str]:
        gone.update(drop.get(stage, set()))
        return [c for c in sorted(vectors) if c not in gone]

    def send(stage: str, cid: str, msg):
        return tamper(stage, cid, msg) if tamper is not None else msg

    for cid in alive("advertise"):
        t0 = time.perf_counter()
        clients[cid] = ClientSession(cid, params, None if unmasked is None else unmasked[cid])
        raw = wire(send("advertise", cid, clients[cid].advertise(weights[cid])).to_dict())
        tr.client(cid, t0)
        tr.up += len(raw)
        timed_server(server.advertise, cid, Advertise.from_dict(unwire(raw)))
    timed_server(server.close_advertise)
    for cid in alive("share_keys"):
        if cid not in server.u1:
            continue
        raw = wire(server.roster_for(cid).to_dict())
        tr.down += len(raw)
        t0 = time.perf_counter()
        cts = send("share_keys", cid, clients[cid].share_keys(Roster.from_dict(unwire(raw))))
        out = wire(_cts_to_dict(cts))
        tr.client(cid, t0)
        tr.up += len(out)
        timed_server(server.share_keys, cid, _cts_from_dict(unwire(out), "shares"))
    timed_server(server.close_share_keys)
    for cid in alive("masked_input"):
        if cid not in server.u2:
            continue
        raw = wire(_cts_to_dict(server.inbox_for(cid)))
        tr.down += len(raw)
        t0 = time.perf_counter()
        try:
            clients[cid].receive_inbox(_cts_from_dict(unwire(raw), "inbox"))
        except ProtocolError as e:
            tr.client(cid, t0)
            timed_server(server.report, cid, str(e))
            continue
        y, _ = clients[cid].masked_input(vectors[cid])
        y = send("masked_input", cid, y)
        tr.client(cid, t0)
        tr.up += y.nbytes
        timed_server(server.masked_input, cid, y, weights[cid] if params.weights == "examples" else None)
    timed_server(server.close_masked_input)
    if on_unmask is not None:
        on_unmask(list(server.u3))
    for cid in alive("unmask"):
        if cid not in server.u3:
            continue
        raw = wire(server.unmask_request_for(cid).to_dict())
        tr.down += len(raw)
        t0 = time.perf_counter()
        reply = send("unmask", cid, clients[cid].unmask(UnmaskRequest.from_dict(unwire(raw))))
        out = wire(reply.to_dict())
        tr.client(cid, t0)
        tr.up += len(out)
        timed_server(server.unmask, cid, UnmaskReply.from_dict(unwire(out)))
    result = timed_server(server.finish)
    return result, tr
