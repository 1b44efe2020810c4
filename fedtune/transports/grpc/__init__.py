"""fedtune's own gRPC transport: the coordinator (a RoundEngine transport), the edge agent, TLS/mTLS + tokens,
health checking, and `fedtune certs`."""
