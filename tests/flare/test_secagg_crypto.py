"""Secure aggregation's primitives: fixed point in Z_{2^32}, X25519, Shamir, the PRG and the share envelopes."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedllm.flare.secagg import crypto
from fedllm.flare.secagg.crypto import SecAggError


@pytest.mark.parametrize(("sites", "clip", "bits"), [(3, 1.0, 28), (8, 1.0, 27), (8, 8.0, 24), (1, 1.0, 30)])
def test_fraction_bits_follow_the_design_formula(sites: int, clip: float, bits: int) -> None:
    assert crypto.value_bits(sites, clip) == bits
    assert crypto.weight_bits(sites) == crypto.value_bits(sites, 1.0)


def test_fraction_bits_refuse_a_clip_the_ring_cannot_hold() -> None:
    with pytest.raises(SecAggError, match="fraction bits"):
        crypto.value_bits(8, 2.0**28)


def test_encode_decode_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    bits = crypto.value_bits(3, 1.0)
    x = np.concatenate([rng.uniform(-1, 1, 10_000), [-1.0, 1.0, 0.0, -(2.0**-bits)]])
    back = crypto.decode(crypto.encode(x, bits), bits)
    assert back.dtype == np.float64
    assert np.max(np.abs(back - x)) <= 2.0 ** -(bits + 1)
    assert crypto.encode(np.array([-1.0]), bits)[0] == 2**32 - 2**bits  # two's complement


def test_the_ring_sum_of_encoded_values_decodes_to_their_sum_within_the_bound() -> None:
    """N sites at the clip edge: the uint32 sum wraps, yet decodes exactly to within N·2^-(f+1)."""
    rng = np.random.default_rng(1)
    n, clip = 8, 2.0
    bits = crypto.value_bits(n, clip)
    values = [rng.uniform(-clip, clip, 5_000) for _ in range(n)]
    for v in values:  # every site at +C, then every site at −C: the extremes the guard bit is for
        v[:10], v[10:20] = clip, -clip
    ring = np.zeros(5_000, dtype=np.uint32)
    for v in values:
        ring += crypto.encode(v, bits)
    exact = np.sum(values, axis=0)
    assert np.max(np.abs(crypto.decode(ring, bits) - exact)) <= n * 2.0 ** -(bits + 1)


def test_x25519_agreement_is_symmetric_and_bound_to_its_info() -> None:
    a_sk, a_pk = crypto.generate_keypair()
    b_sk, b_pk = crypto.generate_keypair()
    c_sk, _ = crypto.generate_keypair()
    ab = crypto.agree(a_sk, b_pk, info=b"pair round 1")
    assert len(ab) == 32
    assert ab == crypto.agree(b_sk, a_pk, info=b"pair round 1")
    assert ab != crypto.agree(a_sk, b_pk, info=b"pair round 2")
    assert ab != crypto.agree(c_sk, b_pk, info=b"pair round 1")
    assert crypto.public_bytes(crypto.private_from_bytes(crypto.private_bytes(a_sk))) == a_pk


def test_x25519_refuses_a_malformed_or_low_order_public_key() -> None:
    a_sk, _ = crypto.generate_keypair()
    with pytest.raises(SecAggError, match="32 bytes"):
        crypto.agree(a_sk, b"short", info=b"x")
    with pytest.raises(SecAggError, match="key agreement failed"):
        crypto.agree(a_sk, bytes(32), info=b"x")  # the identity point: all-zero shared secret


@pytest.mark.parametrize("size", [16, 32])
def test_shamir_any_t_shares_recover_the_secret_and_t_minus_1_do_not(size: int) -> None:
    t, n = 3, 5
    for _ in range(5):
        secret = os.urandom(size)
        shares = crypto.split_secret(secret, t, n)
        assert [index for index, _ in shares] == [1, 2, 3, 4, 5]
        assert all(len(share) == size for _, share in shares)
        for subset in itertools.combinations(shares, t):
            assert crypto.combine_secret(list(subset)) == secret
        for subset in itertools.combinations(shares, t - 1):
            assert crypto.combine_secret(list(subset)) != secret


def test_shamir_refuses_bad_inputs() -> None:
    shares = crypto.split_secret(os.urandom(32), 2, 3)
    with pytest.raises(SecAggError, match="distinct"):
        crypto.combine_secret([shares[0], shares[0]])
    with pytest.raises(SecAggError, match="all be 32"):
        crypto.combine_secret([shares[0], (2, shares[1][1][:16])])
    with pytest.raises(SecAggError, match="16- or 32-byte"):
        crypto.split_secret(os.urandom(24), 2, 3)
    with pytest.raises(SecAggError, match="threshold"):
        crypto.split_secret(os.urandom(16), 4, 3)


def test_seal_opens_only_with_the_same_key_and_aad() -> None:
    key, other = os.urandom(32), os.urandom(32)
    blob = crypto.seal(key, b"shares", b"job|0|site-1|site-2")
    assert crypto.open_sealed(key, blob, b"job|0|site-1|site-2") == b"shares"
    assert crypto.seal(key, b"shares", b"job|0|site-1|site-2") != blob  # a fresh nonce each time
    with pytest.raises(SecAggError, match="authentication"):
        crypto.open_sealed(key, blob, b"job|0|site-2|site-1")
    with pytest.raises(SecAggError, match="authentication"):
        crypto.open_sealed(other, blob, b"job|0|site-1|site-2")
    tampered = bytearray(blob)
    tampered[14] ^= 1
    with pytest.raises(SecAggError, match="authentication"):
        crypto.open_sealed(key, bytes(tampered), b"job|0|site-1|site-2")
    with pytest.raises(SecAggError, match="at least"):
        crypto.open_sealed(key, blob[:20], b"job|0|site-1|site-2")


def test_prg_is_chacha20_keystream_the_same_in_any_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    n = 10_007
    direct = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * n))
    expected = np.frombuffer(direct, dtype="<u4")
    assert np.array_equal(crypto.prg_uint32(key, n), expected)
    monkeypatch.setattr(crypto, "PRG_CHUNK_ELEMENTS", 1000)  # 11 chunks, the last one short
    assert np.array_equal(crypto.prg_uint32(key, n), expected)
    assert not np.array_equal(crypto.prg_uint32(os.urandom(32), n), expected)


def test_prg_add_then_subtract_gives_the_vector_back() -> None:
    x = np.arange(5000, dtype=np.uint32)
    masked = x.copy()
    key = os.urandom(32)
    crypto.add_prg(masked, key)
    assert not np.array_equal(masked, x)
    crypto.add_prg(masked, key, subtract=True)
    assert np.array_equal(masked, x)
    with pytest.raises(SecAggError, match="uint32"):
        crypto.add_prg(np.zeros(4, dtype=np.int64), key)
