"""A site that dies mid-transfer does not take the server down; the job finishes with the rest."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from fedllm.jobs.submit import submit_job
from fedllm.runtime import native
from tests.support.exchange import echo_federation, echo_job

pytestmark = pytest.mark.federation

SIZE_MIB = 512  # big enough that a transfer takes a second or more on 2 cores


def _job_process(site_pid: int) -> psutil.Process | None:
    """The NVFlare job process (worker_process) a site spawned for the running job."""
    for child in psutil.Process(site_pid).children(recursive=True):
        try:
            if "worker_process" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_site_killed_mid_transfer(tmp_path):
    # The shortest heartbeat timeout the site config allows: the server declares the dead site gone sooner.
    with echo_federation(tmp_path / "fed", sites=3, heartbeat_timeout_s=30) as fed:
        kits = fed.kits
        procs = {p.name: p for p in native.read_state(kits)}
        job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=2, rounds=2, name="echo-kill")
        result = submit_job(kits, job, wait=False, echo=lambda _m: None)
        # The server job's own log (the copy in the server's process log is relayed late, in blocks).
        server_log = kits.server() / result.job_id / "log.txt"

        def victim():
            # The first site the server hands the round-0 weights to: the download starts right away.
            text = server_log.read_text(errors="replace") if server_log.is_file() else ""
            for name in kits.config.site_names:
                if f"assigned task to client {name}:" in text:
                    return name
            return None

        site = _wait_for(victim, 240, "the server to hand out the first task")
        assert _job_process(procs[site].pid) is not None, f"{site} has no job process"
        # The whole site dies (its client and its job process, as when its machine goes down). A crash of the
        # job process alone is reported by the living client, and NVFlare 2.9 then fails the job by design.
        # NVFlare starts job processes in sessions of their own, so the site's process group is not enough.
        site_proc = psutil.Process(procs[site].pid)
        for victim in [site_proc, *site_proc.children(recursive=True)]:
            os.kill(victim.pid, signal.SIGKILL)
        site_log = kits.site(site) / result.job_id / "log.txt"
        received = site_log.is_file() and "round 0: received" in site_log.read_text(errors="replace")
        assert not received, f"{site} had already received the weights when it was killed (not mid-transfer)"

        with fed.admin() as session:
            session.monitor_job(result.job_id, timeout=600, poll_interval=2.0)
            status = session.get_job_meta(result.job_id).get("status", "")
        assert native.status(kits)[kits.config.server.name], "the server process died"
        assert status == "FINISHED:COMPLETED", status
        survivors = [s for s in kits.config.site_names if s != site]
        finished = [
            s for s in survivors if "round 1: received" in (kits.site(s) / result.job_id / "log.txt").read_text()
        ]
        assert finished, f"no surviving site reached round 1 ({survivors})"
