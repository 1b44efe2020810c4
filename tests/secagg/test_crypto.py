"""Known-answer and property tests of fedtune.secagg.crypto (RFC 5869, RFC 7748, NIST SP 800-38A, Shamir)."""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedtune.secagg import crypto
from fedtune.secagg.crypto import (
    KEY_BYTES,
    PRIME,
    CryptoError,
    agree,
    combine,
    commit,
    context,
    info,
    kdf,
    new_keypair,
    open_sealed,
    prg,
    public_of,
    recover,
    seal,
    split,
    to_bytes32,
    to_int,
)

H = bytes.fromhex


# --- HKDF-SHA256: RFC 5869 -------------------------------------------------------------------------------------------


def test_hkdf_rfc5869_test_case_3():
    # A.3: SHA-256, zero-length salt and info; an empty salt is the same as no salt (both become HashLen zeros)
    okm = kdf(b"\x0b" * 22, b"", 42)
    assert okm == H("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_kdf_default_length_and_info_separation():
    assert len(kdf(b"k" * 32, b"x")) == 32
    assert kdf(b"k" * 32, b"x") != kdf(b"k" * 32, b"y")
    assert kdf(b"k" * 32, b"x", 16) == kdf(b"k" * 32, b"x")[:16]  # HKDF-Expand output is a prefix stream


# --- X25519: RFC 7748 section 6.1 ------------------------------------------------------------------------------------

ALICE_PRIV = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIV = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED_K = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_section_6_1():
    assert public_of(ALICE_PRIV) == ALICE_PUB
    assert public_of(BOB_PRIV) == BOB_PUB
    assert agree(ALICE_PRIV, BOB_PUB) == SHARED_K
    assert agree(BOB_PRIV, ALICE_PUB) == SHARED_K


def test_agree_symmetric_for_fresh_keypairs():
    (a_sk, a_pk), (b_sk, b_pk) = new_keypair(), new_keypair()
    assert len(a_sk) == len(a_pk) == KEY_BYTES
    assert public_of(a_sk) == a_pk
    assert a_pk != b_pk
    k = agree(a_sk, b_pk)
    assert len(k) == 32 and k == agree(b_sk, a_pk)
    _, c_pk = new_keypair()
    assert agree(a_sk, c_pk) != k


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33])
def test_agree_bad_public_key_length(bad):
    sk, _ = new_keypair()
    with pytest.raises(CryptoError):
        agree(sk, bad)


@pytest.mark.parametrize("low_order", [bytes(32), b"\x01" + bytes(31)])
def test_agree_low_order_public_key(low_order):
    # u = 0 and u = 1 are small-order points: the shared secret is all zeros, which cryptography refuses
    sk, _ = new_keypair()
    with pytest.raises(CryptoError):
        agree(sk, low_order)


def test_bad_private_key():
    with pytest.raises(CryptoError):
        public_of(b"\x01" * 31)
    with pytest.raises(CryptoError):
        agree(b"\x01" * 33, BOB_PUB)
    assert issubclass(CryptoError, ValueError)


# --- AES-256-CTR: NIST SP 800-38A F.5.5 and the PRG ------------------------------------------------------------------

