"""Edge client: dial out to the coordinator, join, pull a task, train locally, push the update; repeat.

Survives coordinator restarts: on UNAVAILABLE / DEADLINE_EXCEEDED it backs off (exponential, full jitter,
capped) and joins again; it reports the global version it holds, so the server syncs it from there. A
heartbeat thread keeps the lease while it trains. DP accountants persist in `state_dir` after each round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from pathlib import Path

import grpc

from fedtune import __version__
from fedtune.algorithms.api import InstructionRejected
from fedtune.algorithms.runner import Node
from fedtune.config import ClientSection, ConfigError, RunConfig, load_tokens
from fedtune.data.prepare import context_length
from fedtune.fileio import write_text_atomic
from fedtune.models.hardware import describe_hardware, hardware_metrics
from fedtune.models.loading import load_for
from fedtune.transports import wire
from fedtune.transports.grpc.secure import Aborted, SecureTask, check_noise_floor, round_params
from fedtune.transports.grpc.security import auth_metadata, channel_credentials

log = logging.getLogger("fedtune.client")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.DATA_LOSS,
             grpc.StatusCode.ABORTED}  # ABORTED: the server is busy (a stream of ours in flight, byte budget full)


# What a TLS failure of the connection itself says: the coordinator's certificate does not verify against tls_ca or
# does not name the dialled host, or the client's is refused (mTLS). Retrying cannot fix those.
TLS_FAILURES = ("certificate_verify_failed", "hostname verification check failed", "handshake failed",
                "wrong_version_number", "certificate required")


def tls_failure(e: grpc.RpcError) -> bool:
    return e.code() == grpc.StatusCode.UNAVAILABLE and any(m in (e.details() or "").lower() for m in TLS_FAILURES)


class Refused(RuntimeError):
    """The server will not take this client (bad token, wrong model, not in the run): do not retry."""


class GaveUp(RuntimeError):
    """No successful exchange with the coordinator for `[client] max_retry_s`: stop retrying."""


TOKEN_ENV = "FEDTUNE_TOKEN"
MAX_WAIT_S = 300.0  # longest WAIT a coordinator can impose before the next task poll (like the heartbeat interval cap)


def resolve_token(c: ClientSection) -> str:
    """This client's token: [client] token (or the deprecated --token), else $FEDTUNE_TOKEN, else its entry
    in [client] token_file."""
    if c.token:
        return c.token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if not c.token_file:
        raise ConfigError(f"no token: set {TOKEN_ENV} or [client] token_file (the tokens.toml made by `fedtune certs`)")
    tokens = load_tokens(c.token_file, "[client] token_file")
    if c.client_id not in tokens:
        raise ConfigError(f"{c.token_file} has no token for client {c.client_id!r}")
    return tokens[c.client_id]


def check_transport(c: ClientSection) -> None:
    """Refuse to send the token in clear text unless asked to explicitly."""
    if c.tls_ca:
        return
    if not c.insecure:
        raise ConfigError("[client] tls_ca is empty: the token would travel in clear text; set tls_ca (the CA of the "
                          "coordinator's certificate) or, only on a trusted network, pass --insecure "
                          "([client] insecure = true)")
    log.warning("INSECURE: no TLS; the token and updates travel in clear text to %s", c.server)


def make_channel(c: ClientSection) -> grpc.Channel:
    opts = wire.channel_options()
    if c.tls_ca:
        creds = channel_credentials(c.tls_ca, c.tls_cert or None, c.tls_key or None)
        return grpc.secure_channel(c.server, creds, options=opts)
    return grpc.insecure_channel(c.server, options=opts)


def local_data(cfg: RunConfig, c: ClientSection, tokenizer, context_len: int | None = None):
    """This client's (train, eval) features: partition `c.partition` of [data] (the same split the server
    and other clients compute), or, with partition = -1, all of [data] paths as its own data."""
    from fedtune.data.prepare import prepare_data

    if c.partition >= 0:
        if c.partition >= cfg.federation.num_clients:
            raise ConfigError(f"[client] partition {c.partition} ≥ federation.num_clients {cfg.federation.num_clients}")
        return list(prepare_data(cfg, tokenizer, context_len=context_len).clients.values())[c.partition]
    if cfg.data.source != "jsonl":
        raise ConfigError("[client] partition = -1 needs [data] source = \"jsonl\" with this client's own paths")
    one = RunConfig(run=cfg.run, model=cfg.model, data=cfg.data, train=cfg.train)
    one.federation.num_clients = 1
    one.data.test_fraction = 0.0  # the global test set is the server's; a client trains on all of its own split
    return next(iter(prepare_data(one, tokenizer, context_len=context_len).clients.values()))  # all its files form one client


def preflight(c: ClientSection, timeout_s: float = 5.0) -> None:
    """Before the model and data load: one health call, so a TLS mistake (a certificate that does not name the
    dialled host, an unknown CA) ends the client in seconds. An unreachable coordinator is not an error here
    (the run loop retries it)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = make_channel(c)
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as e:
        if tls_failure(e):
            raise Refused(tls_refusal(c, e)) from None
    finally:
        channel.close()


