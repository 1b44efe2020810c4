"""Property and adversarial tests of the SecAgg+ protocol (fedtune.secagg.protocol, .local, .encode).

References are computed independently of the package: plain (clipped) weighted means in float64 or exact rationals,
the encoding's scale from the formula documented in encode.py, and the masks from `cryptography`'s X25519, HKDF and
AES-CTR directly (not through fedtune.secagg.crypto).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import pickle
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.secagg import crypto, local, protocol
from fedtune.secagg.crypto import PRIME
from fedtune.secagg.encode import Part, encode, scales, signed
from fedtune.secagg.local import run_local, unwire, wire
from fedtune.secagg.protocol import (
    Abort,
    Advertise,
    ClientSession,
    Peer,
    ProtocolError,
    Roster,
    RoundParams,
    ServerSession,
    UnmaskReply,
    UnmaskRequest,
    _cts_from_dict,
    _cts_to_dict,
)

LIM32, LIM64 = 2**31 - 1, 2**63 - 1


# --- helpers ---------------------------------------------------------------------------------------------------------


def params(layout=None, *, bits=32, threshold=2 / 3, degree=0, weights="examples", max_weight=1000, attempt=0,
           run="run-a", rnd=3, min_survivors=3, max_share=0.0) -> RoundParams:
    layout = layout if layout is not None else (Part("w", (64,), 1.0),)
    return RoundParams(run, rnd, attempt, bits, threshold, degree, weights, max_weight, tuple(layout), min_survivors,
                       max_share=max_share)


def ids(n: int) -> list[str]:
    return [f"c{i:02d}" for i in range(n)]


def make_vectors(cids, layout, rng, spread=1.5) -> dict[str, dict[str, np.ndarray]]:
    """Random vectors; float parts spread over ±spread·clip (so some get clipped), integer parts integer-valued."""
    out = {}
    for c in cids:
        v = {}
        for p in layout:
            if p.integer:
                v[p.name] = rng.integers(-int(p.clip) - 2, int(p.clip) + 3, p.shape).astype(np.float64)
            else:
                v[p.name] = rng.uniform(-spread * p.clip, spread * p.clip, p.shape)
        out[c] = v
    return out


def plain(vecs, weights, p: RoundParams, participants) -> dict[str, np.ndarray]:
    """The plain aggregate of the clipped vectors: Σ w x / Σ w for weighted parts, Σ x for the others."""
    out = {}
    for part in p.layout:
        xs = np.stack([np.clip(np.asarray(vecs[c][part.name], np.float64), -part.clip, part.clip)
                       for c in participants])
        if part.integer:
            xs = np.rint(xs)
        if part.weighted:
            w = np.array([weights[c] if p.weights == "examples" else 1 for c in participants], np.float64)
            out[part.name] = np.tensordot(w, xs, axes=1) / w.sum()
        else:
            out[part.name] = xs.sum(axis=0)
    return out


def hand_scale(part: Part, bits: int, total: int) -> float:
    """s as documented in encode.py: (⌊(2^(b−1) − 1)/T⌋ − 2)/c, capped at 2^50/c."""
    lim = 2 ** (bits - 1) - 1
    return min((lim // total - 2) / part.clip, 2.0**50 / part.clip)


def part_bounds(p: RoundParams, t1: int, n1: int, n3: int) -> dict[str, float]:
    """Per-part error bound: 1/s (weighted mean), n/s (sum), 0 (integer); scales from U1 (t1 = Σw, n1 = |U1|)."""
    out = {}
    for part in p.layout:
        if part.integer:
            out[part.name] = 0.0
        else:
            s = hand_scale(part, p.bits, t1 if part.weighted else n1)
            out[part.name] = (1.0 if part.weighted else n3) / s
    return out


def check_result(res, vecs, weights, p: RoundParams, *, u1, factor=1.0):
    """res matches the plain aggregate over its participants within the documented per-part bound (× factor)."""
    w1 = {c: (weights[c] if p.weights == "examples" else 1) for c in u1}
    bounds = part_bounds(p, sum(w1.values()), len(u1), len(res.participants))
    assert res.err_bound == pytest.approx(max(bounds.values()), rel=1e-12)
    ref = plain(vecs, weights, p, res.participants)
    assert set(res.parts) == {part.name for part in p.layout}
    for part in p.layout:
        got, want = res.parts[part.name], ref[part.name]
        assert got.shape == part.shape and got.dtype == np.float64
        if part.integer and not part.weighted:
            assert np.array_equal(got, want), (got, want)  # counts: exact
        elif part.integer:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
        else:
            err = np.abs(got - want).max() if got.size else 0.0
            assert err <= factor * bounds[part.name], (part.name, err, bounds[part.name])


class Drive:
    """One attempt's sessions driven by hand as run_local drives them (every message through its wire form), keeping
    what the tests inspect: each client's secrets (captured before they are wiped), plain encoding and masked y."""

    def __init__(self, p: RoundParams, vecs, weights):
        self.p, self.vecs, self.weights = p, vecs, weights
        self.cids = sorted(vecs)
        self.server = ServerSession(p, self.cids)
        self.clients = {c: ClientSession(c, p) for c in self.cids}
        self.secret = {c: (cl.c_sk, cl.s_sk, cl.b) for c, cl in self.clients.items()}
        self.rosters: dict[str, Roster] = {}
        self.enc: dict[str, np.ndarray] = {}
        self.y: dict[str, np.ndarray] = {}
        self.requests: dict[str, UnmaskRequest] = {}
        self.replies: dict[str, UnmaskReply] = {}

    def advertise(self, drop=()):
        for c in self.cids:
            if c not in drop:
                adv = self.clients[c].advertise(self.weights[c])
                self.server.advertise(c, Advertise.from_dict(unwire(wire(adv.to_dict()))))
        self.server.close_advertise()
        return self

    def share_keys(self, drop=()):
        for c in self.server.u1:
            if c not in drop:
                self.rosters[c] = Roster.from_dict(unwire(wire(self.server.roster_for(c).to_dict())))
                cts = self.clients[c].share_keys(self.rosters[c])
                self.server.share_keys(c, _cts_from_dict(unwire(wire(_cts_to_dict(cts))), "shares"))
        self.server.close_share_keys()
        return self

    def masked_input(self, drop=()):
        p = self.p
        for i, c in enumerate(self.server.u2):
            if c in drop:
                continue
            cl = self.clients[c]
            cl.receive_inbox(_cts_from_dict(unwire(wire(_cts_to_dict(self.server.inbox_for(c)))), "inbox"))
            self.enc[c], _ = encode(self.vecs[c], p.layout, cl.scales, cl.weight, p.bits, np.random.default_rng(i))
            y, _ = cl.masked_input(self.vecs[c], np.random.default_rng(i))
            self.y[c] = y.copy()
            self.server.masked_input(c, y, self.weights[c] if p.weights == "examples" else None)
        self.server.close_masked_input()
        return self

    def unmask(self, drop=()):
        for c in self.server.u3:
            if c not in drop:
                self.requests[c] = UnmaskRequest.from_dict(unwire(wire(self.server.unmask_request_for(c).to_dict())))
                rep = self.clients[c].unmask(self.requests[c])
                self.replies[c] = UnmaskReply.from_dict(unwire(wire(rep.to_dict())))
                self.server.unmask(c, self.replies[c])
        return self.server.finish()


