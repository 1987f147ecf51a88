"""Model exchange at LLM scale: stock NVFlare settings vs fedllm's, on a real loopback federation.

For each exchange profile and site count, provisions mTLS kits, starts a native server and N
sites, runs an echo job (sites send the received weights straight back; no training), and
reports per-round wall time, effective GB/s (bytes both ways / round time), the peak RSS of the
server side and of each site (all their processes summed, sampled every 0.1 s), the CPU seconds
per round of each participant's processes, and — measured in the same run, as the baselines —
raw loopback TCP throughput and mTLS throughput between two processes with the kits'
certificates (the ceiling of any exchange path here: every byte crosses mTLS). Needs several ×
the model in RAM: run as
    make bench-exchange   # = .venv/bin/python benchmarks/exchange.py --size-mib 1024 --sites 1 3
Last lines: what mTLS alone allows a 1-site round, then
`exchange 1GiB: fedllm X.XX GB/s, peak Y.Y× model; stock Z.ZZ GB/s, peak W.W× model`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import re
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from fedllm.apps.local_federation import local_federation, loopback_config_dict
from fedllm.config.site_config import SiteConfig
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.template import InitialModel, JobTemplate
from fedllm.provision import Kits, provision

GB = 1e9
# Named exchange settings the benchmark compares (ExchangeOptions fields; see fedllm.jobs.exchange).
PROFILES = {
    "stock": {"profile": "stock"},  # NVFlare's FedAvgRecipe defaults
    "fedllm": {},  # fedllm's defaults: what every fedllm job gets
    "fedllm-bf16": {"wire_dtype": "bfloat16"},  # + weights cross as bf16 (opt-in, lossy)
}
# Profiles that run on kits without job ports: every byte through the server's parent process, as
# NVFlare does by default (both kinds of kit use NVFlare's tcp driver with mTLS).
WITHOUT_JOB_PORTS = {"stock"}
# Stop a run (and say so) rather than push the shared machine into the OOM killer.
MIN_AVAILABLE_BYTES = 1.5 * 2**30


class OutOfMemory(RuntimeError):
    """The run would have exhausted this machine's memory; it was stopped."""


