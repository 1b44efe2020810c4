"""The client's side of secure aggregation over gRPC: one `SecureTask` per task that carries train["secagg"].

Keys are advertised and shared on a thread while the model trains (SecAgg RPC: advertise → poll roster → share
keys → poll inbox); after training the update becomes the masked vector that PushUpdate carries (tensor
"secagg/y"), then the client polls for the unmask request, checks it and answers with its shares. Secrets live in
the ClientSession only and are wiped on an abort, an error or after the unmask.
"""

from __future__ import annotations

import json
import logging
import threading

import grpc
import torch

from fedtune.algorithms.api import ClientAlgorithm, ClientUpdate, InstructionRejected
from fedtune.secagg.encode import ring_to_wire
from fedtune.secagg.protocol import (
    MASKED,
    ClientSession,
    ProtocolError,
    Roster,
    RoundParams,
    UnmaskRequest,
    _cts_from_dict,
    _cts_to_dict,
)
from fedtune.transports import wire

log = logging.getLogger("fedtune.client")


class Aborted(RuntimeError):
    """The coordinator ended this attempt for this client (or it could not go on): no update is sent."""


def round_params(train: dict) -> RoundParams:
    """The task's secure-aggregation parameters, checked (InstructionRejected)."""
    try:
        return RoundParams.from_dict(train["secagg"])
    except ProtocolError as e:
        raise InstructionRejected(f"secagg: {e}") from None


def check_noise_floor(train: dict, min_sigma: float) -> None:
    """A client with a distributed-DP floor ([client] min_noise_multiplier > 0) takes only tasks whose clients add
    noise before masking, with σ ≥ the floor at the fewest survivors it would unmask for (InstructionRejected)."""
    if min_sigma <= 0:
        return
    sigma = round_params(train).noise_floor() if "secagg" in train else 0.0
    if sigma < min_sigma:
        raise InstructionRejected(
            f"this client takes part only under distributed DP with σ ≥ {min_sigma:g} ([client] "
            f"min_noise_multiplier); the task's noise gives σ = {sigma:.4g}" if sigma else
            f"this client takes part only under distributed DP ([client] min_noise_multiplier = {min_sigma:g}); "
            "the task adds no noise before masking")


class SecureTask:
    def __init__(self, stub, metadata, client_id: str, task_id: str, params: RoundParams, weight: int,
                 unmasked: set[bytes], rpc_timeout_s: float, stop: threading.Event) -> None:
        self.stub, self.metadata, self.cid, self.task_id = stub, metadata, client_id, task_id
        self.params, self.weight, self.timeout, self.stop = params, weight, rpc_timeout_s, stop
        self.session = ClientSession(client_id, params, unmasked)
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._keys, name="fedtune-secagg-keys", daemon=True)
        self.thread.start()

    def _call(self, stage: str, body=None) -> wire.SecAggReply:
        raw = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        return wire.from_proto(self.stub.SecAgg(wire.to_proto(wire.SecAggRequest(self.cid, self.task_id, stage, raw)),
                                                metadata=self.metadata, timeout=self.timeout))

    def _send(self, stage: str, body) -> None:
        r = self._call(stage, body)
        if r.kind == wire.SECAGG_ABORT:
            raise Aborted(wire.safe_str(r.reason, 300))
        if r.kind != wire.SECAGG_ACK:
            raise ProtocolError(f"the coordinator answered {stage} with kind {r.kind}")

    def _poll(self, stage: str):
        while not self.stop.is_set():
            r = self._call(stage)
            if r.kind == wire.SECAGG_DATA:
                if len(r.body) > wire.SECAGG_MAX_BODY:
                    raise ProtocolError(f"the coordinator's {stage} has {len(r.body)} bytes")
                try:
                    return json.loads(r.body)
                except ValueError:
                    raise ProtocolError(f"the coordinator's {stage} is not JSON") from None
            if r.kind == wire.SECAGG_ABORT:
                raise Aborted(wire.safe_str(r.reason, 300))
            if r.kind != wire.SECAGG_WAIT:
                raise ProtocolError(f"the coordinator answered a {stage} poll with kind {r.kind}")
            self.stop.wait(min(max(r.retry_after_s, 0.05), 5.0))
        raise Aborted("stopping")

    def _keys(self) -> None:
        try:
            self._send("advertise", self.session.advertise(self.weight).to_dict())
            roster = Roster.from_dict(self._poll("roster"))
            self._send("share_keys", _cts_to_dict(self.session.share_keys(roster)))
            inbox = _cts_from_dict(self._poll("inbox"), "inbox")
            try:
                self.session.receive_inbox(inbox)
            except ProtocolError as e:
                self._call("report", str(e))
                raise
        except (Aborted, ProtocolError, grpc.RpcError) as e:
            self.error = e
            self.session.wipe()

    def mask(self, update: ClientUpdate, client: ClientAlgorithm) -> ClientUpdate:
        """The update as its masked vector (Aborted when the key stages failed: nothing is sent)."""
        self.thread.join()
        if self.error is not None:
            raise Aborted(_why(self.error))
        p = self.params
        try:
            y, clipped = self.session.masked_input(client.secure_vector(update, p.layout))
        except ProtocolError as e:
            self.session.wipe()
            raise Aborted(str(e)) from None
        if clipped:
            log.warning("%s: %d of %d coordinates of this update were clipped to ±[secagg] clip", self.cid, clipped,
                        p.m)
        ring = torch.from_numpy(ring_to_wire(y))
        return ClientUpdate(update.client_id, update.num_examples, {MASKED: ring}, dict(update.metrics))

    def unmask(self) -> None:
        """Answer the unmask request (Aborted when the coordinator ended the attempt, or this client refuses it)."""
        try:
            req = UnmaskRequest.from_dict(self._poll("unmask_request"))
            reply = self.session.unmask(req)
        except (ProtocolError, Aborted) as e:
            self.session.wipe()
            raise Aborted(_why(e)) from None
        self._send("unmask", reply.to_dict())


def _why(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {wire.safe_str(e.details(), 200)}"
    return str(e)
