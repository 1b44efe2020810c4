"""Cryptographic primitives for secure aggregation; everything but Shamir sharing comes from `cryptography`.

- Key agreement: X25519 (RFC 7748), raw 32-byte private and public keys.
- Key derivation: HKDF-SHA256 (RFC 5869) with no salt; `context` and `info` build its info string by unambiguous,
  length-prefixed concatenation, so keys for different runs, rounds, attempts, purposes and parties never coincide.
- Authenticated encryption: AES-256-GCM (NIST SP 800-38D), a random 12-byte nonce prepended to each ciphertext.
- Pseudorandom generator (masks): the AES-256-CTR keystream (NIST SP 800-38A) under the 32-byte seed from an all-zero
  initial counter block, read as little-endian uint32 or uint64 words.
- Commitments: SHA-256 over a domain tag, the context and the committed secret.
- Secret sharing: Shamir (1979), "How to share a secret", over the prime field GF(2^521 - 1) (a Mersenne prime, so
  any 256-bit secret fits), Lagrange interpolation to reconstruct, and a search over t-subsets (`recover`) that
  tolerates wrong shares given a way to check a candidate secret.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import secrets
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # Shamir field; secrets are < 2**256 so they fit
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"fedtune-secagg/v1"
_COMMIT_DOMAIN = b"fedtune-secagg-commit"
_WORD_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


class CryptoError(ValueError):
    """A failed decryption, a bad key, or bad share input."""


# --- context strings -------------------------------------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    """`data` prefixed by its length as 4 bytes big-endian."""
    if len(data) >= 2**32:
        raise ValueError("field too long for a 4-byte length prefix")
    return len(data).to_bytes(4, "big") + data


def _u64(v: int, name: str) -> bytes:
    v = operator.index(v)
    if not 0 <= v < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v.to_bytes(8, "big")


def context(run: str, rnd: int, attempt: int) -> bytes:
    """Canonical context of one aggregation attempt: domain tag, length-prefixed run id, round, attempt."""
    return _DOMAIN + _lp(run.encode("utf-8")) + _u64(rnd, "rnd") + _u64(attempt, "attempt")


def info(ctx: bytes, purpose: str, *parts: str) -> bytes:
    """HKDF info / AAD string: `ctx`, then the purpose and each part, each length-prefixed (utf-8)."""
    return ctx + _lp(purpose.encode("utf-8")) + b"".join(_lp(p.encode("utf-8")) for p in parts)


# --- key derivation and agreement ------------------------------------------------------------------------------------


def kdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:  # `info` shadows the function: the RFC 5869 name
    """HKDF-SHA256 (RFC 5869), salt=None (equivalent to an all-zero salt of hash length)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair: (private raw 32 bytes, public raw 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def _private_key(private: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(bytes(private))
    except (ValueError, TypeError) as e:
        raise CryptoError(f"bad X25519 private key: {e}") from e


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    return _private_key(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret (32 bytes); CryptoError on a malformed or low-order peer public key."""
    sk = _private_key(private)
    try:
        pk = X25519PublicKey.from_public_bytes(bytes(peer_public))
        return sk.exchange(pk)  # ValueError on the all-zero shared secret (low-order point)
    except (ValueError, TypeError) as e:
        raise CryptoError(f"bad X25519 public key: {e}") from e


# --- pseudorandom generator ------------------------------------------------------------------------------------------


def _check_key(key: bytes, what: str) -> bytes:
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise CryptoError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


_ZEROS = memoryview(bytes(1 << 16))  # encrypted in 64 KiB chunks: no zero buffer as large as the mask


def _keystream(key: bytes, counter_block: bytes, nbytes: int) -> np.ndarray:
    """`nbytes` of the AES-CTR keystream (AES of successive 128-bit big-endian counter blocks) in a writable uint8
    array. The result may be up to 15 bytes longer than asked (update_into's headroom); callers read the first
    `nbytes`. (Measured: one 2 MB zero buffer per mask cost more CPU in page faults than AES itself.)"""
    enc = Cipher(algorithms.AES(key), modes.CTR(counter_block)).encryptor()
    out = np.empty(nbytes + 15, dtype=np.uint8)
    view = memoryview(out)
    for off in range(0, nbytes, len(_ZEROS)):
        k = min(len(_ZEROS), nbytes - off)
        enc.update_into(_ZEROS[:k], view[off:off + k + 15])
    return out


def prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    """`n` pseudorandom words (uint32 for bits=32, uint64 for bits=64): the AES-256-CTR keystream under key=seed
    from an all-zero counter block, read little-endian. Returns a fresh, writable array."""
    seed = _check_key(seed, "PRG seed")
    if bits not in _WORD_DTYPES:
        raise ValueError(f"bits must be 32 or 64, got {bits}")
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dtype = _WORD_DTYPES[bits]
    nbytes = n * dtype.itemsize
    return _keystream(seed, bytes(16), nbytes)[:nbytes].view(dtype)


# --- authenticated encryption and commitments ------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encryption: nonce (12 random bytes) || ciphertext || tag."""
    key = _check_key(key, "AES-GCM key")
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of `seal`; CryptoError on a bad key, a short blob, or a failed authentication."""
    key = _check_key(key, "AES-GCM key")
    blob = bytes(blob)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(f"sealed blob too short ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as e:
        raise CryptoError("authentication failed (wrong key, aad, or tampered ciphertext)") from e


def commit(secret: bytes, ctx: bytes, owner: str) -> bytes:
    """SHA-256 commitment (32 bytes) to `secret`, bound to the context and the owner."""
    return hashlib.sha256(_COMMIT_DOMAIN + info(ctx, "commit", owner) + bytes(secret)).digest()


# --- Shamir secret sharing over GF(PRIME) ----------------------------------------------------------------------------


def _draw_coefficient() -> int:
    """One uniformly random field element (a polynomial coefficient); tests replace it to fix the polynomial."""
    return secrets.randbelow(PRIME)


def split(secret: int, t: int, xs: Sequence[int]) -> list[int]:
    """Shamir shares [f(x) for x in xs] of a random polynomial f of degree t-1 over GF(PRIME) with f(0) = secret."""
    secret, t = operator.index(secret), operator.index(t)
    xs = [operator.index(x) for x in xs]
    if not 1 <= t <= len(xs):
        raise ValueError(f"need 1 <= t <= len(xs), got t={t}, len(xs)={len(xs)}")
    if len(set(xs)) != len(xs):
        raise ValueError("share x coordinates must be distinct")
    if not all(1 <= x < PRIME for x in xs):
        raise ValueError("share x coordinates must be in [1, PRIME)")
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be in [0, PRIME)")
    coeffs = [secret] + [_draw_coefficient() for _ in range(t - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def _points(points: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validated points: integer coordinates, 1 <= x < PRIME, 0 <= y < PRIME, distinct x's."""
    try:
        pts = [(operator.index(x), operator.index(y)) for x, y in points]
    except (TypeError, ValueError) as e:
        raise CryptoError(f"bad share points: {e}") from e
    if len({x for x, _ in pts}) != len(pts):
        raise CryptoError("share x coordinates must be distinct")
    for x, y in pts:
        if not (1 <= x < PRIME and 0 <= y < PRIME):
            raise CryptoError(f"share ({x}, ...) out of the field")
    return pts


def _interpolate(pts: Sequence[tuple[int, int]], at: int) -> int:
    """Value at `at` of the polynomial of degree < len(pts) through the (validated) points, by Lagrange."""
    k = len(pts)
    num, den = [], []
    for j, (xj, _) in enumerate(pts):
        n = d = 1
        for m, (xm, _) in enumerate(pts):
            if m != j:
                n = n * (at - xm) % PRIME
                d = d * (xj - xm) % PRIME
        num.append(n)
        den.append(d)  # nonzero: the x's are distinct field elements
    # a single inversion: sum_j y_j n_j / d_j = (sum_j y_j n_j prod_{i != j} d_i) / prod_i d_i
    prefix = [1] * (k + 1)
    for j in range(k):
        prefix[j + 1] = prefix[j] * den[j] % PRIME
    acc, suffix = 0, 1
    for j in range(k - 1, -1, -1):
        acc = (acc + pts[j][1] * num[j] % PRIME * (prefix[j] * suffix % PRIME)) % PRIME
        suffix = suffix * den[j] % PRIME
    return acc * pow(prefix[k], -1, PRIME) % PRIME


def combine(points: Sequence[tuple[int, int]]) -> int:
    """f(0) of the polynomial through exactly the given (x, y) points (Lagrange interpolation over GF(PRIME))."""
    pts = _points(points)
    if not pts:
        raise CryptoError("no shares to combine")
    return _interpolate(pts, 0)


def recover(
    points: Sequence[tuple[int, int]], t: int, check: Callable[[int], bool], max_tries: int = 2000
) -> tuple[int, list[int]]:
    """Robust reconstruction from shares of which some may be wrong.

    Tries t-subsets of `points`, starting with the first t points, until `check(secret)` holds (a check raising
    CryptoError counts as failing), at most `max_tries` subsets. Subsets are enumerated by the points they leave out
    (itertools.combinations over the complements, the last points left out first), so a single wrong share anywhere
    is left out within the first len(points) tries. Returns (secret, sorted x's of the points not on the winning
    subset's polynomial): the wrong shares. A share whose y is not a field element (not in [0, PRIME)) is wrong by
    definition: it is never used and always named. CryptoError with fewer than t points, invalid or repeated x's, or
    when no subset passes.
    """
    try:
        raw = [(operator.index(x), operator.index(y)) for x, y in points]
    except (TypeError, ValueError) as e:
        raise CryptoError(f"bad share points: {e}") from e
    _points([(x, 0) for x, _ in raw])  # the x's: distinct, in [1, PRIME)
    out_of_field = [x for x, y in raw if not 0 <= y < PRIME]
    pts = [(x, y) for x, y in raw if 0 <= y < PRIME]
    t = operator.index(t)
    if t < 1:
        raise CryptoError(f"threshold must be >= 1, got {t}")
    if len(raw) < t:
        raise CryptoError(f"need at least t={t} shares, got {len(raw)}")
    n = len(pts)
    tried = 0
    subsets = itertools.combinations(range(n - 1, -1, -1), n - t) if n >= t else ()
    for left_out in subsets:
        if tried >= max_tries:
            break
        tried += 1
        out = set(left_out)
        subset = [p for i, p in enumerate(pts) if i not in out]
        secret = _interpolate(subset, 0)
        try:
            ok = check(secret)
        except CryptoError:
            ok = False
        if ok:
            bad = sorted(pts[i][0] for i in out if _interpolate(subset, pts[i][0]) != pts[i][1])
            return secret, sorted(bad + out_of_field)
    raise CryptoError(f"no {t}-subset of the {len(raw)} shares passed the check ({tried} subsets tried)")


# --- integer <-> bytes -----------------------------------------------------------------------------------------------


def to_int(b: bytes) -> int:
    """Big-endian unsigned integer of `b`."""
    return int.from_bytes(b, "big")


def to_bytes32(v: int) -> bytes:
    """`v` as 32 bytes big-endian; CryptoError unless 0 <= v < 2**256."""
    v = operator.index(v)
    if not 0 <= v < 2**256:
        raise CryptoError("value does not fit in 32 bytes")
    return v.to_bytes(32, "big")
