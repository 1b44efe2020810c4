"""gRPC coordinator: a transport for the shared RoundEngine (fedtune.engine), not a second round loop.

Clients dial out. Join (token + base-model fingerprint) → PullTask (this round's instruction, chunked,
rebuilt for the version the client reports) → PushUpdate (chunked; the task id must be one of the caller's
open tasks) → … ; Heartbeat keeps a lease. A round waits until every sampled client has reported, the round
timeout passes, or the remaining clients' leases expire; the engine aggregates the survivors or aborts.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.algorithms.base import ClientUpdate, Instruction, payload_nbytes
from fedtune.config import ConfigError, RunConfig, ServerSection, load_tokens
from fedtune.engine import RoundResult
from fedtune.server.security import TokenAuthInterceptor, server_credentials
from fedtune.wire import serde

log = logging.getLogger("fedtune.server")


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
    rnd: int
    sampled: set[str]
    started: float = field(default_factory=time.monotonic)
    tasks: dict[str, _Task] = field(default_factory=dict)  # by client id
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    payload_up: int = 0
    payload_down: int = 0


class GrpcTransport(serde.CoordinatorServicer):
    """The Coordinator servicer and the engine's Transport in one object (they share the round book)."""

    def __init__(self, *, roster: list[str], tokens: dict[str, str], fingerprint: str, model_name: str,
                 run_name: str, algorithm: str, cfg: ServerSection) -> None:
        self.roster, self.fingerprint, self.model_name = roster, fingerprint, model_name
        self.run_name, self.algorithm, self.cfg = run_name, algorithm, cfg
        self.auth = TokenAuthInterceptor(tokens)
        self.max_upload = int(cfg.max_upload_mb * (1 << 20))
        self.lock = threading.Condition()
        self.last_seen: dict[str, float] = {}
        self.book: _RoundBook | None = None
        self.finished = False
        self.stop_event = threading.Event()
        self.instruction_for = None  # set by the engine owner: (cid, version) -> Instruction

    # -- Transport ------------------------------------------------------------------------------
    def run_round(self, rnd: int, instructions: dict[str, Instruction], timeout_s: float) -> RoundResult:
        with self.lock:
            self.book = _RoundBook(rnd, set(instructions))
            for cid, ins in instructions.items():
                self.book.tasks[cid] = _Task(uuid.uuid4().hex, cid, ins)
            self.lock.notify_all()
        deadline = time.monotonic() + timeout_s
        try:
            with self.lock:
                while True:
                    if self.stop_event.is_set():
                        raise Interrupted(f"stopped during round {rnd}")
                    pending = self.book.sampled - set(self.book.updates)
                    if not pending:
                        break
                    now = time.monotonic()
                    if now >= deadline:
                        log.warning("round %d: timeout; %s did not report", rnd, sorted(pending))
                        break
                    seen = {c: max(self.last_seen.get(c, 0.0), self.book.started) for c in pending}
                    if all(now - t > self.cfg.lease_timeout_s for t in seen.values()):
                        log.warning("round %d: lease expired for %s", rnd, sorted(pending))
                        break
                    self.lock.wait(timeout=min(0.5, deadline - now))
                book = self.book
                self.book = None  # late pushes for this round are refused from here on
        except BaseException:
            with self.lock:
                self.book = None
            raise
        failed = sorted(book.sampled - set(book.updates))
        return RoundResult(updates=list(book.updates.values()), failed=failed, bytes_up=book.bytes_up,
                           bytes_down=book.bytes_down, payload_bytes_up=book.payload_up,
                           payload_bytes_down=book.payload_down)

    # -- RPCs -----------------------------------------------------------------------------------
    def _caller(self, context: grpc.ServicerContext, claimed: str) -> str:
        cid = self.auth.authenticated_client(context)
        if claimed and claimed != cid:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token belongs to {cid!r}, request names {claimed!r}")
        if cid not in self.roster:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{cid!r} is not in this run's client list")
        with self.lock:
            self.last_seen[cid] = time.monotonic()
        return cid

    def Join(self, request, context):
        req = serde.from_proto(request)
        cid = self._caller(context, req.client_id)
        limits = serde.Limits(max_upload_bytes=self.max_upload)
        if req.base_fingerprint != self.fingerprint:
            reason = (f"base model mismatch: this run uses {self.model_name!r} with fingerprint "
                      f"{self.fingerprint[:16]}…, the client has {req.base_fingerprint[:16] or 'none'}…; "
                      f"load the same base model (model.name = {self.model_name!r})")
            log.warning("refused %s: %s", cid, reason)
            return serde.to_proto(serde.JoinReply(False, reason, self.fingerprint, self.run_name, self.algorithm))
        log.info("%s joined", cid)
        return serde.to_proto(serde.JoinReply(True, "", self.fingerprint, self.run_name, self.algorithm,
                                              self.cfg.heartbeat_interval_s, limits))

    def PullTask(self, request, context) -> Iterator:
        req = serde.from_proto(request)
        cid = self._caller(context, req.client_id)
        with self.lock:
            if self.finished:
                yield from serde.finished_chunks("run complete")
                return
            task = self.book.tasks.get(cid) if self.book is not None else None
            if task is None or cid in self.book.updates:
                yield from serde.wait_chunks(self.cfg.poll_interval_s, "no task for you this round")
                return
            version = -1 if req.base_version is None else req.base_version
            try:  # the client says which global version it holds: sync it from there
                task.instruction = self.instruction_for(cid, version)
            except ValueError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            task.pulled = True
            book = self.book
        ins = task.instruction
        sent = 0
        for chunk in serde.instruction_to_chunks(ins, task.task_id):
            sent += chunk.ByteSize()
            yield chunk
        with self.lock:
            book.bytes_down += sent
            book.payload_down += payload_nbytes(ins.sync.tensors) + (payload_nbytes(ins.setup.tensors) if ins.setup else 0)

    def PushUpdate(self, request_iterator, context):
        cid = self._caller(context, "")
        with self.lock:
            book = self.book
            open_ids = {t.task_id for t in book.tasks.values() if t.client_id == cid and t.pulled} if book else set()
        counter = serde.ByteCounter()

        def counted():
            for msg in request_iterator:
                counter.bytes += len(msg)  # raw chunk bytes, parsed by read_update
                yield msg

        with serde.abort_on_wire_error(context):
            if not open_ids:
                raise serde.WirePermissionError(f"{cid} has no open task (round closed or not pulled)")
            _, update = serde.read_update(counted(), max_bytes=self.max_upload, expected_task_id=open_ids,
                                                expected_client_id=cid)
        with self.lock:
            if self.book is not book or cid in book.updates:
                return serde.to_proto(serde.PushReply(False, "round already closed or update already received"))
            book.updates[cid] = update
            book.bytes_up += counter.bytes
            book.payload_up += payload_nbytes(update.tensors)
            self.lock.notify_all()
        log.info("round %d: update from %s (%d examples, %d bytes)", book.rnd, cid, update.num_examples, counter.bytes)
        return serde.to_proto(serde.PushReply(True))

    def Heartbeat(self, request, context):
        req = serde.from_proto(request)
        cid = self._caller(context, req.client_id)
        with self.lock:
            open_ids = {t.task_id for t in self.book.tasks.values() if t.client_id == cid} if self.book else set()
            cancel = bool(req.task_id) and req.task_id not in open_ids
        return serde.to_proto(serde.HeartbeatReply(True, self.cfg.heartbeat_interval_s, self.finished, cancel))


