"""SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020): the coordinator learns Σ_u y_u of the surviving
clients' masked vectors and nothing about any one of them.

Per client u and attempt (ctx = run | round | attempt), all fresh: two X25519 key pairs (c_u: share encryption,
s_u: mask agreement; separate, so revealing s_v of a dropped v opens no ciphertext of v) and a 32-byte self-mask seed
b_u, committed to at advertise (H(b_u ‖ ctx ‖ u)).

  0 advertise     u → server: pk_c, pk_s, commit, weight w_u.                 U1 = advertisers
  1 share keys    server → u: its neighbours N(u) in a graph over U1 (complete, or a random k-regular Harary graph
                  when k < |U1|−1: SecAgg+), their keys, Shamir x-coordinates, Σw and |U1| (the encoding's scales).
                  u → server: for each v ∈ N(u), AES-GCM under HKDF(X25519(c_u, pk_c_v), ctx|enc|u,v) with
                  AAD ctx|share|u|v, of (b-share, s-share) for v (t-of-|N(u)|+1 sharing, u keeps its own).  U2
  2 masked input  server → u: the ciphertexts addressed to u from N(u) ∩ U2.
                  u → server: y_u = w_u·Q(x_u) + PRG(b_u) + Σ_{v ∈ N(u)∩U2} ±PRG(HKDF(X25519(s_u, pk_s_v))) mod 2^b
                  (+ if u < v, − otherwise: pairwise masks cancel in the sum). Under distributed DP
                  w_u·Q(x_u) is CondRound(s·x_u) + Skellam noise (fedtune.secagg.noise).                       U3
  3 unmask        server → u: survivors N(u) ∩ U3, dropped N(u) ∩ (U2 ∖ U3). u refuses overlapping lists, ids it
                  did not mask with, too few survivors, a second unmask; else returns the b-shares of survivors
                  (itself included) and the s-shares of the dropped, and forgets its secrets.
                  Server: b_v for v ∈ U3 (checked against the commitment), s_v for v ∈ U2∖U3 (checked against
                  pk_s_v), wrong shares found and their senders named (fedtune.secagg.crypto.recover);
                  z = Σ y − Σ PRG(b_v) ∓ the dropped clients' pairwise masks, decoded (fedtune.secagg.encode).
A client lost before stage 2 is simply left out (no one masked with it); lost after, its pairwise masks are removed
with its reconstructed s_v. Every stage's server-side check that fails is an `Abort` of the attempt (the round
retries with a fresh sample and fresh keys), never a wrong sum.

Threat model: an honest-but-curious coordinator and fewer than t colluding clients. The coordinator issues the
clients' credentials, so a coordinator that impersonates clients (or shows different clients different lists) is
not defended against; neither is a client that sends a well-formed but wrong vector (its bound is checked, no more).
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.secagg import crypto
from fedtune.secagg.encode import (
    EncodingError,
    Layout,
    Part,
    capped_counts,
    decode,
    encode,
    error_bound,
    length,
    ring_dtype,
    scales,
)
from fedtune.secagg.noise import NoiseParams, encode_noised, ring_holds, rounded_l2_bound, tail

MASKED = "secagg/y"  # the one tensor of an update under secure aggregation: y_u in Z_2^b (an int32/int64 view)
SHARE_BYTES = 66  # a Shamir share value < 2^521
MAX_CLIENTS = 100_000
COMPLETE_UP_TO = 50  # auto degree: a complete graph up to this many clients, SecAgg+'s sparse graph above


class ProtocolError(ValueError):
    """A message that breaks the protocol (malformed, out of turn, or hostile): the message names the problem."""


class Abort(RuntimeError):
    """This attempt cannot finish: `stage` where, `culprits` the clients named (may be empty)."""

    def __init__(self, stage: str, reason: str, culprits: Sequence[str] = ()) -> None:
        super().__init__(f"secure aggregation aborted at {stage}: {reason}")
        self.stage, self.reason, self.culprits = stage, reason, sorted(culprits)


def threshold(holders: int, fraction: float) -> int:
    """t for a secret shared among `holders` clients: ⌈fraction·holders⌉, at least 2 (never more than holders)."""
    return min(holders, max(2, math.ceil(fraction * holders - 1e-9)))


def auto_degree(n: int, degree: int = 0) -> int:
    """Neighbours per client: `degree` when set (made even, at most n−1); else n−1 (complete) up to
    COMPLETE_UP_TO clients, and above that max(20, 4·⌈log2 n⌉) rounded up to even (SecAgg+: O(log n))."""
    if degree <= 0:
        degree = n - 1 if n <= COMPLETE_UP_TO else max(20, 4 * math.ceil(math.log2(n)))
    degree += degree % 2
    return min(n - 1, degree)


# -- values that travel --------------------------------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(v: Any, what: str, size: int | None = None, max_size: int = 4096) -> bytes:
    if not isinstance(v, str) or len(v) > 4 * max_size // 3 + 4:
        raise ProtocolError(f"{what} must be a base64 string of at most {max_size} bytes")
    try:
        b = base64.b64decode(v.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ProtocolError(f"{what} is not valid base64") from None
    if size is not None and len(b) != size:
        raise ProtocolError(f"{what} must be {size} bytes, got {len(b)}")
    return b


def _id(v: Any, what: str = "a client id") -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 128:
        raise ProtocolError(f"{what} must be a string of 1–128 characters")
    return v


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {str(v)[:40]}")
    return v


def _dict(v: Any, what: str, max_len: int = MAX_CLIENTS) -> dict:
    if not isinstance(v, dict) or len(v) > max_len:
        raise ProtocolError(f"{what} must be a map of at most {max_len} entries")
    return v


@dataclass(frozen=True)
class RoundParams:
    """What the coordinator fixes for one attempt; travels in the task (train config "secagg")."""

    run: str
    round: int
    attempt: int
    bits: int
    threshold: float  # share of a neighbourhood (the client included) whose shares rebuild a secret
    degree: int  # neighbours per client; 0: auto_degree
    weights: str  # "examples" (w_u = the client's training examples) | "uniform" (w_u = 1)
    max_weight: int
    layout: Layout
    min_survivors: int = 3
    l2_clip: float = 0.0  # > 0: each client scales its whole vector to L2 ≤ l2_clip before encoding (client-level DP)
    max_share: float = 0.0  # in (0, 1): no client's weight above this share of the attempt's (encode.capped_counts)
    noise: NoiseParams | None = None  # distributed DP: each client adds Skellam noise before masking (secagg.noise)

    @property
    def ctx(self) -> bytes:
        return crypto.context(self.run, self.round, self.attempt)

    @property
    def m(self) -> int:
        return length(self.layout)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "attempt": self.attempt, "bits": self.bits,
                "threshold": self.threshold, "degree": self.degree, "weights": self.weights,
                "max_weight": self.max_weight, "min_survivors": self.min_survivors, "l2_clip": self.l2_clip,
                "max_share": self.max_share, "noise": self.noise.to_dict() if self.noise else None,
                "layout": [p.to_dict() for p in self.layout]}

    @classmethod
    def from_dict(cls, d: Any) -> RoundParams:
        d = _dict(d, "secagg params", 16)
        keys = {"run", "round", "attempt", "bits", "threshold", "degree", "weights", "max_weight", "min_survivors",
                "layout", "l2_clip", "max_share", "noise"}
        d = {"noise": None, **d}  # a coordinator from before distributed DP sends none
        if set(d) != keys:
            raise ProtocolError(f"secagg params need exactly {sorted(keys)}, got {sorted(map(str, d))[:12]}")
        thr, l2, share = d["threshold"], d["l2_clip"], d["max_share"]
        if not isinstance(l2, float | int) or isinstance(l2, bool) or not 0 <= l2 < math.inf:
            raise ProtocolError(f"secagg l2_clip must be a number ≥ 0, got {str(l2)[:20]}")
        if not isinstance(share, float | int) or isinstance(share, bool) or not 0 <= share <= 1:
            raise ProtocolError(f"secagg max_share must be in [0, 1], got {str(share)[:20]}")
        if not isinstance(thr, float | int) or isinstance(thr, bool) or not 0.5 <= thr <= 1:
            raise ProtocolError(f"secagg threshold must be in [0.5, 1], got {str(thr)[:20]}")
        if type(d["bits"]) is not int or d["bits"] not in (32, 64) or d["weights"] not in ("examples", "uniform"):
            raise ProtocolError("secagg bits must be 32 or 64 and weights examples or uniform")
        if not isinstance(d["layout"], list) or not 0 < len(d["layout"]) <= 4096:
            raise ProtocolError("secagg layout must be a list of 1–4096 parts")
        try:
            layout = tuple(Part.from_dict(p) for p in d["layout"])
        except EncodingError as e:
            raise ProtocolError(str(e)) from None
        if length(layout) > 2**31:
            raise ProtocolError("secagg layout is larger than 2^31 elements")
        if len({p.name for p in layout}) != len(layout):
            raise ProtocolError("secagg layout repeats a part name")
        noise = None
        if d["noise"] is not None:
            try:
                noise = NoiseParams.from_dict(d["noise"])
            except EncodingError as e:
                raise ProtocolError(str(e)) from None
            if not (l2 > 0 and d["weights"] == "uniform" and not any(p.integer or p.weighted for p in layout)):
                raise ProtocolError("distributed-DP noise needs an L2 clip, uniform weights and unweighted real parts")
            if noise.l2_bound < rounded_l2_bound(noise.scale * l2, length(layout)) * (1 - 1e-12):
                raise ProtocolError(f"distributed-DP l2_bound {noise.l2_bound:.6g} is below what conditional rounding "
                                    f"can keep (scale {noise.scale:.6g}, L2 clip {l2:g})")
        return cls(_id(d["run"], "run"), _int(d["round"], "round", 0, 2**31), _int(d["attempt"], "attempt", 0, 2**31),
                   d["bits"], float(thr), _int(d["degree"], "degree", 0, MAX_CLIENTS), d["weights"],
                   _int(d["max_weight"], "max_weight", 1, 2**40), layout,
                   _int(d["min_survivors"], "min_survivors", 2, MAX_CLIENTS), float(l2), float(share), noise)

    def scales(self, total_weight: int, n: int) -> list[float]:
        """Each part's scale for an attempt of n clients with total weight Σw (EncodingError: the ring cannot hold
        their sum). Distributed DP: the run's one scale, checked against the noised sum of n clients."""
        if self.noise is None:
            return scales(self.layout, self.bits, total_weight, n)
        if not ring_holds(self.noise, max(p.clip for p in self.layout), n, self.m, self.bits):
            raise EncodingError(f"secagg: a {self.bits}-bit ring cannot hold the noised sum of {n} clients at scale "
                                f"{self.noise.scale:.6g}")
        return [self.noise.scale] * len(self.layout)

    def noise_floor(self) -> float:
        """The σ the summed noise reaches at least: every client refuses to unmask a sum of fewer than min_survivors
        clients, each adding μ (0 without distributed DP)."""
        return math.sqrt(self.min_survivors * self.noise.mu) / self.noise.l2_bound if self.noise is not None else 0.0

    def noise_tail(self, n: int) -> float:
        """How far n clients' summed noise may reach (0 without distributed DP): the decode range check's allowance."""
        return tail(n * self.noise.mu, self.m) if self.noise is not None else 0.0


