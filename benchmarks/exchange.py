"""Model exchange at LLM scale: stock NVFlare settings vs fedllm's, on a real loopback federation.

For each exchange profile and site count, provisions mTLS kits, starts a native server and N
sites, runs an echo job (sites send the received weights straight back; no training), and
reports per-round wall time, effective GB/s (bytes both ways / round time), the peak RSS of the
server side and of each site (all their processes summed, sampled every 0.1 s), and raw
loopback TCP throughput measured in the same run. Needs several × the model in RAM: run as
    make bench-exchange   # = .venv/bin/python benchmarks/exchange.py --size-mib 1024 --sites 1 3
Last line: `exchange 1GiB: fedllm X.XX GB/s, peak Y.Y× model; stock Z.ZZ GB/s, peak W.W× model`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from fedllm.config import load_site_config
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.submit import submit_job
from fedllm.jobs.template import InitialModel, JobTemplate
from fedllm.provision import Kits, provision
from fedllm.runtime import native

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's test helpers (free ports, site YAML)
from tests.conftest import local_config_dict, write_yaml

GB = 1e9
# Named exchange settings the benchmark compares (ExchangeOptions fields; see fedllm.jobs.exchange).
PROFILES = {
    "stock": {"profile": "stock"},  # NVFlare's FedAvgRecipe defaults
    "fedllm": {},  # fedllm's defaults: what every fedllm job gets
    "fedllm-bf16": {"wire_dtype": "bfloat16"},  # + weights cross as bf16 (opt-in, lossy)
}
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


class RssSampler(threading.Thread):
    """Peak of the summed RSS of each participant's process tree (parent + NVFlare job processes)."""

    def __init__(self, roots: dict[str, int], period: float = 0.1):
        super().__init__(daemon=True)
        self.roots, self.period = roots, period
        self.peak = dict.fromkeys(roots, 0)
        self.oom = False
        self._halt = threading.Event()

    @staticmethod
    def _tree_rss(pid: int) -> int:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            for name, pid in self.roots.items():
                self.peak[name] = max(self.peak[name], self._tree_rss(pid))
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


@dataclass
class Result:
    profile: str
    sites: int
    model_bytes: int
    round_s: list[float]
    peak_server: int
    peak_sites: dict[str, int]
    extra: dict = field(default_factory=dict)

    @property
    def best_round_s(self) -> float:
        # Round 0 also pays for job start-up work (first imports, allocator warm-up) in some paths;
        # report the median of the rounds so one outlier neither helps nor hurts.
        s = sorted(self.round_s)
        return s[len(s) // 2]

    @property
    def gbps(self) -> float:
        return 2 * self.model_bytes * self.sites / self.best_round_s / GB

    @property
    def peak_x(self) -> float:
        return max(self.peak_server, *self.peak_sites.values()) / self.model_bytes


STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
ROUND_RE = re.compile(r"Round \d+ started\.|Finished FedAvg\.")


def round_times(server_log: str) -> list[float]:
    """Wall time of each FedAvg round from the server's log (round start → next start / finish).

    FedAvg prints its round banners on the lines after the stamped log line, so each banner takes
    the time of the last stamp above it.
    """
    marks, stamp = [], None
    for line in server_log.splitlines():
        if m := STAMP_RE.match(line):
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp is not None and ROUND_RE.search(line):
            marks.append(stamp)
    return [b - a for a, b in itertools.pairwise(marks)]


def echo_template(size_mib: float, options: ExchangeOptions, dtype: str = "float32") -> JobTemplate:
    return JobTemplate(
        name="echo",
        trainer="fedllm.training.echo",
        initial_model=InitialModel(
            class_path="fedllm.training.echo.EchoModel", args={"size_mib": size_mib, "dtype": dtype}
        ),
        key_metric="val_accuracy",
        train_args={"size_mib": size_mib, "dtype": dtype},
        exchange=options,
    )


def run_once(root: Path, profile: str, sites: int, size_mib: float, rounds: int, log) -> Result:
    options = ExchangeOptions.model_validate(PROFILES[profile])
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="xbench", sites=sites)))
    kits: Kits = provision(cfg, root / "ws", source="site.yaml", data_root=root)
    template = echo_template(size_mib, options)
    spec = resolve_spec(template, "fedavg", num_clients=sites, rounds=rounds)
    job_dir = create_job(spec, root / "jobs")
    procs = native.up(kits, timeout=120, echo=lambda _m: None)
    sampler = RssSampler({p.name: p.pid for p in procs})
    sampler.start()
    try:
        submit_job(kits, job_dir, wait=True, timeout=3600, echo=lambda m: log(f"    {m}"))
    except Exception:
        if sampler.oom:
            raise OutOfMemory(f"stopped: less than {MIN_AVAILABLE_BYTES / GB:.1f} GB of RAM left") from None
        raise
    finally:
        peaks = sampler.stop()
        native.down(kits, echo=lambda _m: None)
    model_bytes = int(size_mib * 2**20)
    return Result(
        profile,
        sites,
        model_bytes,
        round_times((native.run_dir(kits) / "logs" / f"{cfg.server.name}.log").read_text(errors="replace")),
        peaks[cfg.server.name],
        {s: peaks[s] for s in cfg.site_names},
        {"options": options.model_dump()},
    )


def describe(r: Result) -> str:
    sites = " ".join(f"{v / GB:.2f}" for v in r.peak_sites.values())
    rounds = " ".join(f"{t:.2f}" for t in r.round_s)
    return (
        f"{r.profile:>8} N={r.sites}  rounds [{rounds}] s  → {r.gbps:.2f} GB/s  "
        f"peak RSS server {r.peak_server / GB:.2f} GB ({r.peak_server / r.model_bytes:.1f}×), "
        f"sites [{sites}] GB (max {max(r.peak_sites.values()) / r.model_bytes:.1f}×)"
    )


def markdown_table(results: list[Result], tcp_gbps: float) -> str:
    """The README/docs table: one row per profile and site count."""
    rows = [
        "| model | sites | settings | s/round (median) | effective GB/s | × stock | peak RSS server | peak RSS per site |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stock = {r.sites: r for r in results if r.profile == "stock"}
    for r in results:
        base = stock.get(r.sites)
        speedup = f"{r.gbps / base.gbps:.1f}×" if base and r is not base else "1×" if r is base else "—"
        site_peak = max(r.peak_sites.values())
        rows.append(
            f"| {size_label(r.model_bytes / 2**20)} | {r.sites} | {r.profile} | {r.best_round_s:.1f} | {r.gbps:.2f} | "
            f"{speedup} | {r.peak_server / GB:.1f} GB ({r.peak_server / r.model_bytes:.1f}×) | "
            f"{site_peak / GB:.1f} GB ({site_peak / r.model_bytes:.1f}×) |"
        )
    rows.append(f"\nRaw loopback TCP (one Python stream, same run): {tcp_gbps:.2f} GB/s.")
    return "\n".join(rows)


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
    tcp = [loopback_tcp_gbps()]
    print(f"loopback TCP (1 Python stream): {tcp[0]:.2f} GB/s", flush=True)
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
    print(f"loopback TCP (1 Python stream): {tcp[-1]:.2f} GB/s", flush=True)
    print(markdown_table(results, max(tcp)))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    by = {r.profile: r for r in results if r.sites == 1} or {r.profile: r for r in results}
    parts = [f"{p} {by[p].gbps:.2f} GB/s, peak {by[p].peak_x:.1f}× model" for p in ("fedllm", "stock") if p in by]
    print(f"exchange {size_label(args.size_mib)}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
