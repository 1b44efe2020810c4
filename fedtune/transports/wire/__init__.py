"""The wire format of fedtune's gRPC transport (protos/fedtune/v1/fedtune.proto); the only importer of the generated
`fedtune_pb2*` code (regenerate with scripts/gen_protos.sh). One concern per module:

  tensors.py   tensors ⇄ safetensors bytes (zero-copy; nothing is ever unpickled)
  checks.py    the WireError family, id checks, safe_str for peer-supplied strings
  framing.py   chunking, zero-copy chunk serialization and parsing, reassembly with hash and size checks
  messages.py  the unary RPCs' messages as dataclasses ⇄ protobuf
  streams.py   Instruction ⇄ PullTask chunks, ClientUpdate ⇄ PushUpdate chunks (compact record for small ones)
  service.py   the gRPC stub and servicer registration, message limits, WireError → gRPC status
  sizes.py     exact serialized sizes, for the bytes every transport reports

The names below are the API the coordinator, the agent and the tests use: `from fedtune.transports import wire`."""

from fedtune.transports.wire.checks import (
    MAX_ID_CHARS,
    WireError,
    WireIntegrityError,
    WireLimitError,
    WirePermissionError,
    WireUnknownTaskError,
    check_id,
    safe_str,
)
from fedtune.transports.wire.framing import CHUNK_BYTES, ByteCounter, wire_bytes
from fedtune.transports.wire.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SECAGG_ABORT,
    SECAGG_ACK,
    SECAGG_DATA,
    SECAGG_MAX_BODY,
    SECAGG_WAIT,
    HeartbeatReply,
    HeartbeatRequest,
    JoinReply,
    JoinRequest,
    Limits,
    PushReply,
    SecAggReply,
    SecAggRequest,
    TaskRequest,
    from_proto,
    to_proto,
)
from fedtune.transports.wire.service import (
    SERVICE_NAME,
    CoordinatorServicer,
    CoordinatorStub,
    abort_on_wire_error,
    add_servicer,
    channel_options,
    status_code,
)
from fedtune.transports.wire.streams import (
    COMPACT_MAX_BYTES,
    MAX_HEADER_BYTES,
    Finished,
    Task,
    Wait,
    chunks_to_instruction,
    chunks_to_update,
    finished_chunks,
    instruction_to_chunks,
    instruction_to_wire,
    max_update_blob_bytes,
    read_task,
    read_update,
    update_to_chunks,
    update_to_wire,
    wait_chunks,
)

__all__ = [
    "CHUNK_BYTES",
    "COMPACT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_ID_CHARS",
    "SECAGG_ABORT",
    "SECAGG_ACK",
    "SECAGG_DATA",
    "SECAGG_MAX_BODY",
    "SECAGG_WAIT",
    "SERVICE_NAME",
    "ByteCounter",
    "CoordinatorServicer",
    "CoordinatorStub",
    "Finished",
    "HeartbeatReply",
    "HeartbeatRequest",
    "JoinReply",
    "JoinRequest",
    "Limits",
    "PushReply",
    "SecAggReply",
    "SecAggRequest",
    "Task",
    "TaskRequest",
    "Wait",
    "WireError",
    "WireIntegrityError",
    "WireLimitError",
    "WirePermissionError",
    "WireUnknownTaskError",
    "abort_on_wire_error",
    "add_servicer",
    "channel_options",
    "check_id",
    "chunks_to_instruction",
    "chunks_to_update",
    "finished_chunks",
    "from_proto",
    "instruction_to_chunks",
    "instruction_to_wire",
    "max_update_blob_bytes",
    "read_task",
    "read_update",
    "safe_str",
    "status_code",
    "to_proto",
    "update_to_chunks",
    "update_to_wire",
    "wait_chunks",
    "wire_bytes",
]