def loopback_tcp_gbps(nbytes: int = 2**30, chunk: int = 16 * 2**20) -> float:
    """Raw TCP throughput over 127.0.0.1 with one Python sender and receiver (the wire's ceiling)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got = [0]

    def receive() -> None:
        conn, _ = srv.accept()
        buf = bytearray(chunk)
        view = memoryview(buf)
        with conn:
            while got[0] < nbytes:
                n = conn.recv_into(view)
                if not n:
                    break
                got[0] += n

    t = threading.Thread(target=receive)
    t.start()
    payload = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        sent = 0
        while sent < nbytes:
            c.sendall(payload[: min(chunk, nbytes - sent)])
            sent += min(chunk, nbytes - sent)
        t.join()
    srv.close()
    return got[0] / (time.perf_counter() - t0) / GB


def _mtls_receive(port: int, server_kit: str, nbytes: int, streams: int, chunk: int, out) -> None:
    """Child process of loopback_mtls_gbps: accept `streams` mTLS connections, read nbytes into one buffer."""
    startup = Path(server_kit) / "startup"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(startup / "server.crt", startup / "server.key")
    ctx.load_verify_locations(startup / "rootCA.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as every NVFlare connection
    buf = bytearray(nbytes)
    buf[:: 2**12] = bytes(len(range(0, nbytes, 2**12)))  # touch every page: time the wire, not page faults
    view = memoryview(buf)

    def receive(conn: socket.socket, lo: int, hi: int) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            got = lo
            while got < hi:
                n = tls.recv_into(view[got:hi], min(chunk, hi - got))
                if not n:
                    raise ConnectionError("sender closed early")
                got += n
            tls.sendall(b"k")

    with socket.create_server(("127.0.0.1", port), backlog=streams) as srv:
        out.put("listening")
        threads = []
        for i in range(streams):
            conn, _ = srv.accept()
            t = threading.Thread(target=receive, args=(conn, *_share(nbytes, streams, i)))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    out.put("done")


def _share(nbytes: int, parts: int, i: int) -> tuple[int, int]:
    return i * nbytes // parts, (i + 1) * nbytes // parts


def loopback_mtls_gbps(server_kit: Path, site_kit: Path, streams: int = 1, nbytes: int = 2**30) -> float:
    """mTLS throughput between two processes over 127.0.0.1, with the kits' own certificates.

    Every byte of a round crosses such a connection (all NVFlare connections are mTLS), sender and
    receiver in different processes, each side at most one process per core: this bounds every
    exchange path on this machine, whatever it does above the sockets. `streams` connections run
    in parallel (TLS releases the GIL), each with 1/streams of the bytes.
    """
    chunk = 2**20
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_kit / "startup" / "rootCA.pem"))
    ctx.check_hostname = False  # the server certificate names the federation's server, not 127.0.0.1
    ctx.load_cert_chain(site_kit / "startup" / "client.crt", site_kit / "startup" / "client.key")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp = multiprocessing.get_context("spawn")
    out = mp.Queue()
    child = mp.Process(target=_mtls_receive, args=(port, str(server_kit), nbytes, streams, chunk, out), daemon=True)
    child.start()
    try:
        out.get(timeout=60)
        payload = memoryview(bytearray(nbytes))
        conns = [ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) for _ in range(streams)]

        def send(tls: ssl.SSLSocket, lo: int, hi: int) -> None:
            with tls:
                for offset in range(lo, hi, chunk):
                    tls.sendall(payload[offset : min(offset + chunk, hi)])
                tls.recv(1)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=send, args=(c, *_share(nbytes, streams, i))) for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        if out.get(timeout=60) != "done":
            raise RuntimeError("mTLS receiver failed")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    return nbytes / elapsed / GB


def mtls_ceiling_gbps(server_kit: Path, site_kit: Path, tries: int = 3) -> dict[str, float]:
    """Best of `tries` for one and for two parallel streams: a ceiling, not a typical value."""
    return {
        f"{n} stream{'s' * (n > 1)}": max(loopback_mtls_gbps(server_kit, site_kit, streams=n) for _ in range(tries))
        for n in (1, 2)
    }


class ProcessSampler(threading.Thread):
    """Peak summed RSS and the CPU seconds of each participant's process tree (parent + NVFlare job processes).

    CPU seconds are far less noisy than wall time on a small shared VM: they tell whether a change
    removed work or only moved it. The timeline (wall time, CPU seconds so far per process role)
    lets the benchmark count only the rounds, not the job's start-up.
    """

    def __init__(self, roots: dict[str, int], period: float = 0.1):
        super().__init__(daemon=True)
        self.roots, self.period = roots, period
        self.peak = dict.fromkeys(roots, 0)
        # participant → {pid: (process role, last seen user+system CPU seconds)}
        self.cpu: dict[str, dict[int, tuple[str, float]]] = {name: {} for name in roots}
        self.timeline: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in roots}
        self.oom = False
        self._halt = threading.Event()

    def _sample_tree(self, name: str, pid: int) -> int:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error), p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
                self.cpu[name][p.pid] = (role_of(p), t.user + t.system)
        self.timeline[name].append((time.time(), self.cpu_by_role(name)))
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            for name, pid in self.roots.items():
                self.peak[name] = max(self.peak[name], self._sample_tree(name, pid))
            if psutil.virtual_memory().available < MIN_AVAILABLE_BYTES:
                self.oom = True
                # Job processes run in sessions of their own (NVFlare setsid): kill each process of each tree.
                for pid in self.roots.values():
                    with contextlib.suppress(psutil.Error):
                        root = psutil.Process(pid)
                        for proc in [*root.children(recursive=True), root]:
                            with contextlib.suppress(psutil.Error):
                                proc.kill()
                return
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return self.peak

    def cpu_by_role(self, name: str) -> dict[str, float]:
        """CPU seconds so far of one participant, summed per process role (parent, job)."""
        out: dict[str, float] = {}
        for role, seconds in self.cpu[name].values():
            out[role] = out.get(role, 0.0) + seconds
        return out

    def cpu_between(self, name: str, start: float, end: float) -> dict[str, float]:
        """CPU seconds per role spent between two wall-clock times (nearest samples)."""
        line = self.timeline[name]
        if not line:
            return {}

        def at(t: float) -> dict[str, float]:
            return min(line, key=lambda sample: abs(sample[0] - t))[1]

        a, b = at(start), at(end)
        return {role: b.get(role, 0.0) - a.get(role, 0.0) for role in b}


def role_of(proc: psutil.Process) -> str:
    """'job' for NVFlare's per-job process (server runner / client worker), 'parent' otherwise."""
    cmdline = " ".join(proc.cmdline())
    return "job" if ("runner_process" in cmdline or "worker_process" in cmdline) else "parent"


