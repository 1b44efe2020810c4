"""FlowerTransport: the RoundEngine's transport over a Flower `Grid` (simulation or deployment).

run_round: each Instruction → a Flower Message (serde.py) to the node hosting that client → push → poll
for replies until every message is answered or the round timeout → ClientUpdates. A reply is matched to
its client by the message it answers (`reply.metadata.reply_to_message_id`), never by its sender: the
SuperLink answers for a node it considers gone ("node unavailable", sender = the SuperLink) and those
arrive as soon as the node misses its heartbeats, not at the round timeout. Error replies, missing
replies, undecodable replies and replies for another client are `failed`; the engine then decides
(min_clients, retries, nothing written on abort) exactly as with the gRPC transport.

Before each round the transport refreshes its client → node map: a client whose node is offline is failed
at once without a message (unless a newly connected node says it hosts that client: a restarted SuperNode
gets a new node id).

A client whose local model is not at the version the server assumed answers "stale" (see client.py); it
gets a second message built from the version it has (setup + full sync when it has nothing) by the
round plan's `instruction_for(cid, version)` — the same rebuild the gRPC coordinator uses.

Bytes: bytes_*/payload_bytes_* are counted with fedtune.transports.wire.sizes exactly like InProcessTransport (so the
engines compare), including resent messages. Flower's own serialized message sizes are kept in
`self.flower_rounds` (Σ deflated object bytes; see serde.message_nbytes), with the clients that failed.

Secure aggregation (plan.secagg): the transport drives a fedtune.secagg ServerSession with its own messages (not
Flower's legacy SecAgg+ workflow): query messages for advertise and share keys, the train message with each client's
inbox (its reply is the masked vector), a query message for the unmask. On Flower the key stages precede training
(a node answers one message at a time), two short round trips per round.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune.algorithms.api import ClientUpdate, Instruction, payload_nbytes, validate_metrics
from fedtune.config import ConfigError
from fedtune.transports.base import RoundPlan, RoundResult
from fedtune.transports.flower import records as serde
from fedtune.transports.wire import safe_str
from fedtune.transports.wire import sizes as wire_size

log = logging.getLogger("fedtune")

TRAIN = "train"
QUERY = "query"
POLL_S = 0.5  # how often replies are pulled (Grid.send_and_receive waits 3 s between pulls)
SECAGG = "fedtune.secagg"  # the record of a secure-aggregation stage (client.py)


def exchange(grid: Grid, msgs: dict[str, Message], timeout_s: float, *, poll_s: float = POLL_S,
             quorum: int = 0, straggler_s: float = 0.0) -> dict[str, Message]:
    """Push `msgs` (key → message), pull until each is answered or `timeout_s` passes; key → reply.
    Replies are matched by `reply_to_message_id`; unknown or duplicate replies are dropped. With `straggler_s`
    > 0, stop waiting `straggler_s` after `quorum` non-error replies are in."""
    if not msgs:
        return {}
    pushed = {i for i in grid.push_messages(list(msgs.values())) if i}
    key_of = {m.metadata.message_id: k for k, m in msgs.items() if m.metadata.message_id in pushed}
    for k, m in msgs.items():
        if m.metadata.message_id not in pushed:
            log.warning("%s: the message could not be pushed to the SuperLink", k)
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + max(timeout_s, 0.0)
    quorum_at = None
    while True:
        pending = [mid for mid, k in key_of.items() if k not in replies]
        if not pending:
            break
        for reply in grid.pull_messages(pending):
            k = key_of.get(reply.metadata.reply_to_message_id)
            if k is not None and k not in replies:
                replies[k] = reply
        if len(replies) == len(key_of) or time.monotonic() >= deadline:
            break
        if straggler_s > 0 and quorum_at is None and sum(not r.has_error() for r in replies.values()) >= quorum:
            quorum_at = time.monotonic()
            deadline = min(deadline, quorum_at + straggler_s)
            log.info("flower: %d replies in, waiting at most %g s more (straggler_timeout_s)", len(replies),
                     straggler_s)
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
    return replies


def _error_text(reply: Message) -> str:
    """A node's error reply (its text is the node's: escaped and capped, it cannot forge log lines)."""
    return f"{safe_str(reply.error.reason or 'error', 300)} (Flower error code {reply.error.code})"


def query_nodes(grid: Grid, nodes: Iterable[int], timeout_s: float) -> tuple[dict[int, dict], dict[int, str]]:
    """Ask each node which fedtune client it hosts: ({node: its answer}, {node: error})."""
    msgs = {n: Message(RecordDict({"fedtune": ConfigRecord({"q": "client_id"})}), n, QUERY) for n in nodes}
    replies = exchange(grid, msgs, timeout_s)  # type: ignore[arg-type]
    answers, errors = {}, {}
    for n in msgs:
        r = replies.get(n)
        if r is None:
            errors[n] = "no answer to the client-id query"
        elif r.has_error():
            errors[n] = _error_text(r)
        else:
            try:
                answers[n] = dict(r.content.config_records["fedtune"])
            except (KeyError, AttributeError):
                errors[n] = "malformed answer to the client-id query"
    return answers, errors


def natural_key(name: str) -> list:
    """client-2 before client-10 (the order of fedtune's own client-0 … client-N-1)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def discover(grid: Grid, num_clients: int, roster: list[str] | None = None, *, timeout_s: float = 120.0,
             ) -> dict[str, int]:
    """client id → node id, in roster order: wait for `num_clients` nodes, ask each which fedtune client
    it hosts. `roster` (e.g. [flower] clients) fixes the ids and their order; without it the clients are
    the ids the nodes report, in natural order (client-0 … client-N-1 for demo partitions)."""
    if roster is not None and len(roster) != num_clients:
        raise RuntimeError(f"[flower] clients lists {len(roster)} clients but federation.num_clients = {num_clients}")
    deadline = time.monotonic() + timeout_s
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients:
            break
        time.sleep(0.5)
    if len(nodes) < num_clients:
        raise RuntimeError(f"only {len(nodes)} Flower nodes connected within {timeout_s:.0f} s, need "
                           f"{num_clients} (one per client; federation.num_clients)")
    answers, errors = query_nodes(grid, nodes, max(1.0, deadline - time.monotonic()))
    if errors:
        raise RuntimeError("; ".join(f"node {n}: {e}" for n, e in sorted(errors.items())))
    out: dict[str, int] = {}
    for n, a in sorted(answers.items()):
        cid = str(a.get("client_id", ""))
        if cid in out:
            raise RuntimeError(f"two nodes claim {cid} (nodes {out[cid]} and {n})")
        out[cid] = n
    ids = list(roster) if roster is not None else sorted(out, key=natural_key)
    missing = [c for c in ids if c not in out]
    if missing:
        raise RuntimeError(f"no Flower node hosts {missing}; nodes answered for {sorted(out)}")
    if len(ids) != num_clients:
        raise RuntimeError(f"{len(ids)} nodes host clients {ids} but federation.num_clients = {num_clients}; "
                           "make them agree or list the run's clients in [flower] clients")
    return {c: out[c] for c in ids}