def start_grpc_server(transport: GrpcTransport, address: str, cfg: ServerSection, *, workers: int = 16):
    """A grpc.Server with the auth interceptor, message limits, TLS (if configured) and health service."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[transport.auth],
                         options=serde.channel_options(), maximum_concurrent_rpcs=workers * 4)
    serde.add_servicer(server, transport)
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
    for svc in ("", serde.SERVICE_NAME):
        health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def serve(cfg: RunConfig, *, resume: bool = False, progress: bool = False, ready: threading.Event | None = None,
          port_box: list | None = None, stop: threading.Event | None = None) -> dict:
    """`fedtune server`: run the configured rounds over gRPC; returns the run summary."""
    from fedtune.simulation import execute, finalize_run, prepare_run

    scfg: ServerSection = cfg.section("server", ServerSection)
    tokens = load_tokens(scfg.tokens_file, "[server] tokens_file")
    roster = list(scfg.clients) or sorted(tokens)
    unknown = sorted(set(roster) - set(tokens))
    if unknown:
        raise ConfigError(f"[server] clients {unknown} have no token in {scfg.tokens_file}")
    if len(roster) != cfg.federation.num_clients:
        raise ConfigError(f"{len(roster)} clients in the roster but federation.num_clients = "
                          f"{cfg.federation.num_clients}; make them agree")
    run = prepare_run(cfg, resume=resume, roster=roster)
    if not scfg.evaluate:
        run.engine.evaluate_fn = run.engine.test_fn = None
    transport = GrpcTransport(roster=roster, tokens={c: tokens[c] for c in roster}, fingerprint=run.base_fingerprint,
                              model_name=cfg.model.name, run_name=cfg.run.name, algorithm=run.algo.name, cfg=scfg)
    transport.instruction_for = run.engine.instruction_for
    if stop is not None:
        transport.stop_event = stop
    run.engine.transport = transport
    server, port, health_servicer = start_grpc_server(transport, scfg.address, scfg)
    log.info("coordinator for run %r (%s, %d clients) listening on port %d%s", cfg.run.name, run.algo.name,
             len(roster), port, " with TLS" if scfg.tls_cert else " WITHOUT TLS")
    if port_box is not None:
        port_box.append(port)
    if ready is not None:
        ready.set()
    on_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, lambda *_: transport.stop_event.set()) for s in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
    try:
        execute(run, progress=progress)
        summary = finalize_run(run)
        with transport.lock:
            transport.finished = True
        _drain(transport, scfg.finish_grace_s)
        return summary
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for svc in ("", serde.SERVICE_NAME):
            health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.stop(grace=1.0)


def _drain(transport: GrpcTransport, grace_s: float) -> None:
    """After the last round, keep answering FINISHED until every client that was seen has polled again
    (or the grace period ends), so clients exit by themselves."""
    t0 = time.monotonic()
    seen_at_end = dict(transport.last_seen)
    while time.monotonic() - t0 < grace_s and not transport.stop_event.is_set():
        with transport.lock:
            if all(transport.last_seen.get(c, 0) > t for c, t in seen_at_end.items()):
                return
        time.sleep(0.1)
