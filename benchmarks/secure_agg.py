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
Key exchange and Shamir cost microseconds; the time is the ChaCha20 keystream (N passes per site) and
numpy's passes over the vector.

With --federation it measures a real loopback federation instead (mTLS, native server and N sites, the
machinery of benchmarks/exchange.py): for each size and site count one federation runs the echo job (sites
send the received weights straight back, no training) twice, plain and with --secure-agg, same rounds, and
reports per-round wall time (from the server's round banners) and the bytes a site sent per round: plain, its
float32 weights (the echo's `echo_bytes`); secure, the masked uint32 vector (`bytes_on_wire`, from the site's
metrics in round_metrics.jsonl) plus the key-exchange and unmasking payloads of one round (advertise, sealed
shares, revealed shares: the protocol's message sizes for N sites, as counted above). Payload bytes on both
sides; NVFlare's framing is left out of both. An echo's update x − g is 0: the masking cost and the masked
bytes do not depend on the values (the clamp, encode and keystream passes are the same, the masked vector
is uniform either way), so the echo is left as it is. Run as
    .venv/bin/python benchmarks/secure_agg.py --federation --sizes lora --sites 3 8 --rounds 3
Last line per case: `federation <size>, N sites: round X.XX s secure vs Y.YY s plain = R.RR× (target ≤ 1.3×),
bytes/site/round … = B.BBBBBB× (target ≤ 1.2×)`.
Sizes: `lora` = 10 M parameters (40 MB), `1gib` = 268 M parameters (1 GiB of float32); memory ≈ 6× the
update at the server (update, masked vector, ring sum, float64 result). Run as
    .venv/bin/python benchmarks/secure_agg.py --sizes lora 1gib --sites 3 8
One line per case, `secure aggregation <size>, N sites: mask X.XX s/site, server Y.YY s (sum, unmask/decode;
Z.Z× plain FedAvg's W.WW s), bytes/site … = R.RRRRRR× plain`, then a markdown table of all cases.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedllm.flare.secagg import SecAggParams, ServerSession, SiteSession

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: share exchange.py's federation

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


def aux_bytes(n_sites: int) -> int:
    """What one site sends per round for secure aggregation besides its masked vector (keys, shares, reveals).

    Independent of the update's size: measured on a protocol round of a tiny update, minus its masked vector.
    """
    n_params = 1000
    r = run_once("aux", n_params, n_sites, drop_one=False)
    return r.secagg_bytes - 4 * (n_params + 1)  # the masked uint32 vector with its weight slot


@dataclass
class FederationResult:
    size: str
    params: int
    sites: int
    mode: str  # "plain" or "secure"
    round_s: list[float]
    vector_bytes: list[float]  # per round, the largest a site reported (echo_bytes / bytes_on_wire)
    aux_bytes: int  # per round and site: key exchange and unmasking payloads (0 for plain)
    server_cpu_s: float  # CPU seconds per round of the server's processes (parent + job)
    site_cpu_s: float  # CPU seconds per round of the busiest site's processes

    @property
    def median_round_s(self) -> float:
        s = sorted(self.round_s)
        return s[len(s) // 2]

    @property
    def bytes_per_round(self) -> float:
        return max(self.vector_bytes) + self.aux_bytes


def federation_case(root: Path, size: str, n_params: int, n_sites: int, rounds: int) -> list[FederationResult]:
    """One loopback federation of n_sites: the echo job plain, then with --secure-agg; the two results."""
    from exchange import ProcessSampler, echo_template, loopback_config, round_marks

    from fedllm.apps.local_federation import local_federation
    from fedllm.jobs.create import create_job, resolve_spec
    from fedllm.jobs.exchange import ExchangeOptions
    from fedllm.jobs.secure_agg import SecureAggregation
    from fedllm.results.metrics import read_round_metrics

    cfg = loopback_config(n_sites)
    template = echo_template(n_params * 4 / 2**20, ExchangeOptions())  # float32: n_params × 4 bytes
    specs = {
        "plain": resolve_spec(template, "fedavg", num_clients=n_sites, rounds=rounds, name="echo-plain"),
        "secure": resolve_spec(
            template, "fedavg", num_clients=n_sites, rounds=rounds, name="echo-secure", secure_agg=SecureAggregation()
        ),
    }
    aux = aux_bytes(n_sites)
    results = []
    with local_federation(cfg, root / "ws", data_root=root, source="benchmark", echo=lambda _m: None) as fed:
        server_log = fed.log(cfg.server.name)
        # CPU seconds per round tell the added work apart from 2 shared cores' contention between N + 1 parties.
        sampler = ProcessSampler({p.name: p.pid for p in fed.processes})
        sampler.start()
        for mode, spec in specs.items():
            job_dir = create_job(spec, root / "jobs", overwrite=True)
            start = server_log.stat().st_size  # this job's rounds are what the log gains from here
            outcome = fed.submit(job_dir, download=root / "results", timeout=3600, echo=lambda m: print(f"    {m}"))
            if not outcome.ok:
                raise RuntimeError(f"{mode} echo job ended {outcome.status}: {outcome.site_errors}")
            with server_log.open("rb") as f:
                f.seek(start)
                marks = round_marks(f.read().decode(errors="replace"))
            if len(marks) != rounds + 1:
                raise RuntimeError(f"{mode}: found {len(marks)} round marks in the server log, expected {rounds + 1}")
            key = "echo_bytes" if mode == "plain" else "bytes_on_wire"
            per_round = [
                max(float(site[key]) for site in rec["sites"].values())
                for rec in read_round_metrics(outcome.result_dir)
            ]
            if len(per_round) != rounds:
                raise RuntimeError(f"{mode}: round_metrics.jsonl holds {len(per_round)} rounds, expected {rounds}")
            results.append(
                FederationResult(
                    size,
                    n_params,
                    n_sites,
                    mode,
                    [b - a for a, b in itertools.pairwise(marks)],
                    per_round,
                    aux if mode == "secure" else 0,
                    *cpu_per_round(sampler, cfg.server.name, marks),
                )
            )
        sampler.stop()
    return results


def cpu_per_round(sampler, server: str, marks: list[float]) -> tuple[float, float]:
    """(server's CPU seconds per round, the busiest site's) between the first and the last round mark."""
    per = {
        name: sum(sampler.cpu_between(name, marks[0], marks[-1]).values()) / (len(marks) - 1) for name in sampler.roots
    }
    return per.pop(server), max(per.values())


def describe_federation(plain: FederationResult, secure: FederationResult) -> str:
    def rounds(r: FederationResult) -> str:
        return " ".join(f"{t:.2f}" for t in r.round_s)

    time_x = secure.median_round_s / plain.median_round_s
    bytes_x = secure.bytes_per_round / plain.bytes_per_round
    return (
        f"federation {plain.size} ({plain.params / 1e6:g} M params), {plain.sites} sites: "
        f"round {secure.median_round_s:.2f} s secure [{rounds(secure)}] vs {plain.median_round_s:.2f} s plain "
        f"[{rounds(plain)}] = {time_x:.2f}× (target ≤ 1.3×: {'met' if time_x <= 1.3 else 'NOT met'}), "
        f"bytes/site/round {secure.bytes_per_round:,.0f} (masked {max(secure.vector_bytes):,.0f} + "
        f"keys/shares {secure.aux_bytes:,}) vs {plain.bytes_per_round:,.0f} plain = {bytes_x:.6f}× "
        f"(target ≤ 1.2×: {'met' if bytes_x <= 1.2 else 'NOT met'}); CPU-s/round server {secure.server_cpu_s:.1f} "
        f"vs {plain.server_cpu_s:.1f}, busiest site {secure.site_cpu_s:.1f} vs {plain.site_cpu_s:.1f}"
    )


def run_federation(sizes: list[str], site_counts: list[int], rounds: int) -> None:
    for size in sizes:
        for n_sites in site_counts:
            print(f"federation {size}, {n_sites} sites, {rounds} rounds plain then secure …", flush=True)
            with tempfile.TemporaryDirectory(prefix="fedllm-secagg-bench-", ignore_cleanup_errors=True) as tmp:
                t0 = time.perf_counter()
                plain, secure = federation_case(Path(tmp), size, SIZES[size], n_sites, rounds)
            print(describe_federation(plain, secure), f"({time.perf_counter() - t0:.0f} s in all)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["lora", "1gib"], choices=sorted(SIZES))
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--drop-one", action="store_true", help="also run each case with one site dropped")
    parser.add_argument("--federation", action="store_true", help="round time and bytes on a real federation")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each echo job (--federation)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    if args.federation:
        run_federation(args.sizes, args.sites, args.rounds)
        print(f"load average {os.getloadavg()[0]:.1f} at the end (the CPUs are shared: times are upper bounds)")
        return
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
