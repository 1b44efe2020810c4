"""Secure aggregation (SecAgg+): the coordinator learns only the sum of the clients' updates.

crypto    the primitives, from `cryptography` (X25519, HKDF-SHA256, AES-GCM, AES-CTR as PRG) and Shamir sharing
encode    fixed-point encoding into Z_{2^b} with public integer weights; the error bound
protocol  the client and server state machines of one attempt (advertise → share keys → masked input → unmask)
local     every party in one process (the in-process simulation, the tests)
Transport-neutral: the gRPC coordinator/agent and the in-process simulation drive the same sessions.
"""
