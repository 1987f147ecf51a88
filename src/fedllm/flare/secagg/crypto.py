"""The primitives secure aggregation is built from, each taken from a well-kept library.

X25519, HKDF-SHA256, ChaCha20 and AES-GCM come from `cryptography`; Shamir secret sharing over
GF(2^128) from `pycryptodome`. What is fedllm's own here is only how they are glued: the fixed-point
encoding into the ring Z_{2^32} (numpy ``uint32`` arithmetic wraps exactly there) and the chunked
keystream, so masking a 1 GiB update never holds more than one chunk of keystream at once.
"""

from __future__ import annotations

import math
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedllm.errors import FedllmError

KEY_BYTES = 32  # X25519 keys, HKDF outputs, ChaCha20 and AES-256 keys
SHARE_BYTES = 16  # pycryptodome's Shamir works on 16-byte secrets (GF(2^128) elements)
NONCE_BYTES = 12  # AES-GCM nonce, random per envelope
TAG_BYTES = 16
# Keystream is produced and added this many ring elements at a time (16 MiB): bounded memory for any size.
PRG_CHUNK_ELEMENTS = 1 << 22
RING_BITS = 32


class SecAggError(FedllmError):
    """Secure aggregation could not go on: a protocol rule was broken or a message was tampered with."""


# --- key agreement ----------------------------------------------------------------------------------


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key object and the 32 raw public bytes that travel."""
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def derive_key(secret: bytes, *, info: bytes) -> bytes:
    """HKDF-SHA256 of ``secret`` to a 32-byte key; ``info`` names the purpose, job and round."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, *, info: bytes) -> bytes:
    """The 32-byte key both ends derive from X25519(private, peer_public); symmetric in the two parties."""
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {KEY_BYTES} bytes, got {_describe(peer_public)}")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise SecAggError(f"key agreement failed: {exc}") from exc
    return derive_key(shared, info=info)


# --- pseudo-random generator ------------------------------------------------------------------------


def add_prg(out: np.ndarray, key: bytes, *, subtract: bool = False) -> None:
    """Add (or subtract) the ChaCha20 keystream of ``key``, read as little-endian uint32, into ``out`` mod 2^32.

    The keystream is made and added one chunk at a time into a reused buffer, so memory stays at one chunk
    whatever ``out``'s size. Each key is used for one vector only (keys are derived per job, round and pair),
    so the fixed zero nonce is safe.
    """
    if out.dtype != np.uint32 or out.ndim != 1 or not out.flags.c_contiguous:
        raise SecAggError(f"the PRG adds into a flat contiguous uint32 vector, got {out.dtype} {out.shape}")
    if len(key) != KEY_BYTES:
        raise SecAggError(f"a PRG key is {KEY_BYTES} bytes, got {len(key)}")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    chunk = min(PRG_CHUNK_ELEMENTS, max(len(out), 1))
    zeros = memoryview(bytes(chunk * 4))
    keystream = bytearray(chunk * 4 + 64)  # update_into wants room for one more block
    op = np.subtract if subtract else np.add
    for start in range(0, len(out), chunk):
        part = out[start : start + chunk]
        encryptor.update_into(zeros[: len(part) * 4], keystream)
        op(part, np.frombuffer(keystream, dtype="<u4", count=len(part)), out=part)


def prg_uint32(key: bytes, n: int) -> np.ndarray:
    """``n`` uint32 elements of ``key``'s ChaCha20 keystream (the mask ``add_prg`` adds)."""
    out = np.zeros(n, dtype=np.uint32)
    add_prg(out, key)
    return out


# --- Shamir secret sharing --------------------------------------------------------------------------


