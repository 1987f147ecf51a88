"""Secure aggregation's state machines: one ``SiteSession`` per site and one ``ServerSession`` per round.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning", semi-honest
variant, with the server relaying every message (sites never connect to each other):

0. advertise   each site makes fresh X25519 pairs (c: share transport, s: pairwise masks) and a 16-byte
               self-mask seed b; the server collects the public keys of the sites that answer (U1).
1. share keys  each site Shamir-splits b and s_sk (t of |U0|) and seals each peer's shares with AES-GCM
               under a key agreed with that peer's c key; the server routes them (U2 = the sites that sent).
2. mask        each site encodes w·clamp(update) in Z_{2^32}, adds PRG(b) and ±PRG(s_uv) for every other
               site of U2 (+ when its name sorts first) and sends the vector; the server sums what arrives (U3).
3. unmask      each site of U3 reveals, per peer, the share of b if the peer is in U3 or the share of s_sk
               if it dropped (U2 ∖ U3), never both; the server removes the self masks of U3 and the pairwise
               masks between the dropped sites and U3, and decodes the weighted sum.

Keys and seeds are fresh every round: a dropped site's s_sk is reconstructed in the round it dropped, so it
must never mask anything again. The messages are plain dict / list / str / bytes / numpy values, so the
NVFlare wiring can carry them in a Shareable; nothing here imports NVFlare.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from fedllm.flare.secagg import crypto
from fedllm.flare.secagg.crypto import SecAggError

__all__ = ["SecAggError", "SecAggParams", "ServerSession", "SiteSession", "ThresholdError"]

SEED_BYTES = crypto.SHARE_BYTES  # the self-mask seed b is one Shamir secret
KEY_BYTES = crypto.KEY_BYTES
# A sealed share's plaintext: the share of b (16 B) then the share of s_sk (two 16 B halves).
SHARES_PLAINTEXT_BYTES = SEED_BYTES + KEY_BYTES


class ThresholdError(SecAggError):
    """Fewer than the threshold t of sites are left at some stage: the round cannot be aggregated."""

    def __init__(self, stage: str, round_num: int, threshold: int, answered: list[str], missing: list[str]):
        self.stage = stage
        self.round_num = round_num
        self.threshold = threshold
        self.answered = list(answered)
        self.missing = list(missing)
        super().__init__(
            f"secure aggregation, round {round_num}, stage {stage}: {len(self.answered)} site(s) answered "
            f"({', '.join(self.answered) or 'none'}), fewer than the threshold t={threshold}; missing: "
            f"{', '.join(self.missing) or 'none'}. The round cannot be unmasked: bring the missing sites back, "
            f"or create the job with a lower threshold"
        )


@dataclass(frozen=True)
class SecAggParams:
    """A job's secure-aggregation settings, the same at the server and every site."""

    threshold: int  # t: sites needed at every stage; also the Shamir threshold
    clip: float = 1.0  # C: each site clamps every element of its update to [-C, C] (bounds the ring sum)
    # W: a site's weight is w = min(1, n_k / W), n_k being its FedAvg weight; weights above W count as W.
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, np.integer)) or self.threshold < 2:
            raise SecAggError(
                f"secure aggregation threshold must be an integer ≥ 2 (with t=1 one share is the secret), "
                f"got {self.threshold!r}"
            )
        for name in ("clip", "max_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SecAggError(f"secure aggregation {name} must be a finite number > 0, got {value!r}")


def _info(purpose: str, job_id: str, round_num: int) -> bytes:
    """HKDF context: a key derived for one purpose, job and round is never reused for another."""
    return json.dumps(["fedllm-secagg", purpose, job_id, round_num]).encode()


def _self_mask_key(seed: bytes, job_id: str, round_num: int) -> bytes:
    return crypto.derive_key(seed, info=_info("self", job_id, round_num))


def _pair_mask_key(s_sk, peer_s_pk: bytes, job_id: str, round_num: int) -> bytes:
    """The PRG key two sites share for their pairwise mask; the server rebuilds it for a dropped site."""
    return crypto.agree(s_sk, peer_s_pk, info=_info("pair", job_id, round_num))


def _share_aad(job_id: str, round_num: int, sender: str, recipient: str) -> bytes:
    return json.dumps(["fedllm-secagg share", job_id, round_num, sender, recipient]).encode()


def _check_sites(sites: list[str], what: str) -> list[str]:
    if not isinstance(sites, (list, tuple)) or not all(isinstance(s, str) and s for s in sites):
        raise SecAggError(f"{what} must be a list of site names, got {sites!r}")
    if len(set(sites)) != len(sites):
        raise SecAggError(f"{what} names a site twice: {list(sites)}")
    return sorted(sites)


def _check_public_keys(keys: dict[str, dict]) -> None:
    """Each site has two 32-byte keys, and no key appears twice (Bonawitz's distinctness check)."""
    seen: set[bytes] = set()
    for site, entry in keys.items():
        if not isinstance(entry, dict) or set(entry) != {"c_pk", "s_pk"}:
            raise SecAggError(f"site {site}'s public keys must be {{'c_pk', 's_pk'}}, got {entry!r}")
        for name in ("c_pk", "s_pk"):
            value = entry[name]
            if not isinstance(value, bytes) or len(value) != KEY_BYTES:
                raise SecAggError(f"site {site}'s {name} must be {KEY_BYTES} bytes, got {value!r}")
            if value in seen:
                raise SecAggError(f"site {site}'s {name} repeats another public key of this round")
            seen.add(value)


def _subset(sub: list[str], whole: list[str], what: str, of: str) -> None:
    extra = sorted(set(sub) - set(whole))
    if extra:
        raise SecAggError(f"{what} names site(s) {extra} that are not in {of} {whole}")


class SiteSession:
    """One site's part of one round. Every method is one stage, callable once, in order."""

    def __init__(self, site: str, round_num: int, job_id: str, params: SecAggParams):
        self.site = site
        self.round_num = round_num
        self.job_id = job_id
        self.params = params
        self._stage = "new"
        self._u0: list[str] = []
        self._u1_keys: dict[str, dict] = {}
        self._u2: list[str] = []
        self._c_sk = self._s_sk = None
        self._seed: bytes | None = None
        self._my_keys: dict[str, bytes] = {}
        # Per sender v (this site included): (share of b_v, share of s_sk_v) evaluated at this site's index.
        self._held: dict[str, tuple[bytes, bytes]] = {}

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise SecAggError(
                f"secure aggregation, round {self.round_num}, site {self.site}: {call} called after stage "
                f"'{self._stage}', it needs '{stage}' (each stage runs once, in order)"
            )

    def advertise(self, sites: list[str]) -> dict:
        """Stage 0: fresh key pairs and self-mask seed for this round; returns the two public keys."""
        self._expect("new", "advertise")
        u0 = _check_sites(sites, "the sampled sites")
        if self.site not in u0:
            raise SecAggError(f"site {self.site} was asked to advertise for a round it is not sampled in: {u0}")
        if len(u0) < self.params.threshold:
            raise ThresholdError("advertise", self.round_num, self.params.threshold, u0, [])
        self._u0 = u0
        self._c_sk, c_pk = crypto.generate_keypair()
        self._s_sk, s_pk = crypto.generate_keypair()
        self._seed = os.urandom(SEED_BYTES)
        self._my_keys = {"c_pk": c_pk, "s_pk": s_pk}
        self._stage = "advertised"
        return dict(self._my_keys)

    def share_keys(self, public_keys: dict[str, dict]) -> dict[str, bytes]:
        """Stage 1: Shamir-split b and s_sk; seal each peer of U1 its shares. Returns {peer: sealed blob}."""
        self._expect("advertised", "share_keys")
        u1 = _check_sites(list(public_keys), "the sites that advertised (U1)")
        _subset(u1, self._u0, "U1", "the sampled sites")
        if public_keys.get(self.site) != self._my_keys:
            raise SecAggError(f"the server relayed other public keys for site {self.site} than it advertised")
        if len(u1) < self.params.threshold:
            raise ThresholdError(
                "advertise", self.round_num, self.params.threshold, u1, sorted(set(self._u0) - set(u1))
            )
        _check_public_keys(public_keys)
        self._u1_keys = {site: dict(public_keys[site]) for site in u1}
        t, n = self.params.threshold, len(self._u0)
        seed_shares = dict(crypto.split_secret(self._seed, t, n))
        key_shares = dict(crypto.split_secret(crypto.private_bytes(self._s_sk), t, n))
        sealed: dict[str, bytes] = {}
        for peer in u1:
            index = self._index(peer)
            plaintext = seed_shares[index] + key_shares[index]
            if peer == self.site:
                self._held[self.site] = (seed_shares[index], key_shares[index])
                continue
            key = crypto.agree(self._c_sk, self._u1_keys[peer]["c_pk"], info=self._share_info())
            sealed[peer] = crypto.seal(key, plaintext, _share_aad(self.job_id, self.round_num, self.site, peer))
        self._stage = "shared"
        return sealed

    def receive_shares(self, sealed: dict[str, bytes], u2: list[str]) -> None:
        """Stage 2: open (authenticate) the shares each peer of U2 sealed for this site, and keep U2."""
        self._expect("shared", "receive_shares")
        u2 = _check_sites(u2, "the sites that shared their keys (U2)")
        _subset(u2, list(self._u1_keys), "U2", "U1")
        if self.site not in u2:
            raise SecAggError(f"site {self.site} is not in U2 {u2}: its key shares did not reach the server")
        if len(u2) < self.params.threshold:
            raise ThresholdError(
                "share_keys", self.round_num, self.params.threshold, u2, sorted(set(self._u0) - set(u2))
            )
        expected = set(u2) - {self.site}
        if set(sealed) != expected:
            raise SecAggError(
                f"site {self.site} expected sealed shares from {sorted(expected)}, got them from {sorted(sealed)}"
            )
        for sender in sorted(expected):
            key = crypto.agree(self._c_sk, self._u1_keys[sender]["c_pk"], info=self._share_info())
            plaintext = crypto.open_sealed(
                key, sealed[sender], _share_aad(self.job_id, self.round_num, sender, self.site)
            )
            if len(plaintext) != SHARES_PLAINTEXT_BYTES:
                raise SecAggError(f"the shares site {sender} sealed for {self.site} have the wrong length")
            self._held[sender] = (plaintext[:SEED_BYTES], plaintext[SEED_BYTES:])
        self._held = {site: shares for site, shares in self._held.items() if site in u2}
        self._u2 = u2
        self._stage = "received"

    def mask(self, update: np.ndarray, weight: float) -> tuple[np.ndarray, int]:
        """Stage 2→3: the masked uint32 vector of w·clamp(update) with w last, and how many elements were clamped.

        ``weight`` is the site's FedAvg weight n_k; w = min(1, n_k / max_weight). Raises rather than return
        anything unmasked, and masks once only (two vectors under one mask would reveal their difference).
        """
        self._expect("received", "mask")
        update = np.asarray(update)
        if update.ndim != 1 or not np.issubdtype(update.dtype, np.floating):
            raise SecAggError(f"mask takes a flat float vector, got {update.dtype} of shape {update.shape}")
        if not isinstance(weight, (int, float, np.number)) or not math.isfinite(weight) or weight < 0:
            raise SecAggError(f"site {self.site}'s FedAvg weight must be a finite number ≥ 0, got {weight!r}")
        w = min(1.0, float(weight) / self.params.max_weight)
        clip = float(self.params.clip)
        scale = w * 2.0 ** crypto.value_bits(len(self._u0), clip)
        out = np.empty(update.size + 1, dtype=np.uint32)
        clamped = 0
        step = crypto.PRG_CHUNK_ELEMENTS
        for start in range(0, update.size, step):
            part = update[start : start + step].astype(np.float64)
            if not np.isfinite(part).all():
                bad = int(np.count_nonzero(~np.isfinite(update)))
                raise SecAggError(
                    f"site {self.site}'s update has {bad} non-finite element(s) (NaN or inf); it was not sent"
                )
            clamped += int(np.count_nonzero(np.abs(part) > clip))
            np.clip(part, -clip, clip, out=part)
            part *= scale
            out[start : start + part.size] = np.rint(part, out=part).astype(np.int64).astype(np.uint32)
        out[-1] = crypto.encode(np.array([w]), crypto.weight_bits(len(self._u0)))[0]
        crypto.add_prg(out, _self_mask_key(self._seed, self.job_id, self.round_num))
        for peer in self._u2:
            if peer != self.site:
                pair_key = _pair_mask_key(self._s_sk, self._u1_keys[peer]["s_pk"], self.job_id, self.round_num)
                crypto.add_prg(out, pair_key, subtract=self.site > peer)
        self._seed = self._s_sk = None  # no longer needed; the shares others hold are the only copies
        self._stage = "masked"
        return out, clamped

    def reveal(self, u3: list[str], dropped: list[str]) -> dict[str, bytes]:
        """Stage 3: per peer, the share of b (16 B) if it is in U3, or of s_sk (32 B) if it dropped; once.

        Refuses if U3 and the dropped sites overlap or are not exactly U2, or if U3 is below the threshold:
        revealing both shares for one peer would let the server unmask that peer's vector.
        """
        self._expect("masked", "reveal")
        u3 = _check_sites(u3, "the sites whose masked vectors the server holds (U3)")
        dropped = _check_sites(dropped, "the dropped sites")
        both = sorted(set(u3) & set(dropped))
        if both:
            raise SecAggError(f"site {self.site} refuses to reveal: {both} are listed both as surviving and as dropped")
        if set(u3) | set(dropped) != set(self._u2):
            raise SecAggError(
                f"site {self.site} refuses to reveal: U3 {u3} and dropped {dropped} do not make U2 {self._u2}"
            )
        if self.site not in u3:
            raise SecAggError(f"site {self.site} refuses to reveal: the server lists it as dropped, yet it masked")
        if len(u3) < self.params.threshold:
            raise ThresholdError("reveal", self.round_num, self.params.threshold, u3, sorted(set(self._u0) - set(u3)))
        revealed = {peer: self._held[peer][0] for peer in u3}
        revealed.update({peer: self._held[peer][1] for peer in dropped})
        self._held = {}
        self._stage = "revealed"
        return revealed

    def _index(self, site: str) -> int:
        return self._u0.index(site) + 1

    def _share_info(self) -> bytes:
        return _info("share", self.job_id, self.round_num)


class ServerSession:
    """The server's part of one round: relays keys and shares, sums masked vectors, unmasks the sum."""

    def __init__(self, round_num: int, job_id: str, params: SecAggParams, sites: list[str]):
        self.round_num = round_num
        self.job_id = job_id
        self.params = params
        self._u0 = _check_sites(sites, "the sampled sites")
        if len(self._u0) < params.threshold:
            raise ThresholdError("advertise", round_num, params.threshold, self._u0, [])
        self._stage = "new"
        self._keys: dict[str, dict] = {}
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._sum: np.ndarray | None = None

    @property
    def u0(self) -> list[str]:
        return list(self._u0)

    @property
    def u2(self) -> list[str]:
        return list(self._u2)

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise SecAggError(
                f"secure aggregation, round {self.round_num}, server: {call} called after stage "
                f"'{self._stage}', it needs '{stage}'"
            )

    def _below(self, stage: str, answered: list[str]) -> None:
        if len(answered) < self.params.threshold:
            missing = sorted(set(self._u0) - set(answered))
            raise ThresholdError(stage, self.round_num, self.params.threshold, sorted(answered), missing)

    def collect_advertise(self, replies: dict[str, dict]) -> dict[str, dict]:
        """Stage 0's replies (None: no answer) → the public keys of U1, to send to every site of U1."""
        self._expect("new", "collect_advertise")
        answered = {site: reply for site, reply in replies.items() if reply is not None}
        _subset(list(answered), self._u0, "the advertise replies", "the sampled sites")
        self._below("advertise", list(answered))
        _check_public_keys(answered)
        self._keys = {site: dict(answered[site]) for site in sorted(answered)}
        self._stage = "advertised"
        return {site: dict(keys) for site, keys in self._keys.items()}

    def collect_shares(self, replies: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Stage 1's replies → for each site v of U2, {sender u: the blob u sealed for v}."""
        self._expect("advertised", "collect_shares")
        answered = {site: reply for site, reply in replies.items() if reply is not None}
        u1 = list(self._keys)
        _subset(list(answered), u1, "the share replies", "U1")
        for sender, blobs in answered.items():
            expected = set(u1) - {sender}
            if not isinstance(blobs, dict) or set(blobs) != expected:
                got = sorted(blobs) if isinstance(blobs, dict) else type(blobs).__name__
                raise SecAggError(f"site {sender} must send sealed shares for {sorted(expected)}, got {got}")
            bad = sorted(peer for peer, blob in blobs.items() if not isinstance(blob, bytes))
            if bad:
                raise SecAggError(f"site {sender}'s sealed shares for {bad} are not bytes")
        self._below("share_keys", list(answered))
        self._u2 = sorted(answered)
        self._stage = "routed"
        return {
            recipient: {sender: answered[sender][recipient] for sender in self._u2 if sender != recipient}
            for recipient in self._u2
        }

    def add_masked(self, site: str, masked: np.ndarray) -> None:
        """Add one site's masked vector to the ring sum (mod 2^32); each site of U2 once, all of one length."""
        self._expect("routed", "add_masked")
        if site not in self._u2:
            raise SecAggError(f"a masked vector from site {site}, which is not in U2 {self._u2}")
        if site in self._u3:
            raise SecAggError(f"a second masked vector from site {site} in round {self.round_num}")
        if not isinstance(masked, np.ndarray) or masked.dtype != np.uint32 or masked.ndim != 1:
            raise SecAggError(f"site {site}'s masked vector must be a flat uint32 array, got {_shape(masked)}")
        if self._sum is None:
            if masked.size < 2:
                raise SecAggError(f"site {site}'s masked vector has {masked.size} element(s): no update slot")
            self._sum = np.array(masked, dtype=np.uint32, copy=True)
        elif masked.size != self._sum.size:
            raise SecAggError(f"site {site}'s masked vector has {masked.size} elements, the others {self._sum.size}")
        else:
            np.add(self._sum, masked, out=self._sum)
        self._u3.append(site)

    def unmask_request(self) -> tuple[list[str], list[str]]:
        """Close the sum: (U3, dropped = U2 ∖ U3), sent to every site of U3 for its reveal."""
        self._expect("routed", "unmask_request")
        self._below("mask", self._u3)
        self._u3 = sorted(self._u3)
        self._stage = "unmasking"
        return list(self._u3), sorted(set(self._u2) - set(self._u3))

    def finish(self, reveals: dict[str, dict[str, bytes]]) -> tuple[np.ndarray, float]:
        """Reveals from ≥ t sites of U3 → (Σ w_k·clamp(update_k) as float64, Σ w_k) over U3."""
        self._expect("unmasking", "finish")
        answered = {site: reveal for site, reveal in reveals.items() if reveal is not None}
        _subset(list(answered), self._u3, "the reveals", "U3")
        dropped = sorted(set(self._u2) - set(self._u3))
        for site, reveal in answered.items():
            sizes = {peer: SEED_BYTES for peer in self._u3} | {peer: KEY_BYTES for peer in dropped}
            if not isinstance(reveal, dict) or set(reveal) != set(sizes):
                raise SecAggError(f"site {site} must reveal shares for {sorted(sizes)}, got {_shape(reveal)}")
            for peer, share in reveal.items():
                if not isinstance(share, bytes) or len(share) != sizes[peer]:
                    raise SecAggError(f"site {site}'s share for {peer} must be {sizes[peer]} bytes")
        self._below("unmask", list(answered))
        revealers = sorted(answered)[: self.params.threshold]

        def secret_of(peer: str) -> bytes:
            return crypto.combine_secret([(self._u0.index(r) + 1, answered[r][peer]) for r in revealers])

        total = self._sum
        for site in self._u3:
            seed = secret_of(site)
            crypto.add_prg(total, _self_mask_key(seed, self.job_id, self.round_num), subtract=True)
        for gone in dropped:
            s_sk = crypto.private_from_bytes(secret_of(gone))
            if crypto.public_bytes(s_sk) != self._keys[gone]["s_pk"]:
                raise SecAggError(
                    f"the revealed shares of site {gone}'s mask key do not rebuild its public key; the round "
                    f"cannot be unmasked"
                )
            for site in self._u3:
                pair_key = _pair_mask_key(s_sk, self._keys[site]["s_pk"], self.job_id, self.round_num)
                # The survivor added +PRG when its name sorts before the dropped site's; take back what it added.
                crypto.add_prg(total, pair_key, subtract=site < gone)
        self._stage = "finished"
        values = crypto.decode(total[:-1], crypto.value_bits(len(self._u0), float(self.params.clip)))
        weight_sum = float(crypto.decode(total[-1:], crypto.weight_bits(len(self._u0)))[0])
        self._sum = None
        if weight_sum <= 0:
            raise SecAggError(
                f"secure aggregation, round {self.round_num}: the sites' weights sum to {weight_sum}; there is "
                f"nothing to average"
            )
        return values, weight_sum

    def error_bound(self, weight_sum: float) -> float:
        """Per-element bound on |sum / weight_sum − the exact weighted mean| from fixed-point rounding.

        Each of the |U3| summed vectors is rounded to nearest: the value sum is off by at most
        |U3|·2^−(f+1), the weight sum by |U3|·2^−(f_w+1), and the exact mean is within [−C, C], so
        |error| ≤ (|U3|·2^−(f+1) + C·|U3|·2^−(f_w+1)) / weight_sum.
        """
        if not self._u3 or self._stage not in ("unmasking", "finished"):
            raise SecAggError("the error bound is known once the masked vectors are in (after unmask_request)")
        n = len(self._u3)
        f = crypto.value_bits(len(self._u0), float(self.params.clip))
        f_w = crypto.weight_bits(len(self._u0))
        return (n * 2.0 ** -(f + 1) + float(self.params.clip) * n * 2.0 ** -(f_w + 1)) / weight_sum


def _shape(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, dict):
        return repr(sorted(value))
    return type(value).__name__
