"""Authentication for the coordinator: per-client bearer tokens in gRPC metadata, TLS / mTLS.

Clients send `authorization: Bearer <token>` on every call (`auth_metadata(token)`). The server
installs `TokenAuthInterceptor(tokens)`; every RPC except the standard health service is rejected
with UNAUTHENTICATED unless the token matches a known client (constant-time compare). Servicers
learn the caller with `interceptor.authenticated_client(context)`; under mTLS the coordinator also
requires the token's client id among the certificate's names (`peer_identities`: CN, SANs).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

AUTH_HEADER = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

PemSource = bytes | str | os.PathLike  # bytes: PEM contents; str / path: a PEM file


STATUS_METHOD = "/fedtune.v1.Coordinator/Status"


def token_ok(expected: str, presented: str) -> bool:
    """Constant-time token comparison (False for empty tokens)."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the client's token: `stub.Join(req, metadata=auth_metadata(t), timeout=…)`."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def bearer_token(metadata: Sequence[Any] | None) -> str | None:
    """The token of the single `authorization: Bearer …` entry, else None."""
    values = [m[1] if isinstance(m, tuple) else m.value for m in metadata or () if _key(m) == AUTH_HEADER]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _key(m: Any) -> str:
    return (m[0] if isinstance(m, tuple) else m.key).lower()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid client token (UNAUTHENTICATED); health checks are exempt."""

    def __init__(self, tokens: Mapping[str, str], exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,), *,
                 admin_token: str = "") -> None:
        if admin_token and admin_token in tokens.values():
            raise ValueError("the admin token equals a client's token; make a fresh one")
        self._admin = admin_token  # the only credential of STATUS_METHOD; "" = no admin calls
        if any(not t for t in tokens.values()):
            raise ValueError("empty token configured for " + ", ".join(c for c, t in tokens.items() if not t))
        if len(set(tokens.values())) != len(tokens):
            raise ValueError("two clients share a token; tokens must be unique per client")
        self._tokens = dict(tokens)
        self._exempt = tuple(exempt_prefixes)

    def client_for(self, metadata: Sequence[Any] | None) -> str | None:
        """Client id whose token is presented, else None. Compares against every token."""
        presented = bearer_token(metadata)
        found = None
        for cid, expected in self._tokens.items():
            if token_ok(expected, presented or "") and found is None:
                found = cid
        return found

    def authenticated_client(self, context: grpc.ServicerContext) -> str:
        """In a servicer: the calling client's id (aborts UNAUTHENTICATED if there is none)."""
        cid = self.client_for(context.invocation_metadata())
        if cid is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid client token")
        return cid

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(self._exempt):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler_call_details.method == STATUS_METHOD:  # the operator's call: the admin token, never a client's
            presented = bearer_token(handler_call_details.invocation_metadata) or ""
            return handler if handler is not None and token_ok(self._admin, presented) else (
                _deny(handler) if handler is not None else None)
        if handler is None or self.client_for(handler_call_details.invocation_metadata) is not None:
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that aborts; the request is never deserialized."""

    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid client token")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(abort)


def peer_identities(context: grpc.ServicerContext) -> set[str]:
    """The names in the caller's verified client certificate (CN and SANs), empty without one (no mTLS)."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return {n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names}


def _pem(src: PemSource) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def server_credentials(cert: PemSource, key: PemSource, client_ca: PemSource | None = None) -> grpc.ServerCredentials:
    """TLS server credentials; with `client_ca`, mTLS (clients must present a cert it signed)."""
    return grpc.ssl_server_credentials(
        [(_pem(key), _pem(cert))],
        root_certificates=_pem(client_ca) if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: PemSource, cert: PemSource | None = None, key: PemSource | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting `ca`; with cert + key, the client's mTLS identity."""
    if (cert is None) != (key is None):
        raise ValueError("give both a client cert and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca),
        private_key=_pem(key) if key is not None else None,
        certificate_chain=_pem(cert) if cert is not None else None,
    )
