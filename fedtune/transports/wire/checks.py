"""What the wire refuses, and how a peer's string is shown: the WireError family (each maps to one gRPC status, see
service.status_code), id checks, and `safe_str` for anything a peer sent that ends up in a log line or an error."""

from __future__ import annotations

MAX_ID_CHARS = 256


class WireError(ValueError):
    """Malformed or unacceptable data on the wire (gRPC: INVALID_ARGUMENT)."""


class WireLimitError(WireError):
    """A declared or actual size exceeds a limit (gRPC: RESOURCE_EXHAUSTED)."""


class WireIntegrityError(WireError):
    """Data does not match its declared sha256 / size (gRPC: DATA_LOSS)."""


class WirePermissionError(WireError):
    """The stream is well-formed but not this client's to send (gRPC: PERMISSION_DENIED)."""


class WireUnknownTaskError(WirePermissionError):
    """An update for a task that is not an open task of its sender; `task_id` lets the receiver tell a stale task
    of its own (a late update: refusable in a reply) from another client's."""

    def __init__(self, message: str, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


def safe_str(value: object, limit: int = 80) -> str:
    """A peer-supplied string for logs and error details: repr-quoted (newlines and control characters escaped,
    so it cannot forge a log line) and capped at `limit` characters."""
    text = str(value)
    return repr(text[:limit]) + (f"…(+{len(text) - limit} chars)" if len(text) > limit else "")


def check_id(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID_CHARS:
        raise WireError(f"{what} must be 1..{MAX_ID_CHARS} characters, got {len(value)}")
    return value