def ring_sum(arrays, bits) -> np.ndarray:
    dt = np.uint32 if bits == 32 else np.uint64
    out = np.zeros(len(arrays[0]), dt)
    for a in arrays:
        out += a.astype(dt)
    return out


# --- independent reference of the mask derivation (cryptography directly) -------------------------------------------


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ref_ctx(run: str, rnd: int, attempt: int) -> bytes:
    return b"fedtune-secagg/v1" + _lp(run.encode()) + struct.pack(">QQ", rnd, attempt)


def ref_prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    nbytes = n * bits // 8
    ks = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))
    return np.frombuffer(ks, dtype="<u4" if bits == 32 else "<u8").astype(np.uint32 if bits == 32 else np.uint64)


def ref_pair_seed(s_sk: bytes, pk_s_other: bytes, ctx: bytes, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    shared = X25519PrivateKey.from_private_bytes(s_sk).exchange(X25519PublicKey.from_public_bytes(pk_s_other))
    inf = ctx + _lp(b"mask") + _lp(lo.encode()) + _lp(hi.encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=inf).derive(shared)


# === 1. exactness ====================================================================================================


def test_err_bound_is_one_over_s_hand_computed():
    # bits 32, T = 10, clip 1: s = ⌊(2^31 − 1)/10⌋ − 2 = 214748362, so err_bound = 1/s
    p = params((Part("w", (8,), 1.0),))
    vecs = make_vectors(ids(3), p.layout, np.random.default_rng(0))
    res, _ = run_local(p, vecs, {"c00": 2, "c01": 3, "c02": 5})
    assert res.err_bound == pytest.approx(1 / 214748362, rel=1e-12)
    assert res.weights == {"c00": 2, "c01": 3, "c02": 5}
    # unweighted sum over n = 3, clip 2: s = (⌊(2^31 − 1)/3⌋ − 2)/2, err_bound = n/s
    p = params((Part("w", (8,), 2.0, weighted=False),))
    res, _ = run_local(p, make_vectors(ids(3), p.layout, np.random.default_rng(1)), {c: 1 for c in ids(3)})
    assert res.err_bound == pytest.approx(3 / ((LIM32 // 3 - 2) / 2.0), rel=1e-12)
    # 64 bits, small T: the float cap 2^50/c
    p = params((Part("w", (8,), 4.0),), bits=64)
    res, _ = run_local(p, make_vectors(ids(3), p.layout, np.random.default_rng(2)), {c: 7 for c in ids(3)})
    assert res.err_bound == 4.0 / 2.0**50
    # an integer-only layout is exact: bound 0
    p = params((Part("k", (8,), 5.0, weighted=False, integer=True),))
    res, _ = run_local(p, make_vectors(ids(3), p.layout, np.random.default_rng(3)), {c: 1 for c in ids(3)})
    assert res.err_bound == 0.0


@pytest.mark.parametrize("mode", ["examples", "uniform"])
def test_exact_mixed_layout_32bit(mode):
    layout = (Part("w", (50, 4), 0.5), Part("v", (30,), 3.0), Part("sum", (40,), 2.0, weighted=False),
              Part("count", (25,), 9.0, weighted=False, integer=True), Part("wint", (6,), 4.0, integer=True))
    p = params(layout, weights=mode)
    cids = ids(7)
    rng = np.random.default_rng(11)
    vecs = make_vectors(cids, layout, rng)
    weights = {c: int(rng.integers(1, 900)) for c in cids}
    res, tr = run_local(p, vecs, weights)
    assert res.participants == cids and res.bad_shares == []
    if mode == "uniform":
        assert set(res.weights.values()) == {1}
    check_result(res, vecs, weights, p, u1=cids)
    # the unweighted part is the plain sum (not a mean): its magnitude exceeds what a mean of |x| ≤ 2 could reach
    assert np.abs(res.parts["sum"]).max() > 2.0
    assert tr.up > 0 and tr.down > 0


@pytest.mark.parametrize("bits", [32, 64])
def test_unbiased_rounding_many_coordinates(bits):
    """Every coordinate holds the same x with frac(s·x) = 0.3: deterministic rounding would err by 0.3/s or 0.7/s in
    every coordinate; stochastic rounding averages out (|mean err| ≪ bound/10 over 20000 coordinates)."""
    m, cids = 20_000, ids(4)
    part = Part("w", (m,), 1.0)
    p = params((part,), bits=bits, weights="uniform")
    s = hand_scale(part, bits, 4)
    x = (1000 + 0.3) / s
    vecs = {c: {"w": np.full(m, x)} for c in cids}
    res, _ = run_local(p, vecs, {c: 1 for c in cids})
    err = res.parts["w"] - x
    assert res.err_bound == pytest.approx(1 / s, rel=1e-12)
    assert np.abs(err).max() < res.err_bound
    assert abs(err.mean()) < res.err_bound / 10
    assert err.std() > res.err_bound / 10  # the rounding is random, not a constant offset


def test_unbiased_random_data_32bit():
    m, cids = 20_000, ids(5)
    p = params((Part("w", (m,), 1.0),))
    rng = np.random.default_rng(5)
    vecs = make_vectors(cids, p.layout, rng, spread=0.9)
    weights = {c: int(rng.integers(1, 50)) for c in cids}
    res, _ = run_local(p, vecs, weights)
    err = res.parts["w"] - plain(vecs, weights, p, cids)["w"]
    assert np.abs(err).max() < res.err_bound
    assert abs(err.mean()) < res.err_bound / 10


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 12), size=st.integers(1, 120), clip=st.sampled_from([0.01, 0.5, 1.0, 7.25, 100.0]),
       mode=st.sampled_from(["examples", "uniform"]), bits=st.sampled_from([32, 64]), extra=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_exact_property(n, size, clip, mode, bits, extra, seed):
    layout = [Part("w", (size,), clip)]
    if extra:
        layout += [Part("s", (3, size), clip / 2, weighted=False), Part("k", (size,), 20.0, weighted=False, integer=True)]
    p = params(layout, bits=bits, weights=mode, max_weight=150)
    rng = np.random.default_rng(seed)
    cids = ids(n)
    vecs = make_vectors(cids, p.layout, rng)
    weights = {c: int(rng.integers(1, 151)) for c in cids}
    res, _ = run_local(p, vecs, weights)
    assert res.participants == cids
    check_result(res, vecs, weights, p, u1=cids)


def test_64bit_error_within_bound_and_unbiased():
    m, cids = 20_000, ids(3)
    p = params((Part("w", (m,), 1.0),), bits=64, weights="uniform")
    vecs = make_vectors(cids, p.layout, np.random.default_rng(7), spread=1.0)
    res, _ = run_local(p, vecs, {c: 1 for c in cids})
    exact = sum(vecs[c]["w"].astype(np.longdouble) for c in cids) / 3  # more precise than float64
    err = (res.parts["w"].astype(np.longdouble) - exact).astype(np.float64)
    assert abs(err.mean()) < res.err_bound / 10  # was ≈ 0.17 · bound with s = 2^52 and float rounding
    assert np.abs(err).max() < res.err_bound  # was ≈ 1.5 · bound


def test_64bit_large_total_weight_does_not_wrap():
    m = 5000
    p = params((Part("w", (m,), 1.0),), bits=64, max_weight=4096)
    vecs = {c: {"w": np.ones(m)} for c in ids(3)}  # every coordinate at +clip
    res, _ = run_local(p, vecs, {"c00": 2046, "c01": 1, "c02": 1})  # T = 2048
    assert np.abs(res.parts["w"] - 1.0).max() <= res.err_bound  # was: ≈ 80 of 5000 coordinates decoded to −1.0


@pytest.mark.parametrize("total", [2048, 2049, 4096])
def test_scales_no_wrap_invariant_exact_arithmetic(total):
    part = Part("w", (1,), 1.0)
    (s,) = scales((part,), 64, total, 3)
    # the largest q encode's rounding ⌊s·x⌋ + [U < frac] can produce
    q_max = math.floor(s * part.clip) + 1
    assert total * q_max <= LIM64


def test_integer_part_with_fractional_clip_honest_clients_do_not_abort():
    p = params((Part("k", (4,), 2.6, weighted=False, integer=True),))
    vecs = {c: {"k": np.full(4, 3.0)} for c in ids(3)}
    res, _ = run_local(p, vecs, {c: 1 for c in ids(3)})
    assert set(res.parts["k"].tolist()) <= {6.0, 9.0}


# === 2. dropouts =====================================================================================================


@pytest.mark.parametrize(("n", "drop", "thr"), [
    (6, {"advertise": {"c02"}}, 2 / 3),
    (6, {"advertise": {"c00", "c05"}}, 2 / 3),
    (6, {"share_keys": {"c03"}}, 2 / 3),
    (6, {"masked_input": {"c01"}}, 2 / 3),
    (6, {"unmask": {"c04"}}, 2 / 3),
    (6, {"share_keys": {"c00"}, "masked_input": {"c05"}}, 2 / 3),
    (10, {"advertise": {"c09"}, "share_keys": {"c01"}, "masked_input": {"c02"}, "unmask": {"c03"}}, 0.5),
    (10, {"masked_input": {"c02", "c07"}, "unmask": {"c03", "c04"}}, 0.5),
])
def test_dropouts_exact_over_participants(n, drop, thr):
    cids = ids(n)
    p = params((Part("w", (40,), 1.0), Part("k", (5,), 3.0, weighted=False, integer=True)), threshold=thr)
    rng = np.random.default_rng(n + len(drop))
    vecs = make_vectors(cids, p.layout, rng)
    weights = {c: int(rng.integers(1, 100)) for c in cids}
    res, _ = run_local(p, vecs, weights, drop=drop)
    gone = set().union(*(drop.get(s, set()) for s in ("advertise", "share_keys", "masked_input")))
    assert res.participants == [c for c in cids if c not in gone]  # exactly who sent masked inputs
    assert set(res.participants) >= drop.get("unmask", set())  # vanished at unmask: summed all the same
    u1 = [c for c in cids if c not in drop.get("advertise", set())]
    check_result(res, vecs, weights, p, u1=u1)
    assert res.stats["secagg_clients"] == len(res.participants)


@pytest.mark.parametrize(("n", "drop", "stage"), [
    (5, {"advertise": {"c00", "c01", "c02"}}, "advertise"),  # 2 < min_survivors
    (6, {"share_keys": {"c00", "c01", "c02", "c03"}}, "share_keys"),  # 2 shared keys
    (6, {"share_keys": {"c00", "c01", "c02"}}, "share_keys"),  # 3 left, t = 4 of each neighbourhood
    (6, {"masked_input": {"c00", "c01", "c02"}}, "masked_input"),  # 3 holders < t = 4
    (6, {"masked_input": {"c00", "c01", "c02", "c03"}}, "masked_input"),  # 2 < min_survivors
    (6, {"masked_input": {"c00"}, "unmask": {"c01", "c02"}}, "unmask"),  # 3 replies < t = 4
    (6, {"unmask": {"c01", "c02", "c03"}}, "unmask"),
])
def test_threshold_not_met_aborts_at_stage(n, drop, stage):
    cids = ids(n)
    p = params()
    vecs = make_vectors(cids, p.layout, np.random.default_rng(0))
    with pytest.raises(Abort) as ei:
        run_local(p, vecs, {c: 5 for c in cids}, drop=drop)
    assert ei.value.stage == stage
    assert str(ei.value).startswith(f"secure aggregation aborted at {stage}")


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_clients_abort(n):
    p = params()
    vecs = make_vectors(ids(n), p.layout, np.random.default_rng(0))
    with pytest.raises(Abort) as ei:
        run_local(p, vecs, {c: 1 for c in ids(n)})
    assert ei.value.stage == "advertise"


def test_min_survivors_and_min_clients_respected():
    cids = ids(5)
    p = params(min_survivors=5)
    vecs = make_vectors(cids, p.layout, np.random.default_rng(0))
    res, _ = run_local(p, vecs, {c: 1 for c in cids})
    assert len(res.participants) == 5
    with pytest.raises(Abort) as ei:
        run_local(p, vecs, {c: 1 for c in cids}, drop={"masked_input": {"c04"}})
    assert ei.value.stage == "masked_input"
    with pytest.raises(Abort) as ei:  # min_clients above min_survivors
        run_local(params(), vecs, {c: 1 for c in cids}, min_clients=5, drop={"share_keys": {"c04"}})
    assert ei.value.stage == "share_keys"


# === 3. sparse graph (SecAgg+) =======================================================================================


@pytest.mark.parametrize(("n", "degree", "expect"), [(12, 4, 4), (12, 3, 4), (15, 6, 6), (9, 0, 8), (7, 20, 6)])
def test_graph_regular_symmetric(n, degree, expect):
    cids = ids(n)
    p = params(degree=degree)
    d = Drive(p, make_vectors(cids, p.layout, np.random.default_rng(0)), {c: 1 for c in cids}).advertise()
    s = d.server
    edges = set()
    xs = set()
    for c in cids:
        r = s.roster_for(c)
        assert len(r.peers) == expect and c not in r.peers
        assert r.n == n and r.total_weight == n
        xs.add(r.x)
        for v, peer in r.peers.items():
            assert c in s.roster_for(v).peers  # symmetric
            assert peer.x == s.roster_for(v).x and peer.pk_s == d.clients[v].s_pk and peer.pk_c == d.clients[v].c_pk
            edges.add(frozenset((c, v)))
    assert xs == set(range(1, n + 1))
    assert len(edges) == n * expect // 2


def test_sparse_graph_is_randomised():
    cids = ids(12)
    p = params(degree=4)
    graphs = set()
    for _ in range(6):
        s = ServerSession(p, cids)
        for c in cids:
            s.advertise(c, ClientSession(c, p).advertise(1))
        s.close_advertise()
        graphs.add(frozenset(frozenset((c, v)) for c in cids for v in s.roster_for(c).peers))
    assert len(graphs) > 1


@pytest.mark.parametrize("drop", [
    {},
    {"advertise": {"c12", "c13"}, "masked_input": {"c03"}, "unmask": {"c07"}},
    {"share_keys": {"c05"}, "unmask": {"c00"}},
])
def test_sparse_graph_exact_with_dropouts(drop):
    cids = ids(14)
    p = params((Part("w", (60,), 1.0), Part("k", (4,), 10.0, weighted=False, integer=True)), degree=4, threshold=0.5)
    rng = np.random.default_rng(3)
    vecs = make_vectors(cids, p.layout, rng)
    weights = {c: int(rng.integers(1, 300)) for c in cids}
    sessions: dict[str, ClientSession] = {}
    res, _ = run_local(p, vecs, weights, drop=drop, sessions=sessions)
    gone = set().union(*(drop.get(s, set()) for s in ("advertise", "share_keys", "masked_input")))
    assert res.participants == [c for c in cids if c not in gone]
    for cl in sessions.values():
        if cl.roster is not None:
            assert len(cl.roster.peers) == 4 and cl.t == 3  # t = ⌈0.5 · 5⌉
    check_result(res, vecs, weights, p, u1=[c for c in cids if c not in drop.get("advertise", set())])


def test_sparse_graph_clients_mask_only_with_neighbours():
    cids = ids(12)
    p = params(degree=4)
    rng = np.random.default_rng(4)
    vecs = make_vectors(cids, p.layout, rng)
    d = Drive(p, vecs, {c: 3 for c in cids}).advertise().share_keys(drop={"c05"}).masked_input()
    for c in d.server.u2:
        roster = set(d.rosters[c].peers)
        assert set(d.clients[c].held) == roster - {"c05"}
        req = d.server.unmask_request_for(c)
        assert set(req.survivors) | set(req.dropped) <= roster
    res = d.unmask()
    check_result(res, vecs, d.weights, p, u1=cids)


# === 4. privacy of what the server holds =============================================================================


@pytest.mark.parametrize("bits", [32, 64])
def test_masked_vector_uncorrelated_and_uniform(bits):
    m, cids = 20_000, ids(4)
    p = params((Part("w", (m,), 1.0),), bits=bits)
    rng = np.random.default_rng(8)
    # a strongly structured plain vector: a ramp over the whole clip range
    vecs = {c: {"w": np.linspace(-1, 1, m) * (1 + i / 20)} for i, c in enumerate(cids)}
    d = Drive(p, vecs, {c: int(rng.integers(1, 20)) for c in cids}).advertise().share_keys().masked_input()
    for c in cids:
        enc, y = signed(d.enc[c], bits).astype(np.float64), signed(d.y[c], bits).astype(np.float64)
        assert abs(np.corrcoef(enc, np.linspace(-1, 1, m))[0, 1]) > 0.95  # the plain encoding is the ramp
        assert abs(np.corrcoef(enc, y)[0, 1]) < 0.05
        top = (d.y[c] >> (np.uint32(24) if bits == 32 else np.uint64(56))).astype(np.int64)
        counts = np.bincount(top, minlength=256)
        expected = m / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert 120 < chi2 < 420, chi2  # 255 dof: mean 255, sd ≈ 22.6
    res = d.unmask()
    check_result(res, vecs, d.weights, p, u1=cids, factor=1.0 if bits == 32 else 4.0)


def _forms(secret: bytes) -> list[bytes]:
    return [secret, base64.b64encode(secret), base64.urlsafe_b64encode(secret), secret.hex().encode(),
            base64.b64encode(secret).rstrip(b"=")[:40]]


def test_server_never_receives_client_secrets(monkeypatch):
    cids = ids(6)
    p = params((Part("w", (300,), 1.0),))
    vecs = make_vectors(cids, p.layout, np.random.default_rng(9))
    sent: list[bytes] = []
    orig = local.wire

    def spy(d):
        b = orig(d)
        sent.append(b)
        return b

    monkeypatch.setattr(local, "wire", spy)
    sessions: dict[str, ClientSession] = {}
    captured: dict[str, tuple[bytes, bytes, bytes]] = {}
    ys: list[bytes] = []

    def tamper(stage, cid, msg):
        if stage == "advertise":
            cl = sessions[cid]
            captured[cid] = (cl.c_sk, cl.s_sk, cl.b)
        if stage == "masked_input":
            ys.append(msg.tobytes())
        return msg

    res, _ = run_local(p, vecs, {c: 4 for c in cids}, sessions=sessions, tamper=tamper,
                       drop={"masked_input": {"c02"}, "unmask": {"c04"}})
    assert res.participants == [c for c in cids if c != "c02"]
    assert len(captured) == 6 and len(ys) == 5 and len(sent) >= 6 * 2 + 5 * 2
    everything = b"\x00".join(sent + ys)
    for cid, secrets_ in captured.items():
        for sec in secrets_:
            assert len(sec) == 32
            for form in _forms(sec):
                assert form not in everything, cid
            # also not as a little- or big-endian integer (shares travel as integers)
            assert crypto.to_int(sec).to_bytes(32, "little") not in everything
    # the search can find what is there: each public key's base64 does appear
    for cid, cl in sessions.items():
        assert base64.b64encode(cl.c_pk) in everything and base64.b64encode(cl.s_pk) in everything
    # secrets are wiped after a successful unmask; the client that vanished at unmask never replied
    for cid, cl in sessions.items():
        if cid not in {"c02", "c04"}:
            assert cl.c_sk == cl.s_sk == cl.b == b"" and cl.held == {} and cl.stage == "done"


def test_server_state_holds_no_secrets_and_rebuilds_only_what_it_may(monkeypatch):
    cids = ids(7)
    p = params((Part("w", (200,), 1.0),))
    vecs = make_vectors(cids, p.layout, np.random.default_rng(10))
    recovered: list[int] = []
    orig = crypto.recover

    def spy(*a, **k):
        out = orig(*a, **k)
        recovered.append(out[0])
        return out

    monkeypatch.setattr(crypto, "recover", spy)
    d = Drive(p, vecs, {c: 2 for c in cids}).advertise(drop={"c06"}).share_keys().masked_input(drop={"c01"})

    def assert_absent(blob: bytes):
        for c, secrets_ in d.secret.items():
            for sec in secrets_:
                for form in [*_forms(sec), crypto.to_int(sec).to_bytes(32, "little")]:
                    assert form not in blob, c

    assert_absent(pickle.dumps(d.server))
    res = d.unmask()
    assert_absent(pickle.dumps(d.server))
    assert_absent(pickle.dumps(res))
    survivors, dropped = set(d.server.u3), {"c01"}
    assert survivors == set(cids) - {"c01", "c06"}
    # what the server asked: b-shares of survivors only, s-shares of the dropped only
    for c, req in d.requests.items():
        assert set(req.survivors) <= survivors and set(req.dropped) == dropped
        assert set(d.replies[c].b) == set(req.survivors) | {c} and set(d.replies[c].s) == dropped
    # what it rebuilt: exactly b of each survivor and s of each dropped client, nothing else
    want = {crypto.to_int(d.secret[v][2]) for v in survivors} | {crypto.to_int(d.secret[v][1]) for v in dropped}
    assert sorted(recovered) == sorted(want) and len(recovered) == len(survivors) + len(dropped)
    others = {crypto.to_int(sec) for v in cids for sec in d.secret[v]} - want
    assert not others & set(recovered)
    check_result(res, vecs, d.weights, p, u1=[c for c in cids if c != "c06"])


# === 5. hostile clients ==============================================================================================


@pytest.mark.parametrize("which", ["peer", "own", "out_of_field"])
def test_wrong_b_share_is_found_and_named(which):
    cids = ids(6)  # t = ⌈2/3 · 6⌉ = 4 of 6 shares: one wrong share can be left out and named
    p = params((Part("w", (80,), 1.0),))
    rng = np.random.default_rng(12)
    vecs = make_vectors(cids, p.layout, rng)
    weights = {c: int(rng.integers(1, 50)) for c in cids}

    def tamper(stage, cid, msg):
        if stage == "unmask" and cid == "c03":
            target = "c03" if which == "own" else "c00"
            b = dict(msg.b)
            b[target] = PRIME + 5 if which == "out_of_field" else (b[target] + 1) % PRIME
            return UnmaskReply(b, msg.s)
        return msg

    res, _ = run_local(p, vecs, weights, tamper=tamper)
    assert res.bad_shares == ["c03"]
    assert res.stats["secagg_bad_shares"] == 1.0
    check_result(res, vecs, weights, p, u1=cids)


def test_wrong_s_share_is_found_and_named():
    cids = ids(7)  # c06 dropped after sharing: its s is rebuilt from 6 shares, t = 5
    p = params((Part("w", (80,), 1.0),))
    vecs = make_vectors(cids, p.layout, np.random.default_rng(13))
    weights = {c: 3 for c in cids}

    def tamper(stage, cid, msg):
        if stage == "unmask" and cid == "c01":
            return UnmaskReply(msg.b, {v: (sh * 7 + 1) % PRIME for v, sh in msg.s.items()})
        return msg

    res, _ = run_local(p, vecs, weights, tamper=tamper, drop={"masked_input": {"c06"}})
    assert res.bad_shares == ["c01"] and "c06" not in res.participants
    check_result(res, vecs, weights, p, u1=cids)


def test_wrong_share_with_only_t_shares_aborts_not_wrong_sum():
    cids = ids(6)
    p = params()
    vecs = make_vectors(cids, p.layout, np.random.default_rng(14))

    def tamper(stage, cid, msg):
        if stage == "unmask" and cid == "c00":
            return UnmaskReply({k: (v + 1) % PRIME for k, v in msg.b.items()}, msg.s)
        return msg

    with pytest.raises(Abort) as ei:  # two vanish: exactly t = 4 shares of each b, one of them wrong
        run_local(p, vecs, {c: 1 for c in cids}, tamper=tamper, drop={"unmask": {"c04", "c05"}})
    assert ei.value.stage == "unmask" and "c00" in ei.value.culprits


def test_garbage_ciphertext_aborts_at_masked_input_naming_reporter():
    cids = ids(6)
    p = params()
    vecs = make_vectors(cids, p.layout, np.random.default_rng(15))
    rng = np.random.default_rng(16)

    def tamper(stage, cid, msg):
        if stage == "share_keys" and cid == "c02":
            out = dict(msg)
            out["c04"] = rng.bytes(len(out["c04"]))
            return out
        return msg

    with pytest.raises(Abort) as ei:
        run_local(p, vecs, {c: 1 for c in cids}, tamper=tamper)
    assert ei.value.stage == "masked_input"
    assert ei.value.culprits == ["c04"]  # who reported; the reason names the sender
    assert "c02" in ei.value.reason


def test_swapped_ciphertexts_abort_naming_both_reporters():
    cids = ids(5)
    p = params()
    vecs = make_vectors(cids, p.layout, np.random.default_rng(17))

    def tamper(stage, cid, msg):
        if stage == "share_keys" and cid == "c00":
            out = dict(msg)
            out["c01"], out["c02"] = msg["c02"], msg["c01"]  # AAD binds the recipient
            return out
        return msg

    with pytest.raises(Abort) as ei:
        run_local(p, vecs, {c: 1 for c in cids}, tamper=tamper)
    assert ei.value.stage == "masked_input" and ei.value.culprits == ["c01", "c02"]


@pytest.mark.parametrize("bad", ["dtype_signed", "dtype_wide", "big_endian", "short", "long", "2d"])
def test_malformed_masked_vector_protocol_error(bad):
    cids = ids(4)
    p = params((Part("w", (16,), 1.0),))
    vecs = make_vectors(cids, p.layout, np.random.default_rng(18))
    d = Drive(p, vecs, {c: 1 for c in cids}).advertise().share_keys()
    cl = d.clients["c00"]
    cl.receive_inbox(d.server.inbox_for("c00"))
    y, _ = cl.masked_input(vecs["c00"])
    forged = {"dtype_signed": y.view(np.int32), "dtype_wide": y.astype(np.uint64), "big_endian": y.astype(">u4"),
              "short": y[:-1], "long": np.concatenate([y, y[:1]]), "2d": y.reshape(4, 4)}[bad]
    with pytest.raises(ProtocolError):
        d.server.masked_input("c00", forged)
    d.server.masked_input("c00", y)  # the well-formed one is still accepted
    with pytest.raises(ProtocolError):
        d.server.masked_input("c00", y)  # but only once
    # and through run_local
    with pytest.raises(ProtocolError):
        run_local(p, vecs, {c: 1 for c in cids},
                  tamper=lambda s, c, m: (m.astype(np.int64) if s == "masked_input" and c == "c01" else m))


def test_masked_input_refused_from_client_that_did_not_share_keys():
    cids = ids(5)
    p = params()
    d = Drive(p, make_vectors(cids, p.layout, np.random.default_rng(0)), {c: 1 for c in cids})
    d.advertise().share_keys(drop={"c04"})
    with pytest.raises(ProtocolError):
        d.server.masked_input("c04", np.zeros(p.m, np.uint32))
    with pytest.raises(ProtocolError):
        d.server.masked_input("zz", np.zeros(p.m, np.uint32))


def test_out_of_range_garbage_vector_aborts_64bit():
    cids = ids(5)
    p = params((Part("w", (500,), 1.0),), bits=64)
    vecs = make_vectors(cids, p.layout, np.random.default_rng(19))
    rng = np.random.default_rng(20)

    def tamper(stage, cid, msg):
        if stage == "masked_input" and cid == "c03":
            return rng.integers(0, 2**64 - 1, msg.shape, dtype=np.uint64, endpoint=True)
        return msg

    with pytest.raises(Abort) as ei:
        run_local(p, vecs, {c: 1 for c in cids}, tamper=tamper)
    assert ei.value.stage == "unmask" and "out-of-range" in ei.value.reason
    assert ei.value.culprits == []  # a garbage vector cannot be traced to its sender


def test_garbage_vector_32bit_not_detectable_range_is_whole_ring():
    """Threat model: at 32 bits `scales` makes T·(s·c+1) = 2^31 − 1, so every ring value is a sum honest clients could
    produce and a garbage vector decodes without an Abort (its bound is checked, no more)."""
    cids = ids(4)
    p = params((Part("w", (500,), 1.0),), weights="uniform")
    vecs = make_vectors(cids, p.layout, np.random.default_rng(21))
    rng = np.random.default_rng(22)

    def tamper(stage, cid, msg):
        return rng.integers(0, 2**32, msg.shape, dtype=np.uint64).astype(np.uint32) if stage == "masked_input" \
            and cid == "c01" else msg

    res, _ = run_local(p, vecs, {c: 1 for c in cids}, tamper=tamper)  # no Abort: nothing is out of range
    assert res.participants == cids
    assert np.abs(res.parts["w"] - plain(vecs, {c: 1 for c in cids}, p, cids)["w"]).max() > 0.5  # garbage


def test_crafted_in_range_vector_not_detectable_threat_model():
    """Threat model: a client adding a well-formed in-range offset to its masked vector shifts the sum, undetected."""
    cids = ids(4)
    part = Part("w", (100,), 1.0)
    p = params((part,), weights="uniform")
    vecs = make_vectors(cids, p.layout, np.random.default_rng(23), spread=0.5)
    s = hand_scale(part, 32, 4)
    delta = int(s * 0.25)  # moves the mean by 0.25 / 4

    def tamper(stage, cid, msg):
        return msg + np.uint32(delta) if stage == "masked_input" and cid == "c02" else msg

    res, _ = run_local(p, vecs, {c: 1 for c in cids}, tamper=tamper)
    shift = res.parts["w"] - plain(vecs, {c: 1 for c in cids}, p, cids)["w"]
    np.testing.assert_allclose(shift, delta / s / 4, atol=res.err_bound)
    assert res.bad_shares == []


# === 6. hostile or buggy server requests =============================================================================


@pytest.fixture
def masked7():
    """7 clients, c06 dropped before sharing keys; the other six have sent masked vectors (t = ⌈2/3·7⌉ = 5)."""
    cids = ids(7)
    p = params()
    d = Drive(p, make_vectors(cids, p.layout, np.random.default_rng(24)), {c: 2 for c in cids})
    return d.advertise().share_keys(drop={"c06"}).masked_input()


@pytest.mark.parametrize(("survivors", "dropped"), [
    (("c01", "c02", "c03", "c04"), ("c01",)),  # both survived and dropped
    (("c01", "c02", "c03", "c04", "c05"), ("c06",)),  # c06 is in the roster but never shared keys
    (("c01", "c02", "c03", "c04", "zz"), ()),  # a stranger
    (("c00", "c01", "c02", "c03", "c04"), ()),  # itself as a peer survivor
    (("c01", "c02", "c03"), ("c04", "c05")),  # 4 survivors < t = 5
    ((), ("c01", "c02", "c03", "c04", "c05")),  # every s-share at once
    (("c01", "c01", "c02", "c03", "c04"), ()),  # a repeated client
])
def test_client_refuses_hostile_unmask_request(masked7, survivors, dropped):
    cl = masked7.clients["c00"]
    held = dict(cl.held)
    with pytest.raises(ProtocolError):
        cl.unmask(UnmaskRequest(survivors, dropped))
    # refused: nothing revealed, nothing consumed; the honest request still works
    assert cl.stage == "masked" and cl.held == held and cl.b and masked7.p.ctx not in cl.unmasked
    rep = cl.unmask(masked7.server.unmask_request_for("c00"))
    assert set(rep.b) == {"c00", "c01", "c02", "c03", "c04", "c05"} and rep.s == {}


def test_too_few_survivors_counts_min_survivors():
    cids = ids(6)
    p = params(threshold=0.5, min_survivors=5)  # t = 3, but 5 summed clients are required
    d = Drive(p, make_vectors(cids, p.layout, np.random.default_rng(25)), {c: 1 for c in cids})
    d.advertise().share_keys().masked_input()
    with pytest.raises(ProtocolError):
        d.clients["c00"].unmask(UnmaskRequest(("c01", "c02", "c03"), ("c04", "c05")))
    rep = d.clients["c00"].unmask(UnmaskRequest(("c01", "c02", "c03", "c04"), ("c05",)))
    assert set(rep.s) == {"c05"}


def test_second_unmask_refused_also_across_sessions(masked7):
    cl = masked7.clients["c00"]
    req = masked7.server.unmask_request_for("c00")
    cl.unmask(req)
    assert masked7.p.ctx in cl.unmasked and cl.b == b""
    with pytest.raises(ProtocolError):
        cl.unmask(req)
    with pytest.raises(ProtocolError):
        cl.unmask(UnmaskRequest(("c01", "c02", "c03", "c04"), ("c05",)))
    with pytest.raises(ProtocolError):  # a fresh session of the same attempt sharing the record
        ClientSession("c00", masked7.p, cl.unmasked)
    # another attempt of the same round is a different context
    ClientSession("c00", dataclasses.replace(masked7.p, attempt=1), cl.unmasked)


def test_unmasked_record_through_run_local():
    cids = ids(4)
    p = params()
    vecs = make_vectors(cids, p.layout, np.random.default_rng(26))
    unmasked = {c: set() for c in cids}
    run_local(p, vecs, {c: 1 for c in cids}, unmasked=unmasked)
    assert all(u == {p.ctx} for u in unmasked.values())
    with pytest.raises(ProtocolError):
        run_local(p, vecs, {c: 1 for c in cids}, unmasked=unmasked)
    res, _ = run_local(dataclasses.replace(p, attempt=1), vecs, {c: 1 for c in cids}, unmasked=unmasked)
    assert res.participants == cids


@pytest.fixture
def roster6():
    cids = ids(6)
    p = params()
    d = Drive(p, make_vectors(cids, p.layout, np.random.default_rng(27)), {c: 1 for c in cids}).advertise()
    return d, d.server.roster_for("c00")


def _with_peers(r: Roster, peers: dict) -> Roster:
    return dataclasses.replace(r, peers=peers)


@pytest.mark.parametrize("attack", ["dup_pk_c", "dup_pk_s", "cross_dup", "own_key", "self_listed", "same_x",
                                    "own_x", "no_peers", "too_few", "n_small", "weight_small"])
def test_client_refuses_hostile_roster(roster6, attack):
    d, r = roster6
    cl = d.clients["c00"]
    peers = dict(r.peers)
    p1, p2 = peers["c01"], peers["c02"]
    bad = {
        "dup_pk_c": lambda: _with_peers(r, {**peers, "c02": Peer(p2.x, p1.pk_c, p2.pk_s)}),
        "dup_pk_s": lambda: _with_peers(r, {**peers, "c02": Peer(p2.x, p2.pk_c, p1.pk_s)}),
        "cross_dup": lambda: _with_peers(r, {**peers, "c02": Peer(p2.x, p1.pk_s, p2.pk_s)}),
        "own_key": lambda: _with_peers(r, {**peers, "c02": Peer(p2.x, cl.c_pk, p2.pk_s)}),
        "self_listed": lambda: _with_peers(r, {**peers, "c00": Peer(99, crypto.new_keypair()[1], crypto.new_keypair()[1])}),
        "same_x": lambda: _with_peers(r, {**peers, "c02": Peer(p1.x, p2.pk_c, p2.pk_s)}),
        "own_x": lambda: _with_peers(r, {**peers, "c02": Peer(r.x, p2.pk_c, p2.pk_s)}),
        "no_peers": lambda: _with_peers(r, {}),
        "too_few": lambda: _with_peers(r, {"c01": p1}),  # 2 < min_survivors
        "n_small": lambda: dataclasses.replace(r, n=3),
        "weight_small": lambda: dataclasses.replace(r, total_weight=0),
    }[attack]()
    with pytest.raises(ProtocolError):
        cl.share_keys(bad)
    assert cl.stage == "advertised"
    assert set(cl.share_keys(r)) == set(peers)  # the honest roster still works


def test_client_refuses_out_of_turn_and_foreign_inbox(roster6):
    d, r = roster6
    cl = d.clients["c00"]
    with pytest.raises(ProtocolError):
        cl.masked_input(d.vecs["c00"])
    with pytest.raises(ProtocolError):
        cl.unmask(UnmaskRequest(("c01", "c02", "c03"), ()))
    with pytest.raises(ProtocolError):
        cl.advertise(1)
    cl.share_keys(r)
    with pytest.raises(ProtocolError):
        cl.receive_inbox({"zz": b"\x00" * 60})  # not a neighbour
    with pytest.raises(ProtocolError):
        cl.receive_inbox({})  # fewer than t − 1 senders


# === 7. wire parsing =================================================================================================


def _json(x):
    return unwire(wire(x))


def test_roundtrips_through_json():
    p = params((Part("w", (3, 4), 0.5), Part("k", (2,), 7.0, weighted=False, integer=True)), bits=64, degree=6,
               weights="uniform", max_weight=77, attempt=5, run="r/ü", rnd=9, min_survivors=4)
    assert RoundParams.from_dict(_json(p.to_dict())) == p
    adv = Advertise(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 12)
    assert Advertise.from_dict(_json(adv.to_dict())) == adv
    r = Roster(3, {"a": Peer(1, b"\x04" * 32, b"\x05" * 32), "b": Peer(2, b"\x06" * 32, b"\x07" * 32)}, 40, 5, 7)
    assert Roster.from_dict(_json(r.to_dict())) == r
    req = UnmaskRequest(("a", "b"), ("c",))
    assert UnmaskRequest.from_dict(_json(req.to_dict())) == req
    rep = UnmaskReply({"a": 0, "b": PRIME - 1}, {"c": 2**520})
    assert UnmaskReply.from_dict(_json(rep.to_dict())) == rep
    cts = {"a": b"\x09" * 160}
    assert _cts_from_dict(_json(_cts_to_dict(cts)), "x") == cts


def _params_dict(**change):
    d = params((Part("w", (4,), 1.0),)).to_dict()
    d.update(change)
    return d


@pytest.mark.parametrize("d", [
    None, [], "x", {},
    _params_dict(extra=1),
    {k: v for k, v in _params_dict().items() if k != "degree"},
    _params_dict(bits=16), _params_dict(bits="32"), _params_dict(bits=True),
    _params_dict(threshold=0.4), _params_dict(threshold=1.5), _params_dict(threshold=float("nan")),
    _params_dict(threshold="0.6"), _params_dict(threshold=True),
    _params_dict(weights="median"), _params_dict(run=""), _params_dict(run="x" * 129), _params_dict(run=3),
    _params_dict(round=-1), _params_dict(round=1.0), _params_dict(attempt="0"), _params_dict(attempt=2**31 + 1),
    _params_dict(degree=-2), _params_dict(max_weight=0), _params_dict(min_survivors=1),
    _params_dict(min_survivors=True),
    _params_dict(layout=[]), _params_dict(layout={}), _params_dict(layout=[{"name": "w"}]),
    _params_dict(layout=[{"name": "w", "shape": [4], "clip": 0, "weighted": True, "integer": False}]),
    _params_dict(layout=[{"name": "w", "shape": [4], "clip": float("inf"), "weighted": True, "integer": False}]),
    _params_dict(layout=[{"name": "w", "shape": [-1], "clip": 1.0, "weighted": True, "integer": False}]),
    _params_dict(layout=[{"name": "w", "shape": [2.0], "clip": 1.0, "weighted": True, "integer": False}]),
    _params_dict(layout=[{"name": "w", "shape": [4], "clip": 1.0, "weighted": 1, "integer": False}]),
    _params_dict(layout=[{"name": "w", "shape": [2**16, 2**16], "clip": 1.0, "weighted": True, "integer": False}]),
    _params_dict(layout=[{"name": "w", "shape": [1], "clip": 1.0, "weighted": True, "integer": False}] * 4097),
])
def test_round_params_rejects(d):
    with pytest.raises(ProtocolError):
        RoundParams.from_dict(d)


@pytest.mark.parametrize("d", [
    _params_dict(bits=32.0),
    _params_dict(layout=[{"name": "w", "shape": [2], "clip": 1.0, "weighted": True, "integer": False}] * 2),
])
def test_round_params_rejects_lenient_cases(d):
    with pytest.raises(ProtocolError):
        RoundParams.from_dict(d)


B32 = base64.b64encode(b"\x01" * 32).decode()
B32b = base64.b64encode(b"\x02" * 32).decode()


@pytest.mark.parametrize("d", [
    None, [], {},
    {"pk_c": B32, "pk_s": B32b, "commit": B32},  # no weight
    {"pk_c": B32, "pk_s": B32b, "commit": B32, "weight": 0},
    {"pk_c": B32, "pk_s": B32b, "commit": B32, "weight": True},
    {"pk_c": B32, "pk_s": B32b, "commit": B32, "weight": 2.0},
    {"pk_c": B32, "pk_s": B32b, "commit": B32, "weight": 2**40 + 1},
    {"pk_c": base64.b64encode(b"\x01" * 31).decode(), "pk_s": B32b, "commit": B32, "weight": 1},
    {"pk_c": B32, "pk_s": base64.b64encode(b"\x01" * 33).decode(), "commit": B32, "weight": 1},
    {"pk_c": B32, "pk_s": B32b, "commit": B32[:-2] + "!=", "weight": 1},  # bad base64
    {"pk_c": B32, "pk_s": B32b, "commit": B32.rstrip("="), "weight": 1},  # missing padding
    {"pk_c": B32 + "\n", "pk_s": B32b, "commit": B32, "weight": 1},
    {"pk_c": "é" * 44, "pk_s": B32b, "commit": B32, "weight": 1},
    {"pk_c": b"\x01" * 32, "pk_s": B32b, "commit": B32, "weight": 1},
    {"pk_c": "A" * 10**6, "pk_s": B32b, "commit": B32, "weight": 1},  # oversize
    {"pk_c": B32, "pk_s": B32b, "commit": B32, "weight": 1, "x": 1},  # too many entries
    {"pk_c": B32, "pk_s": B32b, "commitment": B32, "weight": 1},  # a wrong key
])
def test_advertise_rejects(d):
    with pytest.raises(ProtocolError):
        Advertise.from_dict(d)


def _roster(**change):
    d = {"x": 1, "total_weight": 5, "n": 3, "peers": {"a": [2, B32, B32b], "b": [3, B32b, B32]}}
    d.update(change)
    return d


@pytest.mark.parametrize("d", [
    None, {}, _roster(x=0), _roster(x=True), _roster(x="1"), _roster(total_weight=0), _roster(n=0),
    _roster(n=10**6), _roster(extra=1), {k: v for k, v in _roster().items() if k != "n"},
    _roster(peers=[]), _roster(peers={"a": [2, B32]}), _roster(peers={"a": (2, B32, B32b)}),
    _roster(peers={"a": [0, B32, B32b]}), _roster(peers={"a": [2.0, B32, B32b]}),
    _roster(peers={"a": [2, B32[:-4], B32b]}), _roster(peers={"a": [2, B32, "%%%%"]}),
    _roster(peers={"": [2, B32, B32b]}), _roster(peers={"x" * 129: [2, B32, B32b]}),
    _roster(peers={str(i): [1, B32, B32b] for i in range(protocol.MAX_CLIENTS + 1)}),  # oversize
])
def test_roster_rejects(d):
    with pytest.raises(ProtocolError):
        Roster.from_dict(d)


@pytest.mark.parametrize("d", [
    None, {}, {"survivors": ["a"]}, {"survivors": "ab", "dropped": []}, {"survivors": ["a"], "dropped": None},
    {"survivors": [1], "dropped": []}, {"survivors": [""], "dropped": []}, {"survivors": [], "dropped": ["y" * 129]},
    {"survivors": [], "dropped": [], "x": []},
    {"survivors": ["a"] * (protocol.MAX_CLIENTS + 1), "dropped": []},  # oversize
])
def test_unmask_request_rejects(d):
    with pytest.raises(ProtocolError):
        UnmaskRequest.from_dict(d)


SH = base64.b64encode((5).to_bytes(66, "big")).decode()


@pytest.mark.parametrize("d", [
    None, {}, {"b": {"a": SH}}, {"b": {"a": SH}, "s": []}, {"b": {"a": 5}, "s": {}},
    {"b": {"a": base64.b64encode((5).to_bytes(65, "big")).decode()}, "s": {}},  # wrong share length
    {"b": {"a": base64.b64encode((5).to_bytes(67, "big")).decode()}, "s": {}},
    {"b": {"a": SH[:-1] + "*"}, "s": {}}, {"b": {"": SH}, "s": {}}, {"b": {}, "s": {"a": SH}, "x": {}},
    {"b": {"a": "A" * 5000}, "s": {}},
])
def test_unmask_reply_rejects(d):
    with pytest.raises(ProtocolError):
        UnmaskReply.from_dict(d)


def test_ciphertext_maps_reject():
    with pytest.raises(ProtocolError):
        _cts_from_dict({"a": base64.b64encode(b"\x00" * 600).decode()}, "shares")  # over 512 bytes
    with pytest.raises(ProtocolError):
        _cts_from_dict({"a": "not base64!"}, "shares")
    with pytest.raises(ProtocolError):
        _cts_from_dict(["a"], "shares")


def test_server_refuses_bad_share_maps():
    cids = ids(5)
    p = params()
    d = Drive(p, make_vectors(cids, p.layout, np.random.default_rng(28)), {c: 1 for c in cids}).advertise()
    r = d.server.roster_for("c00")
    cts = d.clients["c00"].share_keys(r)
    with pytest.raises(ProtocolError):
        d.server.share_keys("c00", {k: v for k, v in cts.items() if k != "c01"})  # a neighbour missing
    with pytest.raises(ProtocolError):
        d.server.share_keys("c00", {**cts, "c01": b"\x00" * 10})  # impossibly short
    with pytest.raises(ProtocolError):
        d.server.share_keys("zz", cts)
    d.server.share_keys("c00", cts)
    with pytest.raises(ProtocolError):
        d.server.share_keys("c00", cts)  # twice


# === 8. freshness ====================================================================================================


def test_fresh_keys_and_seeds_per_session():
    p = params()
    a, b = ClientSession("c00", p), ClientSession("c00", p)
    assert len({a.c_sk, a.s_sk, a.b, b.c_sk, b.s_sk, b.b}) == 6
    assert len({a.c_pk, a.s_pk, b.c_pk, b.s_pk}) == 4
    assert a.advertise(1).commit != b.advertise(1).commit


def test_different_attempts_different_masks_same_result():
    cids = ids(5)
    layout = (Part("w", (2000,), 1.0), Part("k", (10,), 4.0, weighted=False, integer=True))
    vecs = make_vectors(cids, layout, np.random.default_rng(29))
    weights = {c: 3 + i for i, c in enumerate(cids)}
    ys, results = [], []
    for attempt in (0, 1, 1):  # a new attempt, and the same attempt again with fresh sessions
        got = {}

        def tamper(stage, cid, msg, got=got):
            if stage == "masked_input":
                got[cid] = msg.copy()
            return msg

        p = params(layout, attempt=attempt)
        res, _ = run_local(p, vecs, weights, tamper=tamper)
        check_result(res, vecs, weights, p, u1=cids)
        ys.append(got)
        results.append(res)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        for c in cids:
            assert np.count_nonzero(ys[i][c] == ys[j][c]) < 5  # the masks differ everywhere
        assert np.array_equal(results[i].parts["k"], results[j].parts["k"])
        assert np.abs(results[i].parts["w"] - results[j].parts["w"]).max() <= 2 * results[i].err_bound


# === 9. known answer for the mask derivation =========================================================================


@pytest.mark.parametrize("bits", [32, 64])
def test_masks_known_answer_and_server_removes_exactly_prg_b(bits, monkeypatch):
    cids = ids(6)
    p = params((Part("w", (300,), 1.0), Part("k", (7,), 3.0, weighted=False, integer=True)), bits=bits,
               run="kat", rnd=4, attempt=2)
    assert p.ctx == ref_ctx("kat", 4, 2)
    m = p.m
    dt = np.uint32 if bits == 32 else np.uint64
    sums: list[np.ndarray] = []
    orig_decode = protocol.decode

    def spy(z, *a, **k):
        sums.append(z.copy())
        return orig_decode(z, *a, **k)

    monkeypatch.setattr(protocol, "decode", spy)
    vecs = make_vectors(cids, p.layout, np.random.default_rng(30))
    d = Drive(p, vecs, {c: 10 + i for i, c in enumerate(cids)})
    d.advertise().share_keys(drop={"c05"}).masked_input(drop={"c02"})
    u2, u3 = d.server.u2, d.server.u3
    assert u3 == ["c00", "c01", "c03", "c04"] and u2 == ["c00", "c01", "c02", "c03", "c04"]
    spk = {c: d.clients[c].s_pk for c in cids}
    pair = {}
    for u in u2:
        for v in u2:
            if u < v:
                seed = ref_pair_seed(d.secret[u][1], spk[v], p.ctx, u, v)
                assert seed == ref_pair_seed(d.secret[v][1], spk[u], p.ctx, v, u)  # both ends agree
                pair[u, v] = ref_prg(seed, m, bits)
    # each y_u = enc_u + PRG(b_u) + Σ_{v ∈ U2, v ≠ u} ±PRG(pair key) (+ if u < v), in Z_2^b
    for u in u3:
        want = d.enc[u].astype(dt) + ref_prg(d.secret[u][2], m, bits)
        for v in u2:
            if v != u:
                want = want + pair[u, v] if u < v else want - pair[v, u]
        assert np.array_equal(d.y[u], want), u
    res = d.unmask()
    (z,) = sums
    # what the server removed: Σ PRG(b_u) over U3 and the pairwise masks of the dropped c02 with each survivor
    removed = ring_sum([d.y[u] for u in u3], bits) - z
    want_removed = ring_sum([ref_prg(d.secret[u][2], m, bits) for u in u3], bits)
    for u in u3:
        want_removed = want_removed + pair[u, "c02"] if u < "c02" else want_removed - pair["c02", u]
    assert np.array_equal(removed, want_removed)
    assert np.array_equal(z, ring_sum([d.enc[u] for u in u3], bits))  # the unmasked sum is exactly Σ enc_u
    check_result(res, vecs, d.weights, p, u1=[c for c in cids], factor=1.0 if bits == 32 else 4.0)


def test_no_client_weighs_more_than_max_share():
    """A client advertising 10^6 examples (the others 600 and 647) is counted as 1247 (half the round) when
    max_share = 0.5: the secure mean equals the plain mean with those weights; a roster that would raise a client's
    weight above what it advertised is refused."""
    cids, m = ids(3), 200
    p = params((Part("w", (m,), 1.0),), bits=64, max_weight=2**21, max_share=0.5)
    vecs = make_vectors(cids, p.layout, np.random.default_rng(3), spread=0.5)
    res, _ = run_local(p, vecs, {"c00": 10**6, "c01": 600, "c02": 647})
    assert res.weights == {"c00": 1247, "c01": 600, "c02": 647}
    want = sum(res.weights[c] * np.clip(vecs[c]["w"], -1, 1) for c in cids) / sum(res.weights.values())
    assert np.abs(res.parts["w"] - want).max() <= res.err_bound
    s = ClientSession("c00", p)
    s.advertise(5)
    peers = {v: Peer(i + 2, bytes([i + 1]) * 32, bytes([i + 9]) * 32) for i, v in enumerate(["c01", "c02"])}
    with pytest.raises(ProtocolError, match="weight 6; it advertised 5"):
        s.share_keys(Roster(1, peers, 20, 3, 6))