NIST_KEY = H("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_CTR = H("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PT = H(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)
NIST_CT = H(
    "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def test_keystream_nist_sp800_38a_f55():
    ks = bytes(crypto._keystream(NIST_KEY, NIST_CTR, 64)[:64])
    assert _xor(NIST_PT, ks) == NIST_CT
    # the first output block as printed in F.5.5 (AES of the initial counter block)
    assert ks[:16] == H("0bdf7df1591716335e9a8b15c860c502")


def test_prg_is_aes256_ctr_keystream_from_zero_counter():
    n = 1000
    ref = Cipher(algorithms.AES(NIST_KEY), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
    assert prg(NIST_KEY, n, 32).tobytes() == ref
    assert prg(NIST_KEY, n // 2, 64).tobytes() == ref[: 4 * n]
    # independently: block i of the keystream is AES-ECB of the 128-bit big-endian counter i
    ecb = Cipher(algorithms.AES(NIST_KEY), modes.ECB()).encryptor()
    blocks = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(4)))
    assert prg(NIST_KEY, 16, 32).tobytes() == blocks
    # words are little-endian
    w32, w64 = prg(NIST_KEY, 2, 32), prg(NIST_KEY, 1, 64)
    assert int(w32[0]) == int.from_bytes(ref[:4], "little") and int(w32[1]) == int.from_bytes(ref[4:8], "little")
    assert int(w64[0]) == int.from_bytes(ref[:8], "little")


@pytest.mark.parametrize(("bits", "dtype"), [(32, np.uint32), (64, np.uint64)])
def test_prg_shape_dtype_determinism(bits, dtype):
    seed, other = b"\x11" * 32, b"\x12" * 32
    a = prg(seed, 1001, bits)
    assert a.dtype == dtype and a.shape == (1001,)
    assert np.array_equal(a, prg(seed, 1001, bits))
    assert np.array_equal(a[:10], prg(seed, 10, bits))  # a prefix of the same stream
    assert not np.array_equal(a, prg(other, 1001, bits))
    assert np.count_nonzero(a == prg(other, 1001, bits)) < 5
    a += dtype(1)  # writable, and wraps modulo 2**bits
    empty = prg(seed, 0, bits)
    assert empty.dtype == dtype and empty.shape == (0,)


def test_prg_rejects_bad_arguments():
    with pytest.raises(CryptoError):
        prg(b"\x00" * 16, 4, 32)
    with pytest.raises(ValueError):
        prg(b"\x00" * 32, 4, 16)
    with pytest.raises(ValueError):
        prg(b"\x00" * 32, -1, 32)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("seed", [b"\x00" * 32, b"\xab" * 32, hashlib.sha256(b"fedtune").digest()])
def test_prg_top_byte_roughly_uniform(bits, seed):
    words = prg(seed, 2**16, bits)
    top = (words >> np.uint64(bits - 8)).astype(np.int64) if bits == 64 else (words >> np.uint32(24)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = 2**16 / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd ~22.6; these loose bounds are > 6 sd away
    assert 120 < chi2 < 420, chi2


def test_prg_fast():
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = prg(b"\x07" * 32, 4_000_000, 32)
        best = min(best, time.perf_counter() - t0)
    assert out.shape == (4_000_000,)
    assert best < 0.25, f"prg of 4M uint32 took {best * 1e3:.0f} ms"


# --- AES-256-GCM -----------------------------------------------------------------------------------------------------


def test_seal_roundtrip_and_random_nonce():
    key = b"\x42" * 32
    for pt in (b"", b"x", b"hello world" * 100):
        blob = seal(key, pt, b"aad")
        assert len(blob) == 12 + len(pt) + 16
        assert open_sealed(key, blob, b"aad") == pt
    assert seal(key, b"same", b"") != seal(key, b"same", b"")


def test_open_sealed_failures():
    key = b"\x42" * 32
    blob = seal(key, b"secret share", b"ctx")
    for i in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(CryptoError):
            open_sealed(key, bytes(tampered), b"ctx")
    with pytest.raises(CryptoError):
        open_sealed(key, blob, b"ctx2")
    with pytest.raises(CryptoError):
        open_sealed(b"\x43" * 32, blob, b"ctx")
    with pytest.raises(CryptoError):
        open_sealed(key, blob[:27], b"ctx")
    with pytest.raises(CryptoError):
        open_sealed(key, blob[:-1], b"ctx")
    with pytest.raises(CryptoError):
        open_sealed(b"\x42" * 16, blob, b"ctx")
    with pytest.raises(CryptoError):
        seal(b"\x42" * 31, b"x", b"")


# --- context / info / commit / int conversion ------------------------------------------------------------------------


def test_context_and_info_layout():
    assert context("ab", 1, 2) == b"fedtune-secagg/v1" + b"\x00\x00\x00\x02ab" + bytes(7) + b"\x01" + bytes(7) + b"\x02"
    assert context("é", 0, 0) == b"fedtune-secagg/v1" + b"\x00\x00\x00\x02\xc3\xa9" + bytes(16)  # utf-8 byte length
    ctx = context("r", 3, 0)
    assert info(ctx, "mask", "a", "bc") == ctx + b"\x00\x00\x00\x04mask" + b"\x00\x00\x00\x01a" + b"\x00\x00\x00\x02bc"
    with pytest.raises(ValueError):
        context("r", -1, 0)
    with pytest.raises(ValueError):
        context("r", 0, 2**64)


def test_context_and_info_injective_on_tricky_pairs():
    assert context("a|1", 2, 3) != context("a", 1, 2)
    assert context("a", 256, 0) != context("a\x00", 1, 0)
    assert context("ab", 0, 1) != context("a", 0, 1)
    assert context("r", 1, 2) != context("r", 2, 1)
    ctx = context("run", 1, 0)
    pairs = [
        (("ab", "c"), ("a", "bc")),
        (("p", "a|b"), ("p", "a", "b")),
        (("p", "a", ""), ("p", "a")),
        (("p", ""), ("p",)),
        (("pa", "b"), ("p", "ab")),
    ]
    for left, right in pairs:
        assert info(ctx, *left) != info(ctx, *right), (left, right)
        assert kdf(b"k" * 32, info(ctx, *left)) != kdf(b"k" * 32, info(ctx, *right))


def test_commit():
    ctx = context("run", 1, 0)
    c = commit(b"s" * 32, ctx, "alice")
    assert len(c) == 32
    assert c == hashlib.sha256(b"fedtune-secagg-commit" + info(ctx, "commit", "alice") + b"s" * 32).digest()
    assert c != commit(b"s" * 31 + b"t", ctx, "alice")
    assert c != commit(b"s" * 32, ctx, "bob")
    assert c != commit(b"s" * 32, context("run", 2, 0), "alice")


def test_int_conversions():
    assert to_bytes32(1) == bytes(31) + b"\x01"
    assert to_int(bytes(31) + b"\x01") == 1
    v = 2**256 - 1
    assert to_bytes32(v) == b"\xff" * 32 and to_int(to_bytes32(v)) == v
    x = random.getrandbits(256)
    assert to_int(to_bytes32(x)) == x
    with pytest.raises(CryptoError):
        to_bytes32(2**256)
    with pytest.raises(CryptoError):
        to_bytes32(-1)


# --- Shamir ----------------------------------------------------------------------------------------------------------


def test_shamir_hand_computed(monkeypatch):
    monkeypatch.setattr(crypto, "_draw_coefficient", lambda: 3)
    assert split(7, 2, [1, 2, 3]) == [10, 13, 16]  # f(x) = 7 + 3x
    assert split(7, 3, [1, 2, 3]) == [13, 25, 43]  # f(x) = 7 + 3x + 3x^2
    for pts in ([(1, 10), (2, 13)], [(1, 10), (3, 16)], [(3, 16), (2, 13)], [(1, 10), (2, 13), (3, 16)]):
        assert combine(pts) == 7
    assert combine([(1, 13), (2, 25), (3, 43)]) == 7
    # arithmetic is modulo PRIME: f(x) = (PRIME - 1) + x gives f(1) = 0, f(2) = 1
    assert combine([(1, 0), (2, 1)]) == PRIME - 1
    assert combine([(1, 10)]) == 10  # one point: the constant polynomial


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 5), (2, 2), (2, 10), (5, 7), (5, 100), (67, 67), (67, 100)])
def test_shamir_roundtrip(t, n):
    rng = random.Random(1000 * t + n)
    xs = rng.sample(range(1, 10**6), n)
    for secret in (0, 1, 2**256 - 1, rng.getrandbits(256)):
        shares = split(secret, t, xs)
        assert len(shares) == n and all(0 <= y < PRIME for y in shares)
        pts = list(zip(xs, shares, strict=True))
        assert combine(rng.sample(pts, t)) == secret
        assert combine(pts) == secret  # more than t points lie on the same polynomial
        if t == 1:
            assert shares == [secret] * n
        else:
            assert combine(rng.sample(pts, t - 1)) != secret  # equal with probability 1/PRIME


