"""`python -m fedtune.server.healthcheck --address HOST:PORT [--ca ca.pem]`: exit 0 when the coordinator's
standard grpc.health.v1 service answers SERVING (used by the compose health check)."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtune.server.security import channel_credentials


def check(address: str, ca: str | None = None, timeout: float = 3.0) -> bool:
    channel = grpc.secure_channel(address, channel_credentials(ca)) if ca else grpc.insecure_channel(address)
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
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args(argv)
    return 0 if check(a.address, a.ca, a.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
