"""Weights cross the real exchange path intact: bit-identical on fp32, within cast tolerance on 16-bit wires."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime

import psutil
import pytest
import torch

from fedllm.flare.server_models import EchoModel
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.results.metrics import load_global_state
from fedllm.runtime import native
from tests.support.exchange import echo_job
from tests.support.weights import max_abs_diff, state_digest

pytestmark = pytest.mark.federation

SIZE_MIB = 48  # several tensors (64 MiB each would make one); small enough for a quick round


def _global_model(result_dir) -> dict:
    return load_global_state(result_dir)


def test_fp32_weights_are_bit_identical_after_a_round(federation_2, tmp_path):
    job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=2, name="echo-fp32")
    result = federation_2.submit(job, download=tmp_path / "results", echo=lambda _m: None)
    assert result.ok, result.status
    expected = EchoModel(SIZE_MIB).state_dict()
    got = _global_model(result.result_dir)
    # Sites check what they received (--verify) and fail the job on any difference; the server's
    # aggregate of two identical fp32 echoes must equal the initial weights bit for bit.
    assert state_digest(got) == state_digest(expected)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_16bit_wire_stays_within_cast_tolerance(federation_2, tmp_path, wire):
    # Two casts per round (server → site, site → server); values in [-1, 1).
    tolerance = 2**-8 if wire == "bfloat16" else 2**-11
    job = echo_job(
        tmp_path / "jobs",
        SIZE_MIB,
        sites=2,
        exchange=ExchangeOptions(wire_dtype=wire),
        tolerance=tolerance,
        name=f"echo-{wire}",
    )
    result = federation_2.submit(job, download=tmp_path / "results", echo=lambda _m: None)
    assert result.ok, result.status
    expected = EchoModel(SIZE_MIB).state_dict()
    got = _global_model(result.result_dir)
    assert all(v.dtype == torch.float32 for v in got.values()), "weights must come back in their own dtype"
    diff = max_abs_diff(expected, got)
    assert 0 < diff <= tolerance, f"max |Δ| {diff} after a {wire} round trip"


def test_bf16_model_crosses_bit_identical(federation_2, tmp_path):
    job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=2, dtype="bfloat16", name="echo-bf16-model")
    result = federation_2.submit(job, download=tmp_path / "results", echo=lambda _m: None)
    assert result.ok, result.status
    got = _global_model(result.result_dir)
    assert state_digest(got) == state_digest(EchoModel(SIZE_MIB, dtype="bfloat16").state_dict())


def _server_parent(kits) -> psutil.Process:
    """The server's parent process (NVFlare's server_train), which relays whatever the jobs do not send directly."""
    root = psutil.Process(next(p.pid for p in native.read_state(kits) if p.name == kits.config.server.name))
    for proc in [root, *root.children(recursive=True)]:
        if "server_train" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError("no server_train process in the server's process tree")


class IoSampler(threading.Thread):
    """(wall time, bytes read + written) of one process, every 0.2 s: its I/O between two moments."""

    def __init__(self, proc: psutil.Process):
        super().__init__(daemon=True)
        self.proc, self.samples, self.halt = proc, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            io = self.proc.io_counters()
            self.samples.append((time.time(), io.read_chars + io.write_chars))
            time.sleep(0.2)

    def between(self, start: float, end: float) -> int:
        def at(t: float) -> int:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        return at(end) - at(start)


def _fedavg_span(server_job_log: str) -> tuple[float, float]:
    """Wall-clock start of round 0 and end of FedAvg, from the server job's log (banner → last stamp above it)."""
    stamp, marks = None, []
    for line in server_job_log.splitlines():
        if m := re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line):
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp is not None and ("Round 0 started." in line or "Finished FedAvg." in line):
            marks.append(stamp)
    assert len(marks) == 2, marks
    return marks[0], marks[1]


def test_sites_exchange_weights_with_the_server_job_directly(federation_2, tmp_path):
    """Weights go site job ⇄ server job over a job port (mTLS), not through the server's parent process."""
    sampler = IoSampler(_server_parent(federation_2.kits))
    sampler.start()
    rounds = 3
    job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=2, rounds=rounds, name="echo-direct")
    try:
        result = federation_2.submit(job, download=tmp_path / "results", echo=lambda _m: None)
    finally:
        sampler.halt.set()
        sampler.join()
    assert result.ok, result.status
    server_job_log = (result.result_dir / "workspace" / "log.txt").read_text(errors="replace")
    exchanged = SIZE_MIB * 2**20 * 2 * 2 * rounds  # both sites, both directions, every round
    # Relayed, the parent's I/O counters see about `exchanged` (measured: 578 of 576 MiB); direct, only
    # control messages and logs (~1 MiB).
    handled = sampler.between(*_fedavg_span(server_job_log))
    assert handled < 0.1 * exchanged, f"server parent moved {handled / 2**20:.0f} MiB of {exchanged / 2**20:.0f} MiB"

    first, last = federation_2.config.server.job_port_range
    for site in federation_2.config.site_names:
        match = re.search(rf"Connection \[\S+ [\d.]+:(\d+) <= [\d.:]+ SSL {site}\] is created", server_job_log)
        assert match, f"{site} never connected to the server job directly"
        assert first <= int(match.group(1)) <= last