def test_shamir_fresh_randomness():
    assert split(5, 3, [1, 2, 3]) != split(5, 3, [1, 2, 3])


@pytest.mark.parametrize(
    ("secret", "t", "xs"),
    [
        (1, 0, [1, 2]),
        (1, 3, [1, 2]),
        (1, 1, []),
        (1, 2, [1, 1, 2]),
        (1, 1, [0, 1]),
        (1, 1, [PRIME]),
        (PRIME, 1, [1]),
        (-1, 1, [1]),
    ],
)
def test_split_rejects_bad_input(secret, t, xs):
    with pytest.raises(ValueError):
        split(secret, t, xs)


def test_combine_rejects_bad_input():
    with pytest.raises(CryptoError):
        combine([(1, 5), (1, 6)])
    with pytest.raises(CryptoError):
        combine([])
    with pytest.raises(CryptoError):
        combine([(0, 5), (1, 6)])
    with pytest.raises(CryptoError):
        combine([(1, PRIME), (2, 6)])


def _shares(secret: int, t: int, n: int, seed: int) -> list[tuple[int, int]]:
    xs = random.Random(seed).sample(range(1, 1000), n)
    return list(zip(xs, split(secret, t, xs), strict=True))


def _commit_check(secret: int):
    ctx = context("run", 1, 0)
    expected = commit(to_bytes32(secret), ctx, "alice")
    # to_bytes32 raises CryptoError for the (likely > 2**256) secret of a wrong subset: recover counts it as failing
    return lambda s: commit(to_bytes32(s), ctx, "alice") == expected