@dataclass
class Result:
    profile: str
    sites: int
    model_bytes: int
    round_s: list[float]
    peak_server: int
    peak_sites: dict[str, int]
    # participant → process role ("parent", "job") → CPU seconds per round (the rounds only, not start-up)
    cpu_per_round: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def median_round_s(self) -> float:
        # Round 0 also pays for job start-up work (first imports, allocator warm-up) in some paths;
        # report the median of the rounds so one outlier neither helps nor hurts.
        s = sorted(self.round_s)
        return s[len(s) // 2]

    @property
    def gbps(self) -> float:
        return 2 * self.model_bytes * self.sites / self.median_round_s / GB

    @property
    def peak_x(self) -> float:
        return max(self.peak_server, *self.peak_sites.values()) / self.model_bytes


STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
ROUND_RE = re.compile(r"Round \d+ started\.|Finished FedAvg\.")


def round_marks(server_log: str) -> list[float]:
    """Wall-clock times at which each FedAvg round started, and FedAvg finished, from the server's log.

    FedAvg prints its round banners on the lines after the stamped log line, so each banner takes
    the time of the last stamp above it.
    """
    marks, stamp = [], None
    for line in server_log.splitlines():
        if m := STAMP_RE.match(line):
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp is not None and ROUND_RE.search(line):
            marks.append(stamp)
    return marks


def echo_template(size_mib: float, options: ExchangeOptions, dtype: str = "float32") -> JobTemplate:
    return JobTemplate(
        name="echo",
        trainer="fedllm.training.toy.echo",
        initial_model=InitialModel(
            class_path="fedllm.flare.server_models.EchoModel", args={"size_mib": size_mib, "dtype": dtype}
        ),
        key_metric="global_val_accuracy",
        final_evaluation=False,  # the echo job checks the exchange, not a model
        train_args={"size_mib": size_mib, "dtype": dtype},
        exchange=options,
    )


def loopback_config(sites: int, job_ports: bool = True) -> SiteConfig:
    """A loopback federation of `sites` sites on free ports; without job ports everything crosses the parent."""
    return SiteConfig.model_validate(loopback_config_dict("xbench", sites, job_ports=job_ports))


def provision_kits(root: Path, sites: int, job_ports: bool = True) -> Kits:
    """mTLS startup kits for a loopback federation of `sites` sites under `root` (free ports)."""
    return provision(loopback_config(sites, job_ports), root / "ws", source="benchmark", data_root=root)


def run_once(root: Path, profile: str, sites: int, size_mib: float, rounds: int, log) -> Result:
    options = ExchangeOptions.model_validate(PROFILES[profile])
    cfg = loopback_config(sites, job_ports=profile not in WITHOUT_JOB_PORTS)
    template = echo_template(size_mib, options)
    spec = resolve_spec(template, "fedavg", num_clients=sites, rounds=rounds)
    job_dir = create_job(spec, root / "jobs", overwrite=True)  # --keep reuses the folder across runs
    with local_federation(cfg, root / "ws", data_root=root, source="benchmark", echo=lambda _m: None) as fed:
        sampler = ProcessSampler({p.name: p.pid for p in fed.processes})
        sampler.start()
        try:
            fed.submit(job_dir, timeout=3600, echo=lambda m: log(f"    {m}"))
        except Exception:
            if sampler.oom:
                raise OutOfMemory(f"stopped: less than {MIN_AVAILABLE_BYTES / GB:.1f} GB of RAM left") from None
            raise
        finally:
            peaks = sampler.stop()
        server_log = fed.log(cfg.server.name)
    model_bytes = int(size_mib * 2**20)
    marks = round_marks(server_log.read_text(errors="replace"))
    rounds_done = max(1, len(marks) - 1)
    cpu = {
        name: {role: sec / rounds_done for role, sec in sampler.cpu_between(name, marks[0], marks[-1]).items()}
        for name in sampler.roots
    }
    return Result(
        profile,
        sites,
        model_bytes,
        [b - a for a, b in itertools.pairwise(marks)],
        peaks[cfg.server.name],
        {s: peaks[s] for s in cfg.site_names},
        cpu,
        {"options": options.model_dump()},
    )


def describe(r: Result) -> str:
    sites = " ".join(f"{v / GB:.2f}" for v in r.peak_sites.values())
    rounds = " ".join(f"{t:.2f}" for t in r.round_s)
    cpu = "  ".join(
        f"{name} " + " + ".join(f"{role} {sec:.1f}" for role, sec in sorted(roles.items()))
        for name, roles in r.cpu_per_round.items()
    )
    return (
        f"{r.profile:>8} N={r.sites}  rounds [{rounds}] s  → {r.gbps:.2f} GB/s  "
        f"peak RSS server {r.peak_server / GB:.2f} GB ({r.peak_server / r.model_bytes:.1f}×), "
        f"sites [{sites}] GB (max {max(r.peak_sites.values()) / r.model_bytes:.1f}×)\n"
        f"           CPU-s per round: {cpu}"
    )


def _cpu(roles: dict[str, float]) -> str:
    return f"{sum(roles.values()):.1f}"


def markdown_table(results: list[Result], tcp_gbps: float, mtls: dict[str, float]) -> str:
    """The README/docs table: one row per profile and site count, then what the wire itself allows."""
    rows = [
        "| model | sites | settings | s/round (median) | effective GB/s | × stock | peak RSS server | peak RSS per site "
        "| CPU-s/round server | CPU-s/round per site |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    stock = {r.sites: r for r in results if r.profile == "stock"}
    for r in results:
        base = stock.get(r.sites)
        speedup = f"{r.gbps / base.gbps:.1f}×" if base and r is not base else "1×" if r is base else "—"
        site_peak = max(r.peak_sites.values())
        server_name = next(n for n in r.cpu_per_round if n not in r.peak_sites) if r.cpu_per_round else None
        site_cpu = max((sum(v.values()) for n, v in r.cpu_per_round.items() if n in r.peak_sites), default=0.0)
        rows.append(
            f"| {size_label(r.model_bytes / 2**20)} | {r.sites} | {r.profile} | {r.median_round_s:.1f} | {r.gbps:.2f} | "
            f"{speedup} | {r.peak_server / GB:.1f} GB ({r.peak_server / r.model_bytes:.1f}×) | "
            f"{site_peak / GB:.1f} GB ({site_peak / r.model_bytes:.1f}×) | "
            f"{_cpu(r.cpu_per_round.get(server_name, {})) if server_name else '—'} | {site_cpu:.1f} |"
        )
    streams = ", ".join(f"{v:.2f} GB/s ({k})" for k, v in mtls.items())
    rows.append(
        f"\nSame run, same machine: raw loopback TCP (one Python stream) {tcp_gbps:.2f} GB/s; "
        f"mTLS between two processes with the kits' certificates {streams}."
    )
    return "\n".join(rows)


def ceiling_line(size_mib: float, mtls: dict[str, float]) -> str:
    """What mTLS alone allows: a round moves the model down to a site and back, one direction after the other."""
    best = max(mtls.values())
    model = size_mib * 2**20
    floor_s = 2 * model / (best * GB)
    return (
        f"mTLS ceiling {best:.2f} GB/s per direction: a 1-site round of {size_label(size_mib)} needs ≥ {floor_s:.2f} s "
        f"on the wire alone → ≤ {best:.2f} GB/s effective with zero time for anything else"
    )


def size_label(size_mib: float) -> str:
    return f"{size_mib / 1024:g}GiB" if size_mib >= 1024 else f"{size_mib:g}MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", default=["stock", "fedllm"], choices=sorted(PROFILES))
    # Variants of fedllm's settings for exploration, e.g. --set tensor_streaming=true disk_offload=false
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep kits and logs (for profiling)")
    args = parser.parse_args()

    overrides = dict(kv.split("=", 1) for kv in args.set)
    if overrides:
        PROFILES["fedllm"] = {**PROFILES["fedllm"], **overrides}
    with tempfile.TemporaryDirectory(prefix="fedllm-xbench-certs-") as certs:
        ceiling_kits = provision_kits(Path(certs), sites=1)
        tcp = [loopback_tcp_gbps()]
        mtls = [mtls_ceiling_gbps(ceiling_kits.server(), ceiling_kits.site(ceiling_kits.config.site_names[0]))]
        print(f"loopback TCP (1 Python stream): {tcp[0]:.2f} GB/s; mTLS: {mtls[0]}", flush=True)
        results: list[Result] = []
        for profile in args.profiles:
            for n in args.sites:
                with contextlib.ExitStack() as stack:
                    if args.keep:
                        tmp = args.keep / f"{profile}-{n}"
                        tmp.mkdir(parents=True, exist_ok=True)
                    else:
                        tmp = stack.enter_context(
                            tempfile.TemporaryDirectory(prefix="fedllm-xbench-", ignore_cleanup_errors=True)
                        )
                    print(f"{profile} N={n} {size_label(args.size_mib)} …", flush=True)
                    try:
                        r = run_once(Path(tmp), profile, n, args.size_mib, args.rounds, log=print)
                    except OutOfMemory as exc:
                        print(f"{profile:>8} N={n}  {exc}", flush=True)
                        continue
                    results.append(r)
                    print(describe(r), flush=True)
        tcp.append(loopback_tcp_gbps())
        mtls.append(mtls_ceiling_gbps(ceiling_kits.server(), ceiling_kits.site(ceiling_kits.config.site_names[0])))
    print(f"loopback TCP (1 Python stream): {tcp[-1]:.2f} GB/s; mTLS: {mtls[-1]}", flush=True)
    best_mtls = {k: max(m[k] for m in mtls) for k in mtls[0]}
    print(markdown_table(results, max(tcp), best_mtls))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    print(ceiling_line(args.size_mib, best_mtls))
    by = {r.profile: r for r in results if r.sites == 1} or {r.profile: r for r in results}
    parts = [f"{p} {by[p].gbps:.2f} GB/s, peak {by[p].peak_x:.1f}× model" for p in ("fedllm", "stock") if p in by]
    print(f"exchange {size_label(args.size_mib)}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
