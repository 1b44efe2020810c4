"""FlowerTransport: the RoundEngine's transport over a Flower `Grid` (simulation or deployment).

run_round: each Instruction → a Flower Message (serde.py) to the node hosting that client → wait (round
timeout) → replies → ClientUpdates. Failed/missing replies are reported as `failed`; the engine decides
(min_clients, retries) exactly as with the in-process transport.

A client whose cached model is not at the version the server assumed answers "stale" (see client.py); it
gets a second message built from the version it has (setup + full sync when it has nothing) by the
engine's own `instruction_for(cid, version)` — the same rebuild the gRPC coordinator uses.

Bytes: bytes_*/payload_bytes_* are counted with fedtune.wire.sizes exactly like InProcessTransport (so the
engines compare), including resent messages. Flower's own serialized message sizes are kept in
`self.flower_rounds` (Σ deflated object bytes; see serde.message_nbytes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune.algorithms.base import ClientUpdate, FedAlgorithm, Instruction, payload_nbytes
from fedtune.engine import RoundEngine, RoundResult
from fedtune.flower import serde
from fedtune.wire import sizes as wire_size

log = logging.getLogger("fedtune")

TRAIN = "train"
QUERY = "query"


def discover(grid: Grid, num_clients: int, *, timeout_s: float = 120.0) -> dict[str, int]:
    """client id → node id: wait for the nodes to register, ask each which fedtune client it hosts."""
    deadline = time.monotonic() + timeout_s
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients:
            break
        time.sleep(0.2)
    if len(nodes) < num_clients:
        raise RuntimeError(f"only {len(nodes)} Flower nodes connected, need {num_clients} (one per client)")
    msgs = [Message(RecordDict({"fedtune": ConfigRecord({"q": "client_id"})}), n, QUERY) for n in nodes]
    out: dict[str, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the client-id query: {reply.error.reason}")
        cid = str(reply.content.config_records["fedtune"]["client_id"])
        if cid in out:
            raise RuntimeError(f"two nodes claim {cid} (nodes {out[cid]} and {reply.metadata.src_node_id})")
        out[cid] = reply.metadata.src_node_id
    missing = [f"client-{i}" for i in range(num_clients) if f"client-{i}" not in out]
    if missing:
        raise RuntimeError(f"no Flower node hosts {missing}; nodes answered for {sorted(out)}")
    return out


class FlowerTransport:
    def __init__(self, grid: Grid, node_of: dict[str, int], algo: FedAlgorithm) -> None:
        self.grid, self.node_of, self.algo = grid, dict(node_of), algo
        self.engine: RoundEngine | None = None
        self.flower_rounds: list[dict[str, Any]] = []
        self.resyncs = 0

    def attach(self, engine: RoundEngine) -> FlowerTransport:
        """Become `engine`'s transport (resends are rebuilt with engine.instruction_for)."""
        self.engine = engine
        engine.transport = self
        return self

    def _send(self, rnd: int, batch: dict[str, tuple[Instruction, int]], res: RoundResult, fl: dict, timeout: float):
        msgs = {}
        for cid, (ins, from_v) in batch.items():
            res.bytes_down += wire_size.instruction_bytes(ins)
            res.payload_bytes_down += payload_nbytes(ins.sync.tensors) + (payload_nbytes(ins.setup.tensors) if ins.setup else 0)
            msg = Message(serde.instruction_to_record(ins, from_version=from_v), self.node_of[cid], TRAIN,
                          group_id=str(rnd))
            fl["down"] += serde.message_nbytes(msg.content)
            msgs[cid] = msg
        by_node = {self.node_of[c]: c for c in msgs}
        replies = {}
        for reply in self.grid.send_and_receive(list(msgs.values()), timeout=max(timeout, 0.001)):
            replies[by_node[reply.metadata.src_node_id]] = reply
        return replies

    def run_round(self, rnd: int, instructions: dict[str, Instruction], timeout_s: float) -> RoundResult:
        if self.engine is None:
            raise RuntimeError("FlowerTransport.attach(engine) was not called")
        deadline = time.monotonic() + timeout_s
        res = RoundResult(updates=[])
        fl = {"round": rnd, "down": 0, "up": 0, "resyncs": 0}
        # the versions the engine built these instructions from (it updates them only after aggregation)
        batch = {cid: (ins, self.engine.client_versions.get(cid, -1)) for cid, ins in instructions.items()}
        for attempt in range(2):
            replies = self._send(rnd, batch, res, fl, deadline - time.monotonic())
            retry: dict[str, tuple[Instruction, int]] = {}
            for cid in batch:
                reply = replies.get(cid)
                if reply is None:
                    log.warning("round %d: no reply from %s within the round timeout", rnd, cid)
                    res.failed.append(cid)
                    continue
                if reply.has_error():
                    log.warning("round %d: %s failed: %s", rnd, cid, reply.error.reason)
                    res.failed.append(cid)
                    continue
                fl["up"] += serde.message_nbytes(reply.content)
                head = reply.content.config_records["fedtune"]
                if head["status"] == "stale" and attempt == 0:
                    have = int(head["have_version"])
                    retry[cid] = (self.engine.instruction_for(cid, have), have)
                    continue
                if head["status"] != "ok":
                    res.failed.append(cid)
                    continue
                update: ClientUpdate = serde.record_to_update(reply.content)
                res.bytes_up += wire_size.update_bytes(update)
                res.payload_bytes_up += payload_nbytes(update.tensors)
                res.updates.append(update)
            if not retry:
                break
            fl["resyncs"] += len(retry)
            self.resyncs += len(retry)
            batch = retry
        self.flower_rounds.append(fl)
        return res
