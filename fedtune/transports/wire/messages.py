"""The unary RPCs' messages as plain dataclasses (field names identical to fedtune.proto's), and the two
conversions: `to_proto` for what is sent, `from_proto` for what is received."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from google.protobuf.message import Message

from fedtune.transports.wire import fedtune_pb2 as pb2
from fedtune.transports.wire.framing import CHUNK_BYTES

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # gRPC message limit: header + chunk + slack

@dataclass
class Limits:
    max_chunk_bytes: int = CHUNK_BYTES
    max_upload_bytes: int = 1 << 30
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass
class JoinRequest:
    client_id: str
    base_fingerprint: str  # hex sha256 of the base weights
    capabilities: dict[str, str] = field(default_factory=dict)
    client_version: str = ""


@dataclass
class JoinReply:
    accepted: bool
    reason: str = ""
    expected_fingerprint: str = ""
    run_name: str = ""
    algorithm: str = ""
    heartbeat_interval_s: float = 0.0
    limits: Limits = field(default_factory=Limits)


@dataclass
class TaskRequest:
    client_id: str
    base_version: int | None = None  # None: not set up yet


@dataclass
class HeartbeatRequest:
    client_id: str
    task_id: str = ""  # task in progress, "" if idle


@dataclass
class HeartbeatReply:
    known: bool
    heartbeat_interval_s: float = 0.0
    run_finished: bool = False
    cancel_task: bool = False


@dataclass
class PushReply:
    accepted: bool
    reason: str = ""


@dataclass
class SecAggRequest:
    client_id: str
    task_id: str
    stage: str
    body: bytes = b""


@dataclass
class SecAggReply:
    kind: int  # SECAGG_ACK | SECAGG_WAIT | SECAGG_DATA | SECAGG_ABORT
    body: bytes = b""
    retry_after_s: float = 0.0
    reason: str = ""


SECAGG_ACK, SECAGG_WAIT, SECAGG_DATA, SECAGG_ABORT = (pb2.SecAggReply.ACK, pb2.SecAggReply.WAIT, pb2.SecAggReply.DATA,
                                                      pb2.SecAggReply.ABORT)
SECAGG_MAX_BODY = 1 << 20  # one stage's message: ~200 B per neighbour, so 1 MiB is thousands of neighbours


# Dataclass ⇄ message pairs; field names are identical on both sides.
_PAIRS: dict[type, type[Message]] = {
    Limits: pb2.ServerLimits,
    JoinRequest: pb2.JoinRequest,
    JoinReply: pb2.JoinReply,
    TaskRequest: pb2.TaskRequest,
    HeartbeatRequest: pb2.HeartbeatRequest,
    HeartbeatReply: pb2.HeartbeatReply,
    PushReply: pb2.PushReply,
    SecAggRequest: pb2.SecAggRequest,
    SecAggReply: pb2.SecAggReply,
}
_DATACLASS = {m: d for d, m in _PAIRS.items()}

Unary = (JoinRequest | JoinReply | TaskRequest | HeartbeatRequest | HeartbeatReply | PushReply | SecAggRequest
         | SecAggReply)


def to_proto(obj: Unary) -> Message:
    """Dataclass → protobuf message (for stubs' requests and servicers' replies)."""
    if type(obj) not in _PAIRS:
        raise TypeError(f"no protobuf mapping for {type(obj).__name__}")
    kw = {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}
    kw = {k: to_proto(v) if type(v) in _PAIRS else v for k, v in kw.items()}
    return _PAIRS[type(obj)](**kw)


def from_proto(msg: Message) -> Unary:
    """Protobuf message (request or reply of a unary RPC) → dataclass. Unset optional fields
    (TaskRequest.base_version, JoinReply.limits) take the dataclass default."""
    if type(msg) not in _DATACLASS:
        raise TypeError(f"no dataclass mapping for {type(msg).__name__}")
    kw: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            kw[fd.name] = dict(value)
        elif fd.has_presence and not msg.HasField(fd.name):
            continue
        else:
            kw[fd.name] = from_proto(value) if isinstance(value, Message) else value
    return _DATACLASS[type(msg)](**kw)