@dataclass(frozen=True)
class Advertise:
    pk_c: bytes
    pk_s: bytes
    commit: bytes
    weight: int

    def to_dict(self) -> dict:
        return {"pk_c": _b64(self.pk_c), "pk_s": _b64(self.pk_s), "commit": _b64(self.commit), "weight": self.weight}

    @classmethod
    def from_dict(cls, d: Any) -> Advertise:
        d = _dict(d, "advertise", 4)
        return cls(_unb64(d.get("pk_c"), "pk_c", 32), _unb64(d.get("pk_s"), "pk_s", 32),
                   _unb64(d.get("commit"), "commit", 32), _int(d.get("weight"), "weight", 1, 2**40))


@dataclass(frozen=True)
class Peer:
    x: int
    pk_c: bytes
    pk_s: bytes


@dataclass(frozen=True)
class Roster:
    """Stage 1, server → u: u's Shamir x-coordinate, its neighbours, Σ w and |U1| (the encoding's scales)."""

    x: int
    peers: dict[str, Peer]
    total_weight: int
    n: int
    weight: int = 0  # the weight this client encodes with: its own, or less when capped (RoundParams.max_share)

    def to_dict(self) -> dict:
        return {"x": self.x, "total_weight": self.total_weight, "n": self.n, "weight": self.weight,
                "peers": {v: [p.x, _b64(p.pk_c), _b64(p.pk_s)] for v, p in self.peers.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> Roster:
        d = _dict(d, "roster", 5)
        peers = {}
        for v, p in _dict(d.get("peers"), "roster peers").items():
            if not isinstance(p, list) or len(p) != 3:
                raise ProtocolError("a roster peer must be [x, pk_c, pk_s]")
            peers[_id(v)] = Peer(_int(p[0], "x", 1, MAX_CLIENTS), _unb64(p[1], "pk_c", 32), _unb64(p[2], "pk_s", 32))
        return cls(_int(d.get("x"), "x", 1, MAX_CLIENTS), peers, _int(d.get("total_weight"), "total_weight", 1, 2**62),
                   _int(d.get("n"), "n", 1, MAX_CLIENTS), _int(d.get("weight"), "weight", 1, 2**40))


def _cts_to_dict(cts: Mapping[str, bytes]) -> dict:
    return {v: _b64(c) for v, c in cts.items()}


def _cts_from_dict(d: Any, what: str) -> dict[str, bytes]:
    return {_id(v): _unb64(c, f"{what} ciphertext", max_size=512) for v, c in _dict(d, what).items()}


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, d: Any) -> UnmaskRequest:
        d = _dict(d, "unmask request", 2)
        lists = [d.get("survivors"), d.get("dropped")]
        if not all(isinstance(v, list) and len(v) <= MAX_CLIENTS for v in lists):
            raise ProtocolError("an unmask request needs the lists survivors and dropped")
        return cls(tuple(_id(v) for v in lists[0]), tuple(_id(v) for v in lists[1]))


@dataclass(frozen=True)
class UnmaskReply:
    b: dict[str, int]  # owner → share of b_owner (owner survived)
    s: dict[str, int]  # owner → share of s_owner (owner dropped)

    def to_dict(self) -> dict:
        enc = lambda v: _b64(v.to_bytes(SHARE_BYTES, "big"))
        return {"b": {k: enc(v) for k, v in self.b.items()}, "s": {k: enc(v) for k, v in self.s.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> UnmaskReply:
        d = _dict(d, "unmask reply", 2)
        dec = lambda v: int.from_bytes(_unb64(v, "a share", SHARE_BYTES), "big")
        return cls({_id(k): dec(v) for k, v in _dict(d.get("b"), "b shares").items()},
                   {_id(k): dec(v) for k, v in _dict(d.get("s"), "s shares").items()})


@dataclass
class SecureSum:
    """What an attempt that finished hands the engine: the decoded parts ({name: float64 array}; weighted parts are
    Σ w_u x_u / Σ w_u, the others Σ_u x_u), whose vectors they sum, and what it cost."""

    parts: dict[str, np.ndarray]
    participants: list[str]
    weights: dict[str, int]
    err_bound: float
    stats: dict[str, float] = field(default_factory=dict)
    bad_shares: list[str] = field(default_factory=list)  # clients whose shares were wrong (the sum is still right)


def _pair_key(priv: bytes, pk_other: bytes, ctx: bytes, purpose: str, a: str, b: str) -> bytes:
    """The key two clients a, b share for `purpose` ("mask": from the s key pairs, "enc": from the c key pairs):
    HKDF over their X25519 secret, bound to the attempt and to the pair (in a fixed order)."""
    lo, hi = sorted((a, b))
    return crypto.kdf(crypto.agree(priv, pk_other), crypto.info(ctx, purpose, lo, hi))


# -- client --------------------------------------------------------------------------------------------------------
class ClientSession:
    """One client's side of one attempt. Secrets live in this object only and are dropped after the unmask (or by
    `wipe`). `unmasked`: the contexts this client has already unmasked (shared across sessions): a second unmask of
    one attempt is refused."""

    def __init__(self, cid: str, params: RoundParams, unmasked: set[bytes] | None = None) -> None:
        self.cid, self.params = cid, params
        self.ctx = params.ctx
        self.unmasked = unmasked if unmasked is not None else set()
        if self.ctx in self.unmasked:
            raise ProtocolError(f"attempt {params.attempt} of round {params.round} was already unmasked by {cid}")
        self.c_sk, self.c_pk = crypto.new_keypair()
        self.s_sk, self.s_pk = crypto.new_keypair()
        self.b = secrets.token_bytes(32)
        self.stage = "new"
        self.roster: Roster | None = None
        self.t = 0
        self.own: tuple[int, int] = (0, 0)  # own (b-share, s-share)
        self.held: dict[str, tuple[int, int]] = {}  # from v ∈ N(u) ∩ U2: (b-share, s-share)
        self.weight = 0

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolError(f"secagg message out of turn: {self.cid} is at stage {self.stage!r}, not {stage!r}")

    def advertise(self, weight: int) -> Advertise:
        self._expect("new")
        p = self.params
        w = 1 if p.weights == "uniform" else int(weight)
        if not 1 <= w <= p.max_weight:
            raise ProtocolError(f"weight {w} is outside [1, {p.max_weight}]")
        self.weight, self.stage = w, "advertised"
        return Advertise(self.c_pk, self.s_pk, crypto.commit(self.b, self.ctx, self.cid), w)

    def share_keys(self, roster: Roster) -> dict[str, bytes]:
        """Check the roster; the encrypted shares of b_u and s_u for each neighbour."""
        self._expect("advertised")
        p, peers = self.params, roster.peers
        if self.cid in peers:
            raise ProtocolError("the roster lists this client as its own neighbour")
        if not peers:
            raise ProtocolError("the roster has no neighbours")
        xs = [roster.x, *(q.x for q in peers.values())]
        if len(set(xs)) != len(xs):
            raise ProtocolError("the roster gives two clients the same x-coordinate")
        keys = [self.c_pk, self.s_pk, *(k for q in peers.values() for k in (q.pk_c, q.pk_s))]
        if len(set(keys)) != len(keys):
            raise ProtocolError("the roster repeats a public key (a substituted or replayed key)")
        if not 1 <= roster.weight <= self.weight:
            raise ProtocolError(f"the roster gives this client weight {roster.weight}; it advertised {self.weight}")
        self.weight = roster.weight  # capped by the coordinator (max_share), never raised
        if not len(peers) + 1 <= roster.n or roster.total_weight < self.weight:
            raise ProtocolError("the roster's client count or total weight is smaller than what it lists")
        self.t = threshold(len(peers) + 1, p.threshold)
        if len(peers) + 1 < max(self.t, p.min_survivors):
            raise ProtocolError(f"{len(peers)} neighbours are too few for threshold {self.t}")
        try:
            self.scales = p.scales(roster.total_weight, roster.n)
        except EncodingError as e:
            raise ProtocolError(str(e)) from None
        order = sorted(peers)
        bs = crypto.split(crypto.to_int(self.b), self.t, [roster.x, *(peers[v].x for v in order)])
        ss = crypto.split(crypto.to_int(self.s_sk), self.t, [roster.x, *(peers[v].x for v in order)])
        self.own = (bs[0], ss[0])
        out = {}
        for v, b_sh, s_sh in zip(order, bs[1:], ss[1:], strict=True):
            try:
                key = _pair_key(self.c_sk, peers[v].pk_c, self.ctx, "enc", self.cid, v)
            except crypto.CryptoError as e:
                raise ProtocolError(f"the roster's key of {v} is unusable: {e}") from None
            pt = b_sh.to_bytes(SHARE_BYTES, "big") + s_sh.to_bytes(SHARE_BYTES, "big")
            out[v] = crypto.seal(key, pt, crypto.info(self.ctx, "share", self.cid, v))
        self.roster, self.stage = roster, "shared"
        return out

    def receive_inbox(self, inbox: Mapping[str, bytes]) -> None:
        """Decrypt the shares addressed to this client (ProtocolError naming the sender of one that does not open:
        report it). The senders are N(u) ∩ U2: the clients this client masks with."""
        self._expect("shared")
        peers = self.roster.peers
        if unknown := sorted(set(inbox) - set(peers)):
            raise ProtocolError(f"the inbox holds shares from {unknown[:3]}, not neighbours of {self.cid}")
        held = {}
        for v in sorted(inbox):
            try:
                key = _pair_key(self.c_sk, peers[v].pk_c, self.ctx, "enc", v, self.cid)
                pt = crypto.open_sealed(key, inbox[v], crypto.info(self.ctx, "share", v, self.cid))
            except crypto.CryptoError:
                raise ProtocolError(f"the shares from {v} do not decrypt (sender {v})") from None
            if len(pt) != 2 * SHARE_BYTES:
                raise ProtocolError(f"the shares from {v} have {len(pt)} bytes (sender {v})")
            held[v] = (int.from_bytes(pt[:SHARE_BYTES], "big"), int.from_bytes(pt[SHARE_BYTES:], "big"))
        if len(held) + 1 < self.t:
            raise ProtocolError(f"only {len(held)} neighbours sent shares; threshold {self.t}")
        self.held, self.stage = held, "received"

    def masked_input(self, parts: Mapping[str, np.ndarray], rng: np.random.Generator | None = None,
                     ) -> tuple[np.ndarray, int]:
        """(y_u [m] in the ring, coordinates clipped)."""
        self._expect("received")
        p = self.params
        if p.l2_clip > 0:  # client-level DP: this client's contribution has L2 norm ≤ C
            norm = math.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in parts.values()))
            if norm > p.l2_clip:
                parts = {k: np.asarray(v, np.float64) * (p.l2_clip / norm) for k, v in parts.items()}
        rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        try:
            y, clipped = (encode_noised(parts, p.layout, p.noise, p.bits, rng) if p.noise is not None
                          else encode(parts, p.layout, self.scales, self.weight, p.bits, rng))
        except EncodingError as e:
            raise ProtocolError(str(e)) from None
        m = y.size
        y += crypto.prg(self.b, m, p.bits)
        for v in sorted(self.held):
            mask = crypto.prg(_pair_key(self.s_sk, self.roster.peers[v].pk_s, self.ctx, "mask", self.cid, v), m, p.bits)
            if self.cid < v:
                y += mask
            else:
                y -= mask
        self.stage = "masked"
        return y, clipped

    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """The shares the server may have, after checking the request (ProtocolError: refused, secrets kept unused)."""
        if self.ctx in self.unmasked:
            raise ProtocolError(f"{self.cid} already unmasked attempt {self.params.attempt} of round {self.params.round}")
        self._expect("masked")
        surv, drop = set(req.survivors), set(req.dropped)
        if len(surv) != len(req.survivors) or len(drop) != len(req.dropped):
            raise ProtocolError("the unmask request repeats a client")
        if both := sorted(surv & drop):
            raise ProtocolError(f"the unmask request lists {both[:3]} as both survived and dropped")
        if unknown := sorted((surv | drop) - set(self.held)):
            raise ProtocolError(f"the unmask request names {unknown[:3]}, not clients {self.cid} masked with")
        if len(surv) + 1 < max(self.t, self.params.min_survivors):
            raise ProtocolError(f"the unmask request has {len(surv) + 1} survivors; at least "
                                f"{max(self.t, self.params.min_survivors)} needed")
        reply = UnmaskReply({self.cid: self.own[0], **{v: self.held[v][0] for v in sorted(surv)}},
                            {v: self.held[v][1] for v in sorted(drop)})
        self.unmasked.add(self.ctx)
        self.wipe()
        self.stage = "done"
        return reply

    def wipe(self) -> None:
        self.c_sk = self.s_sk = self.b = b""
        self.held, self.own = {}, (0, 0)
        self.stage = "done"

    # A transport whose client handles each message in a fresh process (Flower) keeps the session between messages
    # in the client's own memory-only state (Flower's Context.state), as these JSON-able values.
    def to_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "c_sk": _b64(self.c_sk), "s_sk": _b64(self.s_sk), "b": _b64(self.b),
                "c_pk": _b64(self.c_pk), "s_pk": _b64(self.s_pk), "weight": self.weight, "t": self.t,
                "roster": self.roster.to_dict() if self.roster is not None else None, "own": [str(v) for v in self.own],
                "held": {v: [str(b), str(s)] for v, (b, s) in self.held.items()}}

    @classmethod
    def from_state(cls, cid: str, params: RoundParams, st: dict[str, Any], unmasked: set[bytes]) -> ClientSession:
        """The session saved by `to_state` (this client's own record; ProtocolError when it does not parse)."""
        self = cls.__new__(cls)
        self.cid, self.params, self.ctx, self.unmasked = cid, params, params.ctx, unmasked
        try:
            self.stage, self.weight, self.t = str(st["stage"]), int(st["weight"]), int(st["t"])
            self.c_sk, self.s_sk, self.b = (base64.b64decode(st[k]) for k in ("c_sk", "s_sk", "b"))
            self.c_pk, self.s_pk = base64.b64decode(st["c_pk"]), base64.b64decode(st["s_pk"])
            self.roster = Roster.from_dict(st["roster"]) if st["roster"] is not None else None
            self.own = (int(st["own"][0]), int(st["own"][1]))
            self.held = {v: (int(b), int(s)) for v, (b, s) in st["held"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"the saved secure-aggregation session does not parse: {e}") from None
        if self.roster is not None:
            self.scales = params.scales(self.roster.total_weight, self.roster.n)
        return self


# -- server --------------------------------------------------------------------------------------------------------
@dataclass
class _Client:
    adv: Advertise
    weight: int = 0  # the advertised weight, capped
    x: int = 0
    peers: tuple[str, ...] = ()
    t: int = 0
    shares: dict[str, bytes] | None = None
    y: np.ndarray | None = None
    reply: UnmaskReply | None = None


class ServerSession:
    """The coordinator's side of one attempt. Its stages close by the driver's deadlines (`close_*`), each raising
    Abort when the attempt cannot go on. It never holds a client's private key or b_u except those the protocol
    reconstructs (b_v of survivors, s_v of clients dropped after sharing keys)."""

    def __init__(self, params: RoundParams, sampled: Sequence[str], min_clients: int = 1,
                 require: frozenset[str] | None = None) -> None:
        self.params, self.sampled, self.require = params, list(sampled), require
        self.ctx = params.ctx
        self.min_needed = max(params.min_survivors, min_clients)
        self.clients: dict[str, _Client] = {}
        self.stage = "advertise"
        self.u1: list[str] = []
        self.u2: list[str] = []
        self.u3: list[str] = []
        self.reports: dict[str, str] = {}  # reporter → why (undecryptable shares)
        self.total_weight = 0
        self.scales: list[float] = []
        self.bytes_in = 0

    def _stage(self, stage: str, cid: str) -> _Client | None:
        if self.stage != stage:
            raise ProtocolError(f"secagg {stage} from {cid} out of turn (the attempt is at {self.stage})")
        return self.clients.get(cid)

    # stage 0
    def advertise(self, cid: str, adv: Advertise) -> None:
        if cid not in self.sampled:
            raise ProtocolError(f"{cid} is not sampled for this attempt")
        if self._stage("advertise", cid) is not None:
            raise ProtocolError(f"{cid} advertised twice")
        p = self.params
        if adv.pk_c == adv.pk_s or not 1 <= adv.weight <= p.max_weight or p.weights == "uniform" and adv.weight != 1:
            raise ProtocolError(f"{cid}'s advertisement is invalid (equal keys or weight {adv.weight} out of range)")
        self.clients[cid] = _Client(adv)

    def close_advertise(self) -> None:
        self.stage = "closed"
        u1 = sorted(self.clients)
        if len(u1) < self.min_needed:
            raise Abort("advertise", f"{len(u1)} of {len(self.sampled)} clients advertised keys; "
                                     f"{self.min_needed} needed")
        keys = [k for c in self.clients.values() for k in (c.adv.pk_c, c.adv.pk_s)]
        if len(set(keys)) != len(keys):
            dup = sorted(c for c, v in self.clients.items() if keys.count(v.adv.pk_c) + keys.count(v.adv.pk_s) > 2)
            raise Abort("advertise", "two clients advertised the same public key", dup)
        n, p = len(u1), self.params
        capped = capped_counts({c: self.clients[c].adv.weight for c in u1}, p.max_share)
        for c in u1:
            self.clients[c].weight = capped[c]
        self.total_weight = sum(capped.values())
        try:
            self.scales = p.scales(self.total_weight, n)
        except EncodingError as e:
            raise Abort("advertise", str(e)) from None
        k = auto_degree(n, p.degree)
        order = u1[:]
        secrets.SystemRandom().shuffle(order)  # the graph must not be predictable by clients
        pos = {c: i for i, c in enumerate(order)}
        for c in u1:
            cl = self.clients[c]
            if k >= n - 1:
                cl.peers = tuple(v for v in u1 if v != c)
            else:
                i = pos[c]
                cl.peers = tuple(sorted({order[(i + d) % n] for d in range(-(k // 2), k // 2 + 1) if d}))
            cl.x = u1.index(c) + 1
            cl.t = threshold(len(cl.peers) + 1, p.threshold)
        self.u1, self.stage = u1, "share_keys"

    def roster_for(self, cid: str) -> Roster:
        cl = self.clients[cid]
        return Roster(cl.x, {v: Peer(self.clients[v].x, self.clients[v].adv.pk_c, self.clients[v].adv.pk_s)
                             for v in cl.peers}, self.total_weight, len(self.u1), cl.weight)

    # stage 1
    def share_keys(self, cid: str, shares: Mapping[str, bytes]) -> None:
        cl = self._stage("share_keys", cid)
        if cl is None:
            raise ProtocolError(f"{cid} did not advertise keys in this attempt")
        if cl.shares is not None:
            raise ProtocolError(f"{cid} sent its shares twice")
        if set(shares) != set(cl.peers):
            raise ProtocolError(f"{cid} sent shares for {len(shares)} clients, not its {len(cl.peers)} neighbours")
        if any(not 28 <= len(c) <= 512 for c in shares.values()):
            raise ProtocolError(f"{cid} sent a ciphertext of an impossible size")
        cl.shares = dict(shares)

    def close_share_keys(self) -> None:
        self.stage = "closed"
        u2 = [c for c in self.u1 if self.clients[c].shares is not None]
        s2 = set(u2)
        if len(u2) < self.min_needed:
            raise Abort("share_keys", f"{len(u2)} of {len(self.u1)} clients shared keys; {self.min_needed} needed")
        for v in u2:
            cl = self.clients[v]
            if sum(1 for w in cl.peers if w in s2) + 1 < cl.t:
                raise Abort("share_keys", f"too few of {v}'s neighbours shared keys for threshold {cl.t}")
        self.u2, self.stage = u2, "masked_input"

    def inbox_for(self, cid: str) -> dict[str, bytes]:
        s2 = set(self.u2)
        return {v: self.clients[v].shares[cid] for v in self.clients[cid].peers if v in s2}

    def report(self, cid: str, why: str) -> None:
        """A client could not use its inbox (a share that does not decrypt): the attempt will abort, naming it."""
        if cid in self.u2 and cid not in self.reports:
            self.reports[cid] = why[:300]

    # stage 2
    def masked_input(self, cid: str, y: np.ndarray, weight: int | None = None) -> None:
        cl = self._stage("masked_input", cid)
        if cl is None or cl.shares is None or cid not in self.u2:
            raise ProtocolError(f"{cid} did not share keys in this attempt; its vector cannot be unmasked")
        if cl.y is not None:
            raise ProtocolError(f"{cid} sent its masked vector twice")
        if y.dtype != ring_dtype(self.params.bits) or y.shape != (self.params.m,):
            raise ProtocolError(f"{cid}'s masked vector is {y.dtype}[{y.size}], expected "
                                f"{ring_dtype(self.params.bits)}[{self.params.m}]")
        if weight is not None and self.params.weights == "examples" and weight != cl.adv.weight:
            raise ProtocolError(f"{cid} reports {weight} examples, it advertised weight {cl.adv.weight}")
        cl.y = y

    def close_masked_input(self) -> None:
        self.stage = "closed"
        if self.reports:
            raise Abort("masked_input", "clients could not decrypt shares: "
                        + "; ".join(f"{c}: {w}" for c, w in sorted(self.reports.items())), sorted(self.reports))
        u3 = [c for c in self.u2 if self.clients[c].y is not None]
        if len(u3) < self.min_needed:
            raise Abort("masked_input", f"{len(u3)} of {len(self.u2)} clients sent masked vectors; "
                                        f"{self.min_needed} needed")
        s3 = set(u3)
        if self.require is not None and s3 != set(self.require):
            raise Abort("masked_input", f"this round was unmasked before over {sorted(self.require)}; summing "
                                        f"{sorted(s3)} instead would expose the difference")
        for v in self.u2:  # every secret the unmask needs must still have t holders that can answer
            cl = self.clients[v]
            if sum(1 for w in cl.peers if w in s3) + (v in s3) < cl.t:
                raise Abort("masked_input", f"too few of {v}'s neighbours are left to rebuild its secret "
                                            f"(threshold {cl.t})")
        self.u3, self.stage = u3, "unmask"

    def unmask_request_for(self, cid: str) -> UnmaskRequest:
        s2, s3 = set(self.u2), set(self.u3)
        peers = self.clients[cid].peers
        return UnmaskRequest(tuple(v for v in peers if v in s3), tuple(v for v in peers if v in s2 and v not in s3))

    # stage 3
    def unmask(self, cid: str, reply: UnmaskReply) -> None:
        cl = self._stage("unmask", cid)
        if cl is None or cid not in self.u3:
            raise ProtocolError(f"{cid} is not a survivor of this attempt")
        if cl.reply is not None:
            raise ProtocolError(f"{cid} sent its shares twice")
        req = self.unmask_request_for(cid)
        if set(reply.b) != {cid, *req.survivors} or set(reply.s) != set(req.dropped):
            raise ProtocolError(f"{cid}'s shares are not for the clients it was asked about")
        cl.reply = reply

    def ready(self) -> bool:
        """Every secret the unmask needs has at least t shares in hand (the driver may stop waiting)."""
        got_b = {v: 0 for v in self.u3}
        got_s = {v: 0 for v in self.u2 if v not in set(self.u3)}
        for c in self.u3:
            r = self.clients[c].reply
            if r is not None:
                for v in r.b:
                    got_b[v] += 1
                for v in r.s:
                    got_s[v] += 1
        # one more than t where possible: a wrong share can then be found and named
        return all(n >= min(self.clients[v].t + 1, self._holders(v)) for v, n in (got_b | got_s).items())

    def _holders(self, v: str) -> int:
        s3 = set(self.u3)
        return sum(1 for w in self.clients[v].peers if w in s3) + (v in s3)

    def finish(self) -> SecureSum:
        """Rebuild the secrets, unmask, decode (Abort naming the clients whose shares were wrong, when a secret
        cannot be rebuilt)."""
        if self.stage != "unmask":
            raise ProtocolError(f"finish at stage {self.stage}")
        self.stage = "closed"
        p, s3 = self.params, set(self.u3)
        points_b: dict[str, list[tuple[int, int, str]]] = {v: [] for v in self.u3}
        points_s: dict[str, list[tuple[int, int, str]]] = {v: [] for v in self.u2 if v not in s3}
        for c in self.u3:
            r = self.clients[c].reply
            if r is None:
                continue
            x = self.clients[c].x
            for v, sh in r.b.items():
                points_b[v].append((x, sh, c))
            for v, sh in r.s.items():
                points_s[v].append((x, sh, c))
        bad: set[str] = set()

        def rebuild(v: str, pts: list[tuple[int, int, str]], check, what: str) -> bytes:
            t = self.clients[v].t
            try:  # t + 1 shares find (and name) one wrong share cheaply; all of them only when that fails
                try:
                    secret, wrong = crypto.recover([(x, y) for x, y, _ in pts[:t + 1]], t, check)
                except crypto.CryptoError:
                    if len(pts) <= t + 1:
                        raise
                    secret, wrong = crypto.recover([(x, y) for x, y, _ in pts], t, check)
            except crypto.CryptoError as e:
                raise Abort("unmask", f"cannot rebuild {what} of {v} from {len(pts)} shares (threshold {t}): {e}",
                            sorted(c for *_, c in pts)) from None
            bad.update(c for x, _, c in pts if x in wrong)
            return crypto.to_bytes32(secret)

        def ok(f):
            def check(secret: int) -> bool:
                try:
                    return f(crypto.to_bytes32(secret))
                except crypto.CryptoError:
                    return False
            return check

        m, bits = p.m, p.bits
        z = np.zeros(m, dtype=ring_dtype(bits))
        for c in self.u3:
            z += self.clients[c].y
        for v in self.u3:
            commit = self.clients[v].adv.commit
            b = rebuild(v, points_b[v], ok(lambda sec, v=v, commit=commit: crypto.commit(sec, self.ctx, v) == commit),
                        "the self-mask seed")
            z -= crypto.prg(b, m, bits)
        for v, pts in points_s.items():
            pk_s = self.clients[v].adv.pk_s
            s_v = rebuild(v, pts, ok(lambda sec, pk_s=pk_s: crypto.public_of(sec) == pk_s), "the mask key")
            for u in self.clients[v].peers:
                if u in s3:  # u masked with v: remove ±PRG(KA(s_u, pk_s_v)) from the sum
                    mask = crypto.prg(_pair_key(s_v, self.clients[u].adv.pk_s, self.ctx, "mask", u, v), m, bits)
                    if u < v:
                        z -= mask
                    else:
                        z += mask
        weights = {c: self.clients[c].weight for c in self.u3}
        try:
            parts = decode(z, p.layout, self.scales, total_weight=sum(weights.values()), n_clients=len(self.u3),
                           bits=bits, max_weight_total=self.total_weight, noise_tail=p.noise_tail(len(self.u3)))
        except EncodingError as e:
            raise Abort("unmask", str(e)) from None
        stats = {"secagg_clients": float(len(self.u3)), "secagg_dropped": float(len(self.sampled) - len(self.u3)),
                 "secagg_bad_shares": float(len(bad))}
        if p.noise is not None:  # the summed Skellam noise's standard deviation per coordinate, in the sum's units
            stats["ddp_noise_std"] = math.sqrt(len(self.u3) * p.noise.mu) / p.noise.scale
        return SecureSum(parts, list(self.u3), weights, error_bound(p.layout, self.scales, len(self.u3)), stats,
                         sorted(bad))