class FlowerTransport:
    def __init__(self, grid: Grid, node_of: dict[str, int], *, poll_s: float = POLL_S,
                 query_timeout_s: float = 30.0, straggler_timeout_s: float = 0.0,
                 max_message_bytes: int = 0) -> None:
        self.grid, self.node_of = grid, dict(node_of)
        self.max_message_bytes = max_message_bytes  # [flower] max_message_gb (0: no limit)
        self.poll_s, self.query_timeout_s = poll_s, query_timeout_s
        # once min_clients replies are in, wait at most this long for the rest (0: until the round timeout)
        self.straggler_timeout_s = straggler_timeout_s
        self.flower_rounds: list[dict[str, Any]] = []
        self.resyncs = 0

    # -- nodes ------------------------------------------------------------------------------------
    def refresh_nodes(self, wanted: Iterable[str]) -> set[str]:
        """Clients of `wanted` whose node is offline and not replaced by a newly connected one."""
        get = getattr(self.grid, "get_node_ids", None)
        if get is None:
            return set()
        online = set(get())
        gone = {c for c in wanted if self.node_of.get(c) not in online}
        new = online - set(self.node_of.values())
        if gone and new:
            answers, _ = query_nodes(self.grid, sorted(new), self.query_timeout_s)
            for n, a in answers.items():
                cid = str(a.get("client_id", ""))
                if cid in gone:
                    log.info("flower: %s is back on node %d", cid, n)
                    self.node_of[cid] = n
                    gone.discard(cid)
        return gone

    # -- one round --------------------------------------------------------------------------------
    def _send(self, plan: RoundPlan, batch: dict[str, tuple[Instruction, int]], res: RoundResult, fl: dict,
              timeout: float, *, quorum: int = 0, extra: dict[str, ConfigRecord] | None = None) -> dict[str, Message]:
        msgs = {}
        for cid, (ins, _) in batch.items():  # before any message of the round leaves
            self.check_size(ins)
        for cid, (ins, from_v) in batch.items():
            res.bytes_down += wire_size.instruction_bytes(ins)
            res.payload_bytes_down += payload_nbytes(ins.sync.tensors) + (payload_nbytes(ins.setup.tensors) if ins.setup else 0)
            content = serde.instruction_to_record(ins, from_version=from_v, client_index=plan.index(cid))
            if extra and cid in extra:
                content[SECAGG] = extra[cid]
            msgs[cid] = Message(content, self.node_of[cid], TRAIN, group_id=str(plan.round))
            fl["down"] += serde.message_nbytes(content)
        straggler = self.straggler_timeout_s if quorum else 0.0
        return exchange(self.grid, msgs, timeout, poll_s=self.poll_s, quorum=quorum, straggler_s=straggler)

    def check_size(self, ins: Instruction) -> None:
        """ConfigError, naming what to change, when the instruction's payload is above [flower] max_message_gb."""
        n = payload_nbytes(ins.sync.tensors) + (payload_nbytes(ins.setup.tensors) if ins.setup else 0)
        if self.max_message_bytes and n > self.max_message_bytes:
            raise ConfigError(
                f"round {ins.round}: the instruction for {ins.client_id} carries {n / 1e9:.2f} GB, above [flower] "
                f"max_message_gb = {self.max_message_bytes / 1e9:g}. Raise it if the SuperLink and every node "
                "have the memory (Flower sends arrays in 5 MB chunks), or send less: FLoRA's catch-up is its "
                "cumulative ΔW (fewer target modules or a lower rank, a larger [flora] keep_rounds for clients "
                "slightly behind, every client in every round), or a method whose sync is the adapter only "
                "(fedavg, fedsb); docs/flower.md, Large messages")

    def _fail(self, res: RoundResult, fl: dict, cid: str, why: str, rnd: int) -> None:
        log.warning("round %d: %s failed: %s", rnd, cid, why)
        res.failed.append(cid)
        fl["failed"][cid] = why

    def run_round(self, plan: RoundPlan, timeout_s: float) -> RoundResult:
        if plan.secagg is not None:
            return self._secure_round(plan, timeout_s)
        rnd, instructions = plan.round, plan.instructions
        deadline = time.monotonic() + timeout_s
        res = RoundResult(updates=[])
        fl: dict[str, Any] = {"round": rnd, "down": 0, "up": 0, "resyncs": 0, "failed": {}}
        gone = self.refresh_nodes(instructions)
        for cid in sorted(gone):
            self._fail(res, fl, cid, "its Flower node is offline", rnd)
        # the versions the engine built these instructions from (it updates them only after aggregation)
        batch = {cid: (ins, plan.versions[cid]) for cid, ins in instructions.items() if cid not in gone}
        res.updates = self._train(plan, batch, res, fl, deadline)
        self.flower_rounds.append(fl)
        return res

    def _train(self, plan: RoundPlan, batch: dict[str, tuple[Instruction, int]], res: RoundResult, fl: dict,
               deadline: float, extra: dict[str, ConfigRecord] | None = None) -> list[ClientUpdate]:
        """Train messages to `batch`, one resend to clients that answer "stale"; the updates that came back."""
        rnd, updates = plan.round, []
        for attempt in range(2):
            quorum = plan.min_clients if attempt == 0 and extra is None else 0  # resends wait for the round timeout
            replies = self._send(plan, batch, res, fl, deadline - time.monotonic(), quorum=quorum, extra=extra)
            retry: dict[str, tuple[Instruction, int]] = {}
            for cid in batch:
                reply = replies.get(cid)
                if reply is None:
                    self._fail(res, fl, cid, "no reply within the round timeout (or straggler_timeout_s)", rnd)
                    continue
                if reply.has_error():
                    self._fail(res, fl, cid, _error_text(reply), rnd)
                    continue
                try:
                    fl["up"] += serde.message_nbytes(reply.content)
                    head = reply.content.config_records["fedtune"]
                    status = str(head["status"])
                    if status == "stale" and attempt == 0:
                        have = serde.header_int(head, "have_version", -1)  # > the server's: instruction_for refuses
                        retry[cid] = (plan.instruction_for(cid, have), have)
                        continue
                    if status != "ok":
                        raise ValueError(f"status {status!r}")
                    update: ClientUpdate = serde.record_to_update(reply.content)
                    if update.client_id != cid:
                        raise ValueError(f"the reply is for {update.client_id!r}")
                    validate_metrics(update)  # arbitrary JSON: check before it is sized (update_bytes) below
                    up = wire_size.update_bytes(update)
                except Exception as e:  # noqa: BLE001 - hostile input: one node's reply must never end the run
                    self._fail(res, fl, cid, f"unusable reply: {type(e).__name__}: {safe_str(e, 300)}", rnd)
                    continue
                res.bytes_up += up
                res.payload_bytes_up += payload_nbytes(update.tensors)
                updates.append(update)
            if not retry:
                break
            fl["resyncs"] += len(retry)
            self.resyncs += len(retry)
            batch = retry
        return updates

    # -- secure aggregation ---------------------------------------------------------------------
    def _ask(self, plan: RoundPlan, stage: str, bodies: dict[str, dict], res: RoundResult, fl: dict,
             timeout: float) -> dict[str, Any]:
        """A secagg stage as query messages (body per client); client → its answer (JSON), failures logged."""
        msgs = {c: Message(RecordDict({SECAGG: ConfigRecord({"stage": stage, "body": json.dumps(b)})}),
                           self.node_of[c], QUERY, group_id=str(plan.round)) for c, b in bodies.items()}
        for m in msgs.values():
            n = serde.message_nbytes(m.content)
            fl["down"] += n
            res.bytes_down += n
        out = {}
        for c, r in exchange(self.grid, msgs, timeout, poll_s=self.poll_s).items():
            if r.has_error():
                self._fail(res, fl, c, f"secagg {stage}: {_error_text(r)}", plan.round)
                continue
            try:
                n = serde.message_nbytes(r.content)
                fl["up"] += n
                res.bytes_up += n
                out[c] = json.loads(str(r.content.config_records[SECAGG]["body"]))
            except Exception as e:  # noqa: BLE001 - hostile input
                self._fail(res, fl, c, f"secagg {stage}: unusable reply ({type(e).__name__})", plan.round)
        return out

    def _secure_round(self, plan: RoundPlan, timeout_s: float) -> RoundResult:
        from fedtune.secagg.encode import wire_to_ring
        from fedtune.secagg.protocol import (
            MASKED,
            Abort,
            Advertise,
            ProtocolError,
            ServerSession,
            UnmaskReply,
            _cts_from_dict,
            _cts_to_dict,
        )

        p, rnd = plan.secagg, plan.round
        deadline = time.monotonic() + timeout_s
        res = RoundResult(updates=[])
        fl: dict[str, Any] = {"round": rnd, "down": 0, "up": 0, "resyncs": 0, "failed": {}}
        gone = self.refresh_nodes(plan.instructions)
        for cid in sorted(gone):
            self._fail(res, fl, cid, "its Flower node is offline", rnd)
        s = ServerSession(p, sorted(plan.instructions), plan.min_clients, plan.secagg_require)
        params = p.to_dict()

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        def take(stage: str, answers: dict[str, Any], put) -> None:
            for c, a in answers.items():
                try:
                    put(c, a)
                except (ProtocolError, TypeError, KeyError) as e:
                    self._fail(res, fl, c, f"secagg {stage}: {safe_str(e, 300)}", rnd)

        try:
            live = [c for c in sorted(plan.instructions) if c not in gone]
            take("advertise", self._ask(plan, "advertise", {c: {"params": params, "client_index": plan.index(c)}
                                                             for c in live}, res, fl, left()),
                 lambda c, a: s.advertise(c, Advertise.from_dict(a)))
            s.close_advertise()
            take("share_keys", self._ask(plan, "share_keys", {c: {"params": params, "roster": s.roster_for(c).to_dict()}
                                                              for c in s.u1}, res, fl, left()),
                 lambda c, a: s.share_keys(c, _cts_from_dict(a, "shares")))
            s.close_share_keys()
            extra = {c: ConfigRecord({"stage": "train", "body": json.dumps({"inbox": _cts_to_dict(s.inbox_for(c))})})
                     for c in s.u2}
            batch = {c: (plan.instructions[c], plan.versions[c]) for c in s.u2}
            for u in self._train(plan, batch, res, fl, deadline, extra):
                try:
                    plan.check_update(u.client_id, u)
                    s.masked_input(u.client_id, wire_to_ring(u.tensors[MASKED].numpy()), u.num_examples)
                except (ProtocolError, ValueError) as e:
                    self._fail(res, fl, u.client_id, f"masked vector refused: {safe_str(e, 300)}", rnd)
                    res.rejected.append(u.client_id)
                    continue
                res.updates.append(u)
            s.close_masked_input()
            if plan.on_unmask is not None:
                plan.on_unmask(list(s.u3))
            res.unmasked = True
            take("unmask", self._ask(plan, "unmask", {c: {"params": params,
                                                          "request": s.unmask_request_for(c).to_dict()}
                                                      for c in s.u3}, res, fl, left()),
                 lambda c, a: s.unmask(c, UnmaskReply.from_dict(a)))
            res.secure = s.finish()
        except Abort as e:
            log.warning("round %d: %s", rnd, e)
            res.secagg_abort = str(e)
        self.flower_rounds.append(fl)
        return res
