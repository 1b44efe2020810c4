"""`python -m fedtune.transports.grpc.health --address HOST:PORT [--ca ca.pem [--cert health.pem --key health.key]]`:
exit 0 when the coordinator's standard grpc.health.v1 service answers SERVING (the compose health check).

Plaintext without --ca; TLS with --ca; under mTLS (server `tls_client_ca`) the probe must present a client
certificate the server's CA signed: `fedtune certs` writes one for this (server/health.pem, health.key).
Presenting it to a TLS-only server is harmless, so the compose file always does.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtune.transports.grpc.security import channel_credentials


def check(address: str, ca: str | None = None, timeout: float = 3.0, cert: str | None = None,
          key: str | None = None) -> bool:
    if ca:
        channel = grpc.secure_channel(address, channel_credentials(ca, cert, key))
    else:
        channel = grpc.insecure_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedtune-healthcheck")
    ap.add_argument("--address", default="localhost:50051")
    ap.add_argument("--ca", help="CA certificate (TLS); omit for plaintext")
    ap.add_argument("--cert", help="client certificate to present (mTLS), e.g. health.pem from `fedtune certs`")
    ap.add_argument("--key", help="its private key")
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args(argv)
    if (a.cert is None) != (a.key is None) or (a.cert and not a.ca):
        ap.error("--cert and --key go together, and need --ca")
    try:
        return 0 if check(a.address, a.ca, a.timeout, a.cert, a.key) else 1
    except OSError as e:  # unreadable cert/key file
        print(f"fedtune-healthcheck: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
