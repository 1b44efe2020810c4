"""gRPC coordinator: a transport for the shared RoundEngine (fedtune.run.engine), not a second round loop.

Clients dial out. Join (token + base-model fingerprint) → PullTask (this round's instruction, chunked,
rebuilt for the version the client reports) → PushUpdate (chunked; the task id must be one of the caller's
open tasks; the update must be what the algorithm assigned that client — names, shapes, dtypes, finite values,
1 ≤ num_examples ≤ min(declared at Join, [server] max_examples_per_client) — else INVALID_ARGUMENT and the
client has failed this round) → … ; Heartbeat keeps a lease. A round waits until every sampled client has reported, the round
timeout passes, or the remaining clients' leases expire; the engine aggregates the survivors or aborts.

With secure aggregation (plan.secagg) the round also drives a fedtune.secagg ServerSession: clients advertise keys and
share them over the SecAgg RPC while they train (each key stage closes when every client answered or
[secagg] key_timeout_s passed), push their masked vector as the update, then answer the unmask request (closed when all
survivors answered or unmask_timeout_s passed). A poll on SecAgg waits at most SECAGG_POLL_S for its stage.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.algorithms.api import ClientUpdate, Instruction, UpdateRejected, payload_nbytes
from fedtune.config import ConfigError, ServerSection
from fedtune.models.settings import SETTINGS
from fedtune.secagg.config import SecAggConfig
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
from fedtune.transports import wire
from fedtune.transports.base import RoundPlan, RoundResult
from fedtune.transports.grpc.security import TokenAuthInterceptor, peer_identities, server_credentials
from fedtune.transports.wire import safe_str

MAX_STATUS_BYTES = 1 << 20  # a Status reply (the CLI accepts no more)

log = logging.getLogger("fedtune.server")
SECAGG_POLL_S = 10.0  # longest a SecAgg poll is held before it answers WAIT


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT: the round in progress is abandoned (nothing written); resume with --resume."""


@dataclass
class _Task:
    task_id: str
    client_id: str
    instruction: Instruction
    pulled: bool = False


@dataclass
class _RoundBook:
    plan: RoundPlan
    started: float = field(default_factory=time.monotonic)
    tasks: dict[str, _Task] = field(default_factory=dict)  # by client id
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    quorum_at: float | None = None  # when the min_clients-th valid update came in
    rejected: set[str] = field(default_factory=set)  # sent an invalid update: failed for this round
    reasons: dict[str, str] = field(default_factory=dict)  # why each was refused
    bytes_up: int = 0
    bytes_down: int = 0
    payload_up: int = 0
    payload_down: int = 0
    session: ServerSession | None = None  # secure aggregation's, for this attempt
    abort: str = ""  # why secure aggregation stopped this attempt
    unmasked: bool = False

    @property
    def sampled(self) -> set[str]:
        return set(self.plan.instructions)


class _Busy(Exception):
    """A transient refusal (ABORTED): this client's stream of that kind is in flight, or the byte budget is full."""


@dataclass(eq=False)
class _Stream:
    """One chunked stream in flight: its client's only slot of that kind, its share of the in-flight byte budget,
    and the deadlines the watchdog enforces (chunk to chunk, and in total)."""

    cid: str
    kind: str  # "upload" (PushUpdate) | "download" (PullTask)
    context: grpc.ServicerContext
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0
    reserved: int = 0
    cut: str = ""  # why the watchdog cancelled it

    def touch(self) -> None:
        self.last = time.monotonic()


HARDWARE_KEYS = tuple(s.name for s in SETTINGS)  # how a client holds its base, reported at Join (escaped)