def tls_refusal(c: ClientSection, e: grpc.RpcError) -> str:
    return (f"TLS with {c.server} failed: {_why(e)}. Check [client] tls_ca (the CA that signed the coordinator's "
            "certificate), that the certificate names the host you dial (fedtune certs --server-names, fedtune init "
            "--address), and, with mTLS, tls_cert/tls_key")


class Agent:
    def __init__(self, cfg: RunConfig, c: ClientSection) -> None:
        if not c.client_id:
            raise ConfigError("[client] client_id is required (or --client-id)")
        self.cfg, self.c = cfg, c
        check_transport(c)
        self.token = resolve_token(c)
        preflight(c)
        self.meta = auth_metadata(self.token)
        self.base = load_for(cfg, train=True)  # held as this organisation's [model] says
        log.info("%s: model %s on %s", c.client_id, cfg.model.name,
                 describe_hardware(self.base.model, self.base.holding))
        self.data = local_data(cfg, c, self.base.tokenizer, context_length(self.base.model))
        self.node = Node(self.base.model, self.base.holding)  # the model this client trains, at its global version
        self.state_dir = Path(c.state_dir or f"runs/client-{c.client_id}")
        self.task_id = ""
        self.heartbeat_s = 5.0
        self.max_download = int(c.max_download_mb * (1 << 20))
        self.stop = threading.Event()
        self.finished = False  # the server said the run is over (heartbeat reply or FINISHED)
        self.unmasked: set[bytes] = set()  # secure aggregation: the attempts this process has unmasked

    @property
    def model(self):
        return self.node.model

    @property
    def version(self) -> int | None:
        """The global version held; None = not set up."""
        return self.node.version if self.node.version >= 0 else None

    @property
    def hardware(self) -> dict[str, str]:
        """Join capabilities: how this client holds the base (device, dtype, quantization, checkpointing)."""
        return {k: str(v).lower() for k, v in hardware_metrics(self.base.model, self.base.holding).items()}

    # -- one exchange ----------------------------------------------------------------------------
    def join(self, stub) -> None:
        reply = wire.from_proto(stub.Join(wire.to_proto(wire.JoinRequest(
            self.c.client_id, self.base.fingerprint, {**self.hardware, "train_examples": str(len(self.data.train))}, __version__)),
            metadata=self.meta, timeout=self.c.rpc_timeout_s))
        if not reply.accepted:
            raise Refused(f"join refused: {wire.safe_str(reply.reason, 500)}")
        self.heartbeat_s = _interval(reply.heartbeat_interval_s, self.heartbeat_s)
        if self.node.client is None:  # the method a setup payload that does not name one sets up
            self.node.method = reply.algorithm.split("+")[0]
        log.info("%s joined run %r (%s)", self.c.client_id, reply.run_name, reply.algorithm)

    def step(self, stub) -> bool:
        """Pull one task and do it. False when the run is finished."""
        req = wire.to_proto(wire.TaskRequest(self.c.client_id, self.version))
        res = wire.read_task(stub.PullTask(req, metadata=self.meta, timeout=self.c.rpc_timeout_s),
                              max_bytes=self.max_download)
        if isinstance(res, wire.Finished):
            self.finished = True
            return False
        if isinstance(res, wire.Wait):
            self.stop.wait(min(res.retry_after_s, MAX_WAIT_S))  # a coordinator saying "wait 1e9 s" must not park us
            return True
        ins = res.instruction
        secure = None
        try:  # the coordinator's task is input from another organisation: the node checks it before acting on it
            self.node.apply(ins, client_id=self.c.client_id, vet=lambda i: self._check_privacy(i.train),
                            state=self._saved_state)
            if "secagg" in ins.train:  # secure aggregation: keys are exchanged while the model trains
                secure = SecureTask(stub, self.meta, self.c.client_id, res.task_id, round_params(ins.train),
                                    len(self.data.train), self.unmasked, self.c.rpc_timeout_s, self.stop)
        except (ValueError, LookupError, TypeError, RuntimeError) as e:  # InstructionRejected, shapes, missing keys
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise Refused(f"refused the coordinator's task for round {ins.round}: {wire.safe_str(why, 300)}") from None
        self.task_id = res.task_id
        t0 = time.perf_counter()
        update = self.node.train(self.data.train, self.base.tokenizer.pad_token_id, ins.train, client_id=self.c.client_id)
        if self.finished:  # told by a heartbeat while training: nobody wants this update any more
            return False
        if secure is not None:
            try:
                update = secure.mask(update, self.node.client)
            except Aborted as e:
                log.warning("round %d: secure aggregation of this attempt ended before the masked vector (%s); "
                            "nothing sent", ins.round, e)
                self.task_id = ""
                self._save_state()
                return True
        try:
            reply = self._push(stub, update, res.task_id)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            reply = wire.PushReply(False, wire.safe_str(e.details(), 500))  # refused by validation: failed this round, carry on
        if secure is not None and reply.accepted:
            try:
                secure.unmask()
            except Aborted as e:
                log.warning("round %d: no unmask from this client (%s)", ins.round, e)
        self.task_id = ""
        self._save_state()
        log.info("round %d: trained %.1f s, loss %.4f, update %s", ins.round, time.perf_counter() - t0,
                 update.metrics.get("train_loss", float("nan")), "accepted" if reply.accepted else f"refused: {reply.reason}")
        return True

    def _check_privacy(self, train: dict) -> None:
        """Sample-level DP protects this client's examples against the server too, so the server cannot switch it
        off: with [privacy] mode = "sample" in this client's own config, a task must train under exactly that
        [privacy] (the planned `rounds` it adds for σ calibration aside; the accountant caps ε either way). Likewise
        [client] min_noise_multiplier: a floor on distributed DP's noise that the coordinator cannot lower."""
        check_noise_floor(train, self.c.min_noise_multiplier)
        own = self.cfg.privacy_config()
        if own.mode != "sample":
            return
        got = train.get("privacy")
        got = {k: v for k, v in got.items() if k != "rounds"} if isinstance(got, dict) else None
        want = own.to_dict()
        if got is None:
            raise InstructionRejected("this client trains only under its own [privacy] (mode = \"sample\"); the task "
                                      "has no sample-level DP")
        if diff := sorted(k for k in {*want, *got} if got.get(k, "<unset>") != want.get(k, "<unset>")):
            raise InstructionRejected("this client trains only under its own [privacy]; the task differs in " + ", ".join(
                f"{str(k)[:40]} = {str(got.get(k, '<unset>'))[:40]} (own {want.get(k, '<unset>')})" for k in diff[:4]))

    def _push(self, stub, update, task_id: str, attempts: int = 5):
        """PushUpdate; a busy server (ABORTED) is asked again after a backoff instead of training again."""
        attempt = 0
        while True:
            try:
                return wire.from_proto(stub.PushUpdate(wire.update_to_wire(update, task_id), metadata=self.meta,
                                                        timeout=self.c.rpc_timeout_s))
            except grpc.RpcError as e:
                attempt += 1
                if e.code() != grpc.StatusCode.ABORTED or attempt >= attempts:
                    raise
                log.warning("%s: upload refused for now (%s); retrying", self.c.client_id, _why(e))
                self.stop.wait(random.uniform(0, min(self.c.max_backoff_s, 0.5 * 2**attempt)))

    # -- state that must survive a restart ---------------------------------------------------------
    def _state_file(self) -> Path:
        return self.state_dir / "client_state.json"

    def _save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self._state_file(), json.dumps(self.node.client.state_dict()))

    def _saved_state(self) -> dict | None:
        """The client state saved by an earlier process (DP accountants), to restore into a freshly set-up client."""
        return json.loads(self._state_file().read_text()) if self._state_file().is_file() else None

    # -- loops -----------------------------------------------------------------------------------
    def _heartbeat(self, stub) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                reply = wire.from_proto(stub.Heartbeat(
                    wire.to_proto(wire.HeartbeatRequest(self.c.client_id, self.task_id)),
                    metadata=self.meta, timeout=min(self.c.rpc_timeout_s, 10)))
            except grpc.RpcError:
                continue  # the main loop notices outages and reconnects
            self.heartbeat_s = _interval(reply.heartbeat_interval_s, self.heartbeat_s)
            if reply.run_finished:
                self.finished = True
                self.stop.set()  # wakes the main loop from a WAIT or a backoff
                return

    def run(self) -> int:
        """0 when the run is finished (or stop is set); raises Refused (no retry) or GaveUp (retries exhausted)."""
        attempt = 0
        failing_since: float | None = None  # start of the current run of failed exchanges
        channel = make_channel(self.c)
        stub = wire.CoordinatorStub(channel)
        hb = threading.Thread(target=self._heartbeat, args=(stub,), daemon=True)
        joined = False
        try:
            while not self.stop.is_set():
                try:
                    if not joined:
                        self.join(stub)
                        joined, attempt = True, 0
                        if hb.ident is None:
                            hb.start()  # after Join: it told us the heartbeat interval
                    more = self.step(stub)
                    failing_since = None
                    if not more:
                        break
                except grpc.RpcError as e:
                    if self.finished or self.stop.is_set():
                        break  # the server finished (and may be gone) while this call was in flight
                    code = e.code()
                    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        raise Refused(f"{code.name}: {_why(e)}") from None
                    if tls_failure(e):  # a permanent configuration error: fail now, not after max_retry_s
                        raise Refused(tls_refusal(self.c, e)) from None
                    if code not in RETRYABLE and code != grpc.StatusCode.FAILED_PRECONDITION:  # no retry helps
                        raise Refused(f"the coordinator answered {code.name}: {_why(e)}") from None
                    now = time.monotonic()
                    failing_since = now if failing_since is None else failing_since
                    if now - failing_since >= self.c.max_retry_s:
                        raise GaveUp(f"no successful exchange with the coordinator at {self.c.server} for "
                                     f"{now - failing_since:.0f} s (last error {code.name}: {_why(e)}); "
                                     f"giving up ([client] max_retry_s = {self.c.max_retry_s:g})") from None
                    if code == grpc.StatusCode.FAILED_PRECONDITION:  # ahead of the server: start over
                        log.warning("%s: %s; reloading the base model", self.c.client_id, _why(e))
                        self.base = load_for(self.cfg, train=True)
                        self.node = Node(self.base.model, self.base.holding)
                    joined = False
                    delay = random.uniform(0, min(self.c.max_backoff_s, 0.5 * 2**attempt))  # full jitter
                    delay = min(delay, max(0.0, failing_since + self.c.max_retry_s - now))
                    attempt += 1
                    log.warning("%s: %s (%s); retrying in %.1f s", self.c.client_id, code.name, _why(e), delay)
                    self.stop.wait(delay)
            if self.finished:
                log.info("%s: run finished", self.c.client_id)
            return 0
        finally:
            self.stop.set()
            if hb.is_alive():
                hb.join(timeout=15)  # no RPC may be in flight when the channel closes (grpc aborts otherwise)
            channel.close()


def _why(e: grpc.RpcError) -> str:
    """The server's error details, escaped and capped (they are logged)."""
    return wire.safe_str(e.details(), 300)


def _interval(value: float, default: float) -> float:
    """A heartbeat interval from the server, kept within [0.1 s, 5 min]."""
    return min(max(value, 0.1), 300.0) if value and math.isfinite(value) else default