@pytest.mark.parametrize("bad_positions", [(0,), (4,), (7,), (0, 1), (2, 6), (6, 7), (0, 7)])
def test_recover_names_exactly_the_wrong_shares(bad_positions):
    t, n = 5, 8  # t + 3 shares
    secret = random.getrandbits(256)
    pts = _shares(secret, t, n, seed=sum(bad_positions))
    for i in bad_positions:
        x, y = pts[i]
        pts[i] = (x, (y + 1 + random.randrange(PRIME - 1)) % PRIME)
    got, bad = recover(pts, t, _commit_check(secret))
    assert got == secret
    assert bad == sorted(pts[i][0] for i in bad_positions)


def test_recover_clean_shares_and_large_threshold():
    secret = random.getrandbits(256)
    pts = _shares(secret, 5, 8, seed=1)
    calls = []
    check = _commit_check(secret)
    assert recover(pts, 5, lambda s: calls.append(s) or check(s)) == (secret, [])
    assert len(calls) == 1
    # the first t points are tried first: a wrong share after them costs one check and is still named
    pts[-1] = (pts[-1][0], (pts[-1][1] + 1) % PRIME)
    calls.clear()
    assert recover(pts, 5, lambda s: calls.append(s) or check(s)) == (secret, [pts[-1][0]])
    assert len(calls) == 1
    # t = 67 of 70, the very first share wrong: found well within max_tries
    pts = _shares(secret, 67, 70, seed=2)
    pts[0] = (pts[0][0], (pts[0][1] + 1) % PRIME)
    assert recover(pts, 67, _commit_check(secret)) == (secret, [pts[0][0]])


def test_recover_out_of_field_share_is_named_not_fatal():
    secret = random.getrandbits(256)
    pts = _shares(secret, 5, 8, seed=4)
    pts[1] = (pts[1][0], pts[1][1] + PRIME)  # same residue, but not a canonical field element
    pts[6] = (pts[6][0], -1)
    assert recover(pts, 5, _commit_check(secret)) == (secret, sorted([pts[1][0], pts[6][0]]))
    with pytest.raises(CryptoError, match="distinct"):
        recover([(1, 2), (1, PRIME)], 1, lambda s: True)
    with pytest.raises(CryptoError, match="0 subsets tried"):  # too few shares left in the field
        recover([(1, 2), (2, PRIME)], 2, lambda s: True)


def test_recover_failures():
    secret = random.getrandbits(256)
    pts = _shares(secret, 5, 8, seed=3)
    with pytest.raises(CryptoError, match="56 subsets tried"):  # C(8, 5)
        recover(pts, 5, lambda s: False)
    with pytest.raises(CryptoError, match="3 subsets tried"):
        recover(pts, 5, lambda s: False, max_tries=3)
    with pytest.raises(CryptoError):
        recover(pts[:4], 5, lambda s: True)
    # four wrong shares out of eight: no 5-subset is all correct, so nothing passes the commitment check
    for i in range(4):
        pts[i] = (pts[i][0], (pts[i][1] + 1) % PRIME)
    with pytest.raises(CryptoError, match="no 5-subset"):
        recover(pts, 5, _commit_check(secret))
    with pytest.raises(CryptoError):
        recover([(1, 2), (1, 3)], 1, lambda s: True)