class GrpcTransport(wire.CoordinatorServicer):
    """The Coordinator servicer and the engine's Transport in one object (they share the round book)."""

    def __init__(self, *, roster: list[str], tokens: dict[str, str], fingerprint: str, model_name: str,
                 run_name: str, algorithm: str, cfg: ServerSection, stop: threading.Event | None = None,
                 secagg: SecAggConfig | None = None, admin_token: str = "") -> None:
        self.secagg = secagg
        self.started = time.time()
        self.status_extra: Callable[[], dict] | None = None  # run-level numbers (rounds, ε, timing) from the engine
        self.done: dict[str, int] = {}  # per client: accepted updates, rounds it failed, update bytes received
        self.failures: dict[str, int] = {}
        self.client_bytes: dict[str, int] = {}
        self.current: tuple[int, int] | None = None  # (round, attempt) in progress
        self.roster, self.fingerprint, self.model_name = roster, fingerprint, model_name
        self.run_name, self.algorithm, self.cfg = run_name, algorithm, cfg
        self.auth = TokenAuthInterceptor(tokens, admin_token=admin_token)
        self.mtls = bool(cfg.tls_cert and cfg.tls_client_ca)
        self.max_upload = int(cfg.max_upload_mb * (1 << 20))
        self.lock = threading.Condition()
        self.last_seen: dict[str, float] = {}
        self.book: _RoundBook | None = None
        self.finished = False
        self.told: set[str] = set()  # clients that were told the run is finished (FINISHED pull / heartbeat)
        self.stop_event = stop if stop is not None else threading.Event()  # set: abandon the round (SIGTERM)
        self.declared_examples: dict[str, int] = {}  # training examples each client declared at Join
        self.late: list[str] = []  # clients whose update outlived its round, since the last round result
        self.polling: set[str] = set()  # clients with a SecAgg poll in flight (one each)
        self.client_hardware: dict[str, dict[str, str]] = {}  # how each client holds the base (Join capabilities)
        # streams in flight, one per (client, kind); the watchdog cancels those past their deadlines
        self.streams: dict[tuple[str, str], _Stream] = {}
        self.inflight_bytes = 0
        self.max_inflight = int(cfg.max_inflight_mb * (1 << 20))
        self.closed = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="fedtune-stream-watchdog", daemon=True)

    # -- Transport ------------------------------------------------------------------------------
    def run_round(self, plan: RoundPlan, timeout_s: float) -> RoundResult:
        with self.lock:
            attempt = self.current[1] + 1 if self.current and self.current[0] == plan.round else 1
            self.current = (plan.round, attempt)
            self.book = _RoundBook(plan)
            for cid, ins in plan.instructions.items():
                self.book.tasks[cid] = _Task(uuid.uuid4().hex, cid, ins)
            if plan.secagg is not None:
                self.book.session = ServerSession(plan.secagg, sorted(plan.instructions), plan.min_clients,
                                                  plan.secagg_require)
            self.lock.notify_all()
        if plan.secagg is not None:
            return self._secure_round(plan, timeout_s)
        deadline = time.monotonic() + timeout_s
        try:
            with self.lock:
                book = self.book
                self._wait(book, lambda: self._updates_pending(book, book.sampled), deadline)
                self.book = None  # late pushes for this round are refused from here on
        except BaseException:
            with self.lock:
                self.book = None
            raise
        return self._result(book)

    def _result(self, book: _RoundBook) -> RoundResult:
        failed = sorted(book.sampled - set(book.updates))
        with self.lock:
            for c in book.updates:
                self.done[c] = self.done.get(c, 0) + 1
            for c in failed:
                self.failures[c] = self.failures.get(c, 0) + 1
            hardware = {c: {**self.client_hardware[c], **({"declared_examples": self.declared_examples[c]}
                                                        if c in self.declared_examples else {})}
                        for c in book.sampled if c in self.client_hardware}
            late, self.late = self.late, []
        return RoundResult(updates=list(book.updates.values()), failed=failed, rejected=sorted(book.rejected),
                           bytes_up=book.bytes_up, bytes_down=book.bytes_down, payload_bytes_up=book.payload_up,
                           payload_bytes_down=book.payload_down, client_hardware=hardware,
                           secagg_abort=book.abort, unmasked=book.unmasked, reasons=dict(book.reasons), late=late)

    # -- secure aggregation ---------------------------------------------------------------------
    def _wait(self, book: _RoundBook, pending, until: float, what: str = "") -> None:
        """Under self.lock: wait until pending() (the clients the round or stage still waits for) is empty, `until`
        passes, or all of them have a lapsed lease; wakes for the straggler deadline when pending() started one.
        Raises Interrupted on stop."""
        rnd, tag = book.plan.round, f" ({what})" if what else ""
        while True:
            if self.stop_event.is_set():
                raise Interrupted(f"stopped during round {rnd}")
            waiting = pending()
            if not waiting:
                return
            now = time.monotonic()
            if now >= until:
                log.warning("round %d%s: timeout; %s did not report", rnd, tag, sorted(waiting))
                return
            seen = {c: max(self.last_seen.get(c, 0.0), book.started) for c in waiting}
            if all(now - t > self.cfg.lease_timeout_s for t in seen.values()):
                log.warning("round %d%s: lease expired for %s", rnd, tag, sorted(waiting))
                return
            wait = min(0.5, until - now)
            if book.quorum_at is not None and (straggle := book.quorum_at + self.cfg.straggler_timeout_s - now) > 0:
                wait = min(wait, straggle)
            self.lock.wait(timeout=wait)

    def _secure_round(self, plan: RoundPlan, timeout_s: float) -> RoundResult:
        """The round's stages under secure aggregation; an Abort ends the attempt with its reason (RoundResult
        secagg_abort), the decoded sum is RoundResult.secure."""
        sa = self.secagg or SecAggConfig(enabled=True)
        deadline = time.monotonic() + timeout_s
        key_until = min(deadline, time.monotonic() + sa.key_timeout_s)
        book = self.book
        s = book.session
        secure = None
        try:
            with self.lock:
                self._wait(book, lambda: book.sampled - set(s.clients) - book.rejected, key_until, "advertise keys")
                s.close_advertise()
                self.lock.notify_all()
                key_until = min(deadline, time.monotonic() + sa.key_timeout_s)
                self._wait(book, lambda: {c for c in s.u1 if s.clients[c].shares is None}, key_until, "share keys")
                s.close_share_keys()
                self.lock.notify_all()
                self._wait(book, lambda: self._updates_pending(book, s.u2), deadline, "masked vectors")
                s.close_masked_input()
                s.stage = "journal"  # no unmask request goes out before the survivors are journaled
            if plan.on_unmask is not None:
                plan.on_unmask(list(s.u3))  # journaled before any unmask request can be answered
            with self.lock:
                book.unmasked = True
                s.stage = "unmask"
                self.lock.notify_all()
                self._wait(book, lambda: {c for c in s.u3 if s.clients[c].reply is None},
                           time.monotonic() + sa.unmask_timeout_s, "unmask")
                secure = s.finish()
        except Abort as e:
            log.warning("round %d: %s", plan.round, e)
            book.abort = str(e)
        except BaseException:
            with self.lock:
                self.book = None
            raise
        finally:
            with self.lock:
                if secure is None and not book.abort:
                    book.abort = "interrupted"
                s.stage = "closed"
                self.book = None  # late messages for this attempt are refused from here on
                self.lock.notify_all()
        res = self._result(book)
        res.secure = secure
        return res

    def _updates_pending(self, book: _RoundBook, due) -> set[str]:
        """The clients of `due` whose update has not come in; none once min_clients updates have been in for
        straggler_timeout_s (a client that heartbeats but never uploads would hold every round until its timeout)."""
        pending = set(due) - set(book.updates) - book.rejected
        plan = book.plan
        if pending and (grace := self.cfg.straggler_timeout_s) > 0 and len(book.updates) >= plan.min_clients:
            now = time.monotonic()
            if book.quorum_at is None:
                book.quorum_at = now
            if now - book.quorum_at >= grace:
                log.warning("round %d: %d valid updates (min_clients %d) for %g s (straggler_timeout_s); not waiting "
                            "for %s", plan.round, len(book.updates), plan.min_clients, grace, sorted(pending))
                return set()
        return pending

    def SecAgg(self, request, context):
        req = wire.from_proto(request)
        cid = self._caller(context, req.client_id)
        if len(req.body) > wire.SECAGG_MAX_BODY or len(req.stage) > 32:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"secagg message of {len(req.body)} bytes; at most "
                          f"{wire.SECAGG_MAX_BODY}")
        try:
            body = json.loads(req.body) if req.body else None
        except (ValueError, UnicodeDecodeError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "secagg body is not JSON")
        reply = lambda kind, data=None, reason="": wire.to_proto(wire.SecAggReply(
            kind, json.dumps(data, separators=(",", ":")).encode() if data is not None else b"",
            SECAGG_POLL_S / 10 if kind == wire.SECAGG_WAIT else 0.0, safe_str(reason, 500)))
        with self.lock:
            book = self.book
            task = book.tasks.get(cid) if book is not None else None
            if book is None or book.session is None or task is None or not task.pulled or task.task_id != req.task_id:
                return reply(wire.SECAGG_ABORT, reason=f"no open secure-aggregation task {safe_str(req.task_id, 40)} "
                                                       f"for {cid} (the attempt ended); pull the next task")
            s = book.session
            book.bytes_up += request.ByteSize()
            try:
                if req.stage == "advertise":
                    adv = Advertise.from_dict(body)
                    if s.params.weights == "examples" and adv.weight > self.declared_examples.get(cid, adv.weight):
                        raise ProtocolError(f"weight {adv.weight} exceeds the {self.declared_examples[cid]} training "
                                            "examples declared at Join")
                    s.advertise(cid, adv)
                elif req.stage == "share_keys":
                    s.share_keys(cid, _cts_from_dict(body, "shares"))
                elif req.stage == "report":
                    s.report(cid, str(body)[:300])
                elif req.stage == "unmask":
                    if s.stage != "unmask":
                        raise ProtocolError("no unmask is open")
                    s.unmask(cid, UnmaskReply.from_dict(body))
                elif req.stage in ("roster", "inbox", "unmask_request"):
                    if cid in self.polling:  # each poll parks a server thread: one at a time per client
                        context.abort(grpc.StatusCode.ABORTED, f"a secagg poll of {cid} is already in flight")
                    self.polling.add(cid)
                    try:
                        return self._poll(book, cid, req.stage, reply, context)
                    finally:
                        self.polling.discard(cid)
                else:
                    raise ProtocolError(f"unknown secagg stage {safe_str(req.stage, 32)}")
            except ProtocolError as e:
                log.warning("round %d: secagg %s from %s refused: %s", book.plan.round, safe_str(req.stage, 32), cid, e)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, safe_str(str(e), 500))
            self.lock.notify_all()
        return reply(wire.SECAGG_ACK)

    def _poll(self, book: _RoundBook, cid: str, stage: str, reply, context):
        """Under self.lock: the client's message of `stage` once it is out (WAIT after SECAGG_POLL_S)."""
        s = book.session
        ready = {"roster": lambda: bool(s.u1), "inbox": lambda: bool(s.u2),
                 "unmask_request": lambda: s.stage == "unmask"}[stage]
        until = time.monotonic() + min(SECAGG_POLL_S, max(0.0, (context.time_remaining() or SECAGG_POLL_S) - 1))
        while not ready() and self.book is book and not book.abort and time.monotonic() < until:
            self.lock.wait(timeout=min(0.5, until - time.monotonic()))
        if self.book is not book or book.abort:
            return reply(wire.SECAGG_ABORT, reason=book.abort or "the attempt ended")
        if not ready():
            return reply(wire.SECAGG_WAIT)
        members = {"roster": s.u1, "inbox": s.u2, "unmask_request": s.u3}[stage]
        if cid not in members:
            return reply(wire.SECAGG_ABORT, reason=f"{cid} is not among the clients of this stage; pull the next task")
        data = (s.roster_for(cid).to_dict() if stage == "roster" else _cts_to_dict(s.inbox_for(cid)) if stage == "inbox"
                else s.unmask_request_for(cid).to_dict())
        out = reply(wire.SECAGG_DATA, data)
        book.bytes_down += out.ByteSize()
        return out

    # -- RPCs -----------------------------------------------------------------------------------
    def _caller(self, context: grpc.ServicerContext, claimed: str) -> str:
        cid = self.auth.authenticated_client(context)
        if claimed and claimed != cid:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"token belongs to {cid!r}, request names {safe_str(claimed)}")
        if cid not in self.roster:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{cid!r} is not in this run's client list")
        names = peer_identities(context)
        if (self.mtls or names) and cid not in names:  # the certificate must name the token's client
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token of {cid!r} with a client certificate that "
                          f"names {', '.join(sorted(safe_str(n) for n in names)[:4]) or 'nobody'}")
        with self.lock:
            self.last_seen[cid] = time.monotonic()
        return cid

    def Join(self, request, context):
        req = wire.from_proto(request)
        cid = self._caller(context, req.client_id)
        limits = wire.Limits(max_upload_bytes=self.max_upload)
        if req.base_fingerprint != self.fingerprint:
            reason = (f"base model mismatch: this run uses {self.model_name!r} with fingerprint "
                      f"{self.fingerprint[:16]}…, the client has {safe_str(req.base_fingerprint, 16)}; "
                      f"load the same base model (model.name = {self.model_name!r})")
            log.warning("refused %s: %s", cid, reason)
            return wire.to_proto(wire.JoinReply(False, reason, self.fingerprint, self.run_name, self.algorithm))
        declared = req.capabilities.get("train_examples")
        if declared is not None:
            if not (len(declared) <= 16 and declared.isascii() and declared.isdigit() and 0 < int(declared) <= 2**53):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"capability train_examples must be a positive integer, got {declared[:32]!r}")
            with self.lock:
                self.declared_examples[cid] = int(declared)
        hw = {k: re.sub(r"[^A-Za-z0-9:._-]", "?", req.capabilities[k][:32]) for k in HARDWARE_KEYS
              if k in req.capabilities}  # client-supplied: a short word, nothing a log line could be forged with
        with self.lock:
            self.client_hardware[cid] = hw
        log.info("%s joined (fedtune %s%s)", cid, safe_str(req.client_version, 32),
                 "".join(f", {k} {v}" for k, v in hw.items()))
        return wire.to_proto(wire.JoinReply(True, "", self.fingerprint, self.run_name, self.algorithm,
                                              self.cfg.heartbeat_interval_s, limits))

    # -- stream limits ----------------------------------------------------------------------------
    # The sync grpc server parks a worker thread inside a stream (reading the request iterator, or waiting for
    # flow control to send): a client that stops mid-stream would hold it forever. Every chunked stream gets one
    # slot per (client, kind) and deadlines; the watchdog cancels a stream past them (context.cancel() wakes the
    # parked thread: the request iterator raises, the send returns), which frees the thread.
    @contextmanager
    def _stream(self, cid: str, kind: str, context: grpc.ServicerContext) -> Iterator[_Stream]:
        st = _Stream(cid, kind, context)
        st.last = st.started
        with self.lock:
            busy = (cid, kind) in self.streams
            if not busy:
                self.streams[(cid, kind)] = st
        if busy:
            context.abort(grpc.StatusCode.ABORTED, f"an {kind} from {safe_str(cid)} is already in flight; one at a time")
        try:
            yield st
        finally:
            with self.lock:
                del self.streams[(cid, kind)]
                self.inflight_bytes -= st.reserved

    def _reserve(self, st: _Stream, nbytes: int) -> None:
        """Budget for the upload's declared size, taken from chunk 0 before anything is buffered."""
        with self.lock:
            if self.inflight_bytes + nbytes > self.max_inflight:
                raise _Busy(f"server busy: {nbytes} more upload bytes would exceed max_inflight_mb = "
                            f"{self.cfg.max_inflight_mb:g} ({self.inflight_bytes} in flight); retry later")
            self.inflight_bytes += nbytes
            st.reserved += nbytes

    def _watch(self) -> None:
        idle_s, total_s = self.cfg.stream_idle_timeout_s, self.cfg.stream_timeout_s
        while not self.closed.wait(min(0.2, idle_s / 4)):
            now = time.monotonic()
            with self.lock:
                overdue = [st for st in self.streams.values() if not st.cut and
                           (now - st.last > idle_s or now - st.started > total_s)]
                for st in overdue:
                    st.cut = (f"nothing for {now - st.last:.1f} s (stream_idle_timeout_s = {idle_s:g})"
                              if now - st.last > idle_s else
                              f"open for {now - st.started:.1f} s (stream_timeout_s = {total_s:g})")
            for st in overdue:
                log.warning("cut the %s stream of %s: %s", st.kind, safe_str(st.cid), st.cut)
                st.context.cancel()

    # -- RPCs (streams) ---------------------------------------------------------------------------
    def PullTask(self, request, context) -> Iterator:
        req = wire.from_proto(request)
        cid = self._caller(context, req.client_id)
        with self._stream(cid, "download", context) as st:
            for chunk in self._pull_task(cid, req, context):
                yield chunk
                st.touch()  # resumed: the previous chunk went out

    def _pull_task(self, cid: str, req: wire.TaskRequest, context) -> Iterator:
        with self.lock:
            if self.finished:
                self._told(cid)
                yield from wire.finished_chunks("run complete")
                return
            task = self.book.tasks.get(cid) if self.book is not None else None
            if task is None or cid in self.book.updates or cid in self.book.rejected:
                yield from wire.wait_chunks(self.cfg.poll_interval_s, "no task for you this round")
                return
            version = -1 if req.base_version is None else req.base_version
            try:  # the client says which global version it holds: sync it from there
                task.instruction = self.book.plan.instruction_for(cid, version)
            except ValueError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            task.pulled = True
            book = self.book
        ins = task.instruction
        sent = 0
        for chunk in wire.instruction_to_wire(ins, task.task_id):
            sent += len(chunk)
            yield chunk
        with self.lock:
            book.bytes_down += sent
            book.payload_down += payload_nbytes(ins.sync.tensors) + (payload_nbytes(ins.setup.tensors) if ins.setup else 0)

    def PushUpdate(self, request_iterator, context):
        cid = self._caller(context, "")
        with self._stream(cid, "upload", context) as st:
            try:
                return self._push_update(cid, st, request_iterator, context)
            except _Busy as e:
                context.abort(grpc.StatusCode.ABORTED, str(e))

    def _push_update(self, cid: str, st: _Stream, request_iterator, context):
        with self.lock:
            book = self.book
            rejected = book is not None and cid in book.rejected  # refused this round: no second upload
            open_ids = ({t.task_id for t in book.tasks.values() if t.client_id == cid and t.pulled}
                        if book and not rejected else set())
        counter = wire.ByteCounter()

        def counted():
            for msg in request_iterator:
                st.touch()
                counter.bytes += len(msg)  # raw chunk bytes, parsed by read_update
                yield msg

        assigned = self._assigned_bytes(book.plan, cid) if open_ids else None

        def reserve(nbytes: int) -> None:  # chunk 0 passed the wire checks; nothing buffered yet
            if assigned is not None and nbytes > assigned:  # no update of the assigned shapes is that large
                raise UpdateRejected(f"update from {cid!r}: declares {nbytes} bytes; the update assigned to it this "
                                     f"round takes at most {assigned}")
            self._reserve(st, nbytes)

        refused = None
        try:
            with wire.abort_on_wire_error(context):
                if rejected:
                    raise wire.WirePermissionError(f"{cid} failed this round; no second upload")
                try:
                    _, update = wire.read_update(counted(), max_bytes=self.max_upload, expected_task_id=open_ids,
                                                  reserve=reserve, expected_client_id=cid)
                except wire.WireUnknownTaskError as e:  # (an update naming another client: PERMISSION_DENIED)
                    if book and any(t.task_id == e.task_id and t.client_id != cid for t in book.tasks.values()):
                        raise  # another client's task: impersonation
                    # an honest client's update can outlive its task: the round closed (timeout, straggler_timeout_s)
                    # or this coordinator restarted (--resume) while it trained. Dropped, not fatal: it pulls the next.
                    log.info("%s: an update for a closed round (task %s) dropped; the client pulls the next task",
                             cid, safe_str(e.task_id, 12))
                    with self.lock:
                        self.late.append(cid)
                    return wire.to_proto(wire.PushReply(False, f"{cid} has no open task {safe_str(e.task_id, 40)} (the "
                                                               "round closed or the coordinator restarted); this update "
                                                               "is dropped, pull the next task"))
        except UpdateRejected as e:
            refused = safe_str(str(e), 1000)
        with self.lock:
            if self.book is not book or cid in book.updates or cid in book.rejected:
                return wire.to_proto(wire.PushReply(False, "round already closed or update already received"))
            try:  # against what this client was assigned this round (the engine checks again before aggregate)
                if refused is None:
                    book.plan.check_update(cid, update, max_examples=self.declared_examples.get(cid))
            except UpdateRejected as e:
                refused = safe_str(str(e), 1000)
            if refused is None and book.session is not None:  # a masked vector: into this attempt's sum
                if book.session.stage != "masked_input" or cid not in book.session.u2:
                    self.late.append(cid)
                    return wire.to_proto(wire.PushReply(False, f"{cid}: no masked vector is due from you in this "
                                                               "attempt (its stage closed); dropped, pull the next task"))
                try:
                    book.session.masked_input(cid, wire_to_ring(update.tensors[MASKED].numpy()), update.num_examples)
                except ProtocolError as e:
                    refused = safe_str(str(e), 1000)
            if refused is not None:
                book.rejected.add(cid)
                book.reasons[cid] = refused
            else:
                book.updates[cid] = update
                book.payload_up += payload_nbytes(update.tensors)
            book.bytes_up += counter.bytes
            self.client_bytes[cid] = self.client_bytes.get(cid, 0) + counter.bytes
            self.lock.notify_all()
        if refused is not None:
            log.warning("round %d: refused the update of %s (failed for this round): %s", book.plan.round, cid, refused)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        log.info("round %d: update from %s (%d examples, %d bytes)", book.plan.round, cid, update.num_examples,
                 counter.bytes)
        return wire.to_proto(wire.PushReply(True))

    def _assigned_bytes(self, plan: RoundPlan, cid: str) -> int | None:
        """The largest blob `cid` may declare this round: what its assigned update takes (a few KB for a LoRA
        update), so a client cannot reserve max_upload_mb of the shared in-flight budget and hold it with a trickle.
        None: unknown (not sampled): the update is checked after it is read."""
        try:
            return wire.max_update_blob_bytes(plan.expected_update(cid))
        except (UpdateRejected, TypeError):
            return None

    def Status(self, request, context):
        """The operator's view (admin token only, checked by the interceptor): JSON, at most MAX_STATUS_BYTES."""
        st = self.status()
        text = json.dumps(st, separators=(",", ":"), allow_nan=False, default=str)
        if len(text) > MAX_STATUS_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"status is {len(text)} bytes (> {MAX_STATUS_BYTES})")
        return wire.fedtune_pb2.StatusReply(json=text)

    def status(self) -> dict:
        now = time.monotonic()
        with self.lock:
            book = self.book
            clients = {c: {"connected": c in self.last_seen and now - self.last_seen[c] < self.cfg.lease_timeout_s,
                           "last_seen_s_ago": round(now - self.last_seen[c], 1) if c in self.last_seen else None,
                           "rounds_completed": self.done.get(c, 0), "failures": self.failures.get(c, 0),
                           "bytes_up": self.client_bytes.get(c, 0),
                           "declared_examples": self.declared_examples.get(c)} for c in self.roster}
            current = {"round": self.current[0], "attempt": self.current[1]} if book and self.current else None
            finished = self.finished
        extra = self.status_extra() if self.status_extra is not None else {}
        return {"run": self.run_name, "algorithm": self.algorithm, "finished": finished, "in_progress": current,
                "uptime_s": round(time.time() - self.started, 1), **extra, "clients": clients}

    def Heartbeat(self, request, context):
        req = wire.from_proto(request)
        cid = self._caller(context, req.client_id)
        with self.lock:
            open_ids = {t.task_id for t in self.book.tasks.values() if t.client_id == cid} if self.book else set()
            cancel = bool(req.task_id) and req.task_id not in open_ids
            finished = self.finished
            if finished:
                self._told(cid)
        return wire.to_proto(wire.HeartbeatReply(True, self.cfg.heartbeat_interval_s, finished, cancel))

    def _told(self, cid: str) -> None:  # under self.lock
        self.told.add(cid)
        self.lock.notify_all()


