"""Secure aggregation's own cost: the protocol's computation and message bytes, no NVFlare, no network.

For each update size and site count, runs one round of fedllm.flare.secagg in one process (sites one after
the other, as the server would relay them) on a random float32 update, and reports:
  mask s/site    — a site's SiteSession.mask: clamp, fixed-point encode, self mask and N−1 pairwise masks;
  server s       — the server's ring sum of the N masked vectors (with the key relay), then its unmask
                   (Shamir, removing the self masks, and with --drop-one the dropped site's pairwise masks)
                   and decode to float64;
  plain s        — the baseline measured in the same run: plain FedAvg's server work on the same float32
                   updates (N weighted adds in float32, then the division by Σ n_k);
  bytes/site     — what one site sends with secure aggregation, all stages (2 public keys, N−1 sealed shares,
                   the masked uint32 vector with its weight slot, N shares revealed), counted as the payload
                   bytes plus the site names keying them (no Shareable/FOBS framing), vs the plain float32
                   update (4 bytes per parameter).
It measures computation and message sizes only, not a federation's round time (for that, a job with and
without --secure-agg on a real federation). Key exchange and Shamir cost microseconds; the time is the
ChaCha20 keystream (N passes per site) and numpy's passes over the vector.
Sizes: `lora` = 10 M parameters (40 MB), `1gib` = 268 M parameters (1 GiB of float32); memory ≈ 6× the
update at the server (update, masked vector, ring sum, float64 result). Run as
    .venv/bin/python benchmarks/secure_agg.py --sizes lora 1gib --sites 3 8
One line per case, `secure aggregation <size>, N sites: mask X.XX s/site, server Y.YY s (sum, unmask/decode;
Z.Z× plain FedAvg's W.WW s), bytes/site … = R.RRRRRR× plain`, then a markdown table of all cases.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np

from fedllm.flare.secagg import SecAggParams, ServerSession, SiteSession

SIZES = {"lora": 10_000_000, "1gib": 2**30 // 4}


@dataclass
class Result:
    size: str
    params: int
    sites: int
    dropped: int
    mask_s: list[float]
    sum_s: float  # the server's key relay and ring sum of the masked vectors
    unmask_s: float  # the server's unmask (Shamir, mask removal) and decode to float64
    plain_s: float
    secagg_bytes: int
    plain_bytes: int


def payload_bytes(message: object) -> int:
    """Bytes of a message's payload: bytes and arrays as they are, names as UTF-8, numbers as 8 bytes."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, str):
        return len(message.encode())
    if isinstance(message, np.ndarray):
        return message.nbytes
    if isinstance(message, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in message.items())
    if isinstance(message, (list, tuple)):
        return sum(payload_bytes(v) for v in message)
    return 8


def run_once(size: str, n_params: int, n_sites: int, drop_one: bool) -> Result:
    names = [f"site-{i}" for i in range(1, n_sites + 1)]
    params = SecAggParams(threshold=n_sites // 2 + 1)
    rng = np.random.default_rng(0)
    # One update for every site: the cost does not depend on the values, and N copies of 1 GiB would not fit.
    update = rng.standard_normal(n_params, dtype=np.float32)
    update *= 0.01
    weights = {name: float(10 + i) for i, name in enumerate(names)}
    dropped = {names[-1]} if drop_one else set()

    server = ServerSession(0, "bench", params, names)
    sites = {name: SiteSession(name, 0, "bench", params) for name in names}
    sent = dict.fromkeys(names, 0)
    server_s = {"sum": 0.0, "unmask": 0.0}

    def timed(bucket: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        server_s[bucket] += time.perf_counter() - t0
        return out

    adverts = {name: sites[name].advertise(names) for name in names}
    for name, msg in adverts.items():
        sent[name] += payload_bytes(msg)
    keys = timed("sum", server.collect_advertise, adverts)
    shares = {name: sites[name].share_keys(keys) for name in names}
    for name, msg in shares.items():
        sent[name] += payload_bytes(msg)
    routed = timed("sum", server.collect_shares, shares)
    for name in server.u2:
        sites[name].receive_shares(routed[name], server.u2)
    mask_s = []
    for name in names:
        if name in dropped:
            continue
        t0 = time.perf_counter()
        masked, _ = sites[name].mask(update, weights[name])
        mask_s.append(time.perf_counter() - t0)
        sent[name] += payload_bytes(masked)
        timed("sum", server.add_masked, name, masked)
        del masked
    u3, gone = timed("unmask", server.unmask_request)
    reveals = {name: sites[name].reveal(u3, gone) for name in u3}
    for name, msg in reveals.items():
        sent[name] += payload_bytes(msg)
    values, weight_sum = timed("unmask", server.finish, reveals)
    bound = server.error_bound(weight_sum)
    expected = float(np.clip(update[0], -params.clip, params.clip))  # every site sent the same update
    assert abs(values[0] / weight_sum - expected) <= bound, "the benchmark's round decoded a wrong mean"
    del values

    # Plain FedAvg's server work on the same updates, in the same run: Σ n_k·x_k / Σ n_k in float32.
    t0 = time.perf_counter()
    total = np.zeros(n_params, dtype=np.float32)
    for name in u3:
        total += np.float32(weights[name]) * update
    total /= np.float32(sum(weights[name] for name in u3))
    plain_s = time.perf_counter() - t0
    del total

    survivor = u3[0]
    return Result(
        size,
        n_params,
        n_sites,
        len(dropped),
        mask_s,
        server_s["sum"],
        server_s["unmask"],
        plain_s,
        sent[survivor],
        update.nbytes,
    )


def describe(r: Result) -> str:
    drop = f", {r.dropped} dropped before masking" if r.dropped else ""
    return (
        f"secure aggregation {r.size} ({r.params / 1e6:g} M params), {r.sites} sites{drop}: "
        f"mask {np.median(r.mask_s):.2f} s/site (min {min(r.mask_s):.2f}, max {max(r.mask_s):.2f}), "
        f"server {r.sum_s + r.unmask_s:.2f} s (sum {r.sum_s:.2f} + unmask/decode {r.unmask_s:.2f}; "
        f"{(r.sum_s + r.unmask_s) / r.plain_s:.1f}× plain FedAvg's {r.plain_s:.2f} s), "
        f"bytes/site {r.secagg_bytes:,} vs {r.plain_bytes:,} plain = {r.secagg_bytes / r.plain_bytes:.6f}× "
        f"(+{r.secagg_bytes - r.plain_bytes:,} B)"
    )


def markdown_table(results: list[Result]) -> str:
    rows = [
        "| update | sites | dropped | mask s/site (median) | server ring sum s | server unmask+decode s "
        "| plain FedAvg s | server × plain | bytes a site sends | × plain float32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.size} ({r.params / 1e6:g} M) | {r.sites} | {r.dropped} | {np.median(r.mask_s):.2f} | "
            f"{r.sum_s:.2f} | {r.unmask_s:.2f} | {r.plain_s:.2f} | {(r.sum_s + r.unmask_s) / r.plain_s:.1f}× | "
            f"{r.secagg_bytes:,} | "
            f"{r.secagg_bytes / r.plain_bytes:.6f}× |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["lora", "1gib"], choices=sorted(SIZES))
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--drop-one", action="store_true", help="also run each case with one site dropped")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    results = []
    for size in args.sizes:
        for n_sites in args.sites:
            for drop_one in (False, True) if args.drop_one else (False,):
                r = run_once(size, SIZES[size], n_sites, drop_one)
                results.append(r)
                print(describe(r), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the CPUs are shared: times are upper bounds)")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