def split_secret(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """Shares 1..n of a 16- or 32-byte secret; any ``t`` recover it, fewer reveal nothing about it.

    pycryptodome shares 16-byte secrets, so a 32-byte secret (an X25519 private key) is shared as two
    independent 16-byte halves whose shares for the same index are concatenated.
    """
    if len(secret) not in (SHARE_BYTES, 2 * SHARE_BYTES):
        raise SecAggError(f"Shamir shares 16- or 32-byte secrets, got {len(secret)} bytes")
    if not 1 <= t <= n:
        raise SecAggError(f"a Shamir threshold must be in 1..{n} (the number of shares), got {t}")
    halves = [secret[i : i + SHARE_BYTES] for i in range(0, len(secret), SHARE_BYTES)]
    per_half = [Shamir.split(t, n, half) for half in halves]
    return [(index, b"".join(shares[i][1] for shares in per_half)) for i, (index, _) in enumerate(per_half[0])]


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret from exactly the threshold's number of shares (fewer give an unrelated value, not an error)."""
    if not shares:
        raise SecAggError("no Shamir shares to combine")
    size = len(shares[0][1])
    if size not in (SHARE_BYTES, 2 * SHARE_BYTES) or any(len(share) != size for _, share in shares):
        raise SecAggError(f"Shamir shares must all be 16 or all be 32 bytes, got {[len(s) for _, s in shares]}")
    indices = [index for index, _ in shares]
    if len(set(indices)) != len(indices) or any(index < 1 for index in indices):
        raise SecAggError(f"Shamir share indices must be distinct and ≥ 1, got {indices}")
    return b"".join(
        Shamir.combine([(index, share[lo : lo + SHARE_BYTES]) for index, share in shares])
        for lo in range(0, size, SHARE_BYTES)
    )


# --- share envelopes --------------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: random nonce ‖ ciphertext ‖ tag; ``aad`` (not sent) binds the envelope to its context."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of a ``seal`` envelope; SecAggError if it was altered, or sealed for another context."""
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"a sealed share is at least {NONCE_BYTES + TAG_BYTES} bytes, got {_describe(blob)}")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggError(
            "a sealed share failed authentication: it was altered, or sealed for another sender, recipient, "
            "job or round"
        ) from exc


# --- fixed point in Z_{2^32} ------------------------------------------------------------------------


def _ceil_log2(x: float) -> int:
    """The smallest integer e with 2^e ≥ x > 0, exact at powers of two (no log2 rounding)."""
    mantissa, exponent = math.frexp(x)  # x = mantissa · 2^exponent, 0.5 ≤ mantissa < 1
    return exponent - 1 if mantissa == 0.5 else exponent


def value_bits(num_sites: int, clip: float) -> int:
    """Fraction bits f for the values: |Σ of num_sites values in [-clip, clip]| · 2^f stays below 2^30.

    f = 31 − ceil(log2(N·C)) − 1: 31 bits of magnitude in two's complement, one guard bit for the
    nearest-rounding of each site.
    """
    if num_sites < 1 or not math.isfinite(clip) or clip <= 0:
        raise SecAggError(f"fixed point needs ≥ 1 site and a finite clip > 0, got {num_sites} sites, clip {clip}")
    bits = RING_BITS - 1 - _ceil_log2(num_sites * clip) - 1
    if bits < 1:
        raise SecAggError(
            f"clip {clip} × {num_sites} sites leaves {bits} fraction bits in the 32-bit ring; use a clip "
            f"below {2.0**29 / num_sites:g}"
        )
    return bits


def weight_bits(num_sites: int) -> int:
    """Fraction bits for the weight slot: each site's weight is in [0, 1], so the sum is at most N."""
    return value_bits(num_sites, 1.0)


def encode(values: np.ndarray, bits: int) -> np.ndarray:
    """round(values · 2^bits) as two's complement in uint32 (mod 2^32), chunk by chunk (bounded temporaries)."""
    flat = np.asarray(values).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint32)
    scale = 2.0**bits
    for start in range(0, flat.size, PRG_CHUNK_ELEMENTS):
        part = flat[start : start + PRG_CHUNK_ELEMENTS].astype(np.float64) * scale
        out[start : start + PRG_CHUNK_ELEMENTS] = np.rint(part, out=part).astype(np.int64).astype(np.uint32)
    return out


def decode(ring_sum: np.ndarray, bits: int) -> np.ndarray:
    """float64 of a ring element read as two's complement int32, divided by 2^bits."""
    signed = np.ascontiguousarray(ring_sum, dtype=np.uint32).view(np.int32)
    return signed * (2.0**-bits)


def _describe(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