def start_grpc_server(transport: GrpcTransport, address: str, cfg: ServerSection, *, workers: int = 16):
    """A grpc.Server with the auth interceptor, message limits, TLS (if configured) and health service.

    Streams hold a worker thread each; at most one upload and one download per client are open at a time, so
    2 × roster threads can be parked and `workers` more stay free for unary RPCs and the health service; with
    secure aggregation each client may park one more in a SecAgg poll."""
    workers += (3 if transport.secagg else 2) * len(transport.roster)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[transport.auth],
                         options=wire.channel_options(), maximum_concurrent_rpcs=workers * 4)
    wire.add_servicer(server, transport)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if cfg.tls_cert:
        creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca or None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (address in use or invalid)")
    server.start()
    transport.watchdog.start()
    for svc in ("", wire.SERVICE_NAME):
        health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def drain(transport: GrpcTransport, grace_s: float) -> None:
    """After the last round, keep serving until every live client (seen within its lease) has been told the
    run is finished — by a FINISHED PullTask reply or a Heartbeat reply with run_finished — or the grace
    period ends, so clients exit by themselves. A heartbeat alone does not count: the reply must say it."""
    deadline = time.monotonic() + grace_s
    with transport.lock:
        while True:
            now = time.monotonic()
            pending = sorted(c for c, t in transport.last_seen.items()
                             if c not in transport.told and now - t <= transport.cfg.lease_timeout_s)
            if not pending or transport.stop_event.is_set():
                return
            if now >= deadline:
                log.warning("finish: %s not told the run is finished within finish_grace_s = %g s",
                            pending, grace_s)
                return
            transport.lock.wait(min(0.1, deadline - now))
