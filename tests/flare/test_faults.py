"""The crash-point test hook (fedllm.flare.faults): inert unless named, and a real SIGKILL of the process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from fedllm.flare.faults import FAULT_ENV, crash_point, fault_matches


def test_which_points_a_spec_names() -> None:
    assert fault_matches("round-start:2", "round-start", 2)
    assert not fault_matches("round-start:2", "round-start", 1)
    assert not fault_matches("round-start:2", "round-start", None)
    assert fault_matches("journal:cloned", "journal:cloned", None)
    assert fault_matches("journal:cloned", "journal:cloned", 2), "no number: whatever the continuation"
    assert fault_matches("journal:aborted:2", "journal:aborted", 2)
    assert not fault_matches("journal:aborted:2", "journal:aborted", 1)
    assert not fault_matches("journal:cloned", "journal:collected", None)
    assert fault_matches("continuation-deploy", "continuation-deploy", None)
    assert not fault_matches("aggregation:1", "round-start", 1)


def test_unset_or_another_point_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    crash_point("round-start", 2, job_process=True)
    monkeypatch.setenv(FAULT_ENV, "round-start:3")
    crash_point("round-start", 2, job_process=True)  # still alive


# A "server": a parent that starts a "job process", which reaches the crash point.
_JOB = (
    "import sys; from fedllm.flare.faults import crash_point; sys.stdin.readline(); "
    "crash_point('round-start', 2, job_process=True); print('passed its crash point', flush=True)"
)
_SERVER = textwrap.dedent(
    f"""
    import subprocess, sys, time
    job = subprocess.Popen([sys.executable, "-c", {_JOB!r}], stdin=subprocess.PIPE, start_new_session=True)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(job.pid, sibling.pid, flush=True)
    job.stdin.write(b"go" + bytes([10])); job.stdin.flush()  # the job reaches its crash point now
    time.sleep(60)
    """
)


@pytest.mark.parametrize("spec", ["round-start:2", "round-start:3"])
def test_a_named_point_sigkills_the_server_and_its_job_processes(monkeypatch, spec) -> None:
    env = {**os.environ, FAULT_ENV: spec}
    server = subprocess.Popen([sys.executable, "-c", _SERVER], env=env, stdout=subprocess.PIPE, text=True)
    job_pid, sibling_pid = map(int, server.stdout.readline().split())
    try:
        if spec.endswith(":2"):
            assert server.wait(timeout=60) == -9, "the server's parent process died of SIGKILL"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_running(p) for p in (job_pid, sibling_pid)):
                time.sleep(0.1)
            assert not _running(job_pid) and not _running(sibling_pid), "its job processes with it"
        else:
            assert server.stdout.readline().strip() == "passed its crash point", "another point: nothing happens"
            assert server.poll() is None and _running(sibling_pid)
    finally:
        for pid in (server.pid, job_pid, sibling_pid):
            if _running(pid):
                os.kill(pid, 9)
        server.wait()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# A "site": a parent that starts its "job process", which reaches a site crash point.
_SITE_JOB = (
    "import sys; from fedllm.flare.faults import site_crash_point; "
    "site_crash_point('secagg-mask', sys.argv[1], 1); print('passed its crash point', flush=True)"
)
_SITE = textwrap.dedent(
    f"""
    import subprocess, sys, time
    job = subprocess.Popen([sys.executable, "-c", {_SITE_JOB!r}, sys.argv[1]], start_new_session=True)
    print(job.pid, flush=True)
    job.wait()
    time.sleep(60)
    """
)


def test_a_site_fault_names_a_site_a_point_and_a_round(monkeypatch) -> None:
    from fedllm.flare.faults import SITE_FAULT_ENV, site_crash_point

    monkeypatch.setenv(SITE_FAULT_ENV, "site-4@secagg-unmask:0,site-5@secagg-mask:1")
    site_crash_point("secagg-unmask", "site-5", 0)  # another site's point: still alive
    site_crash_point("secagg-mask", "site-5", 0)  # another round
    site_crash_point("secagg-unmask", "site-1", 0)  # another site
    monkeypatch.delenv(SITE_FAULT_ENV)
    site_crash_point("secagg-mask", "site-5", 1)  # unset


@pytest.mark.parametrize(("site", "killed"), [("site-5", True), ("site-4", False)])
def test_a_site_fault_sigkills_the_site_and_its_job_processes(site: str, killed: bool) -> None:
    from fedllm.flare.faults import SITE_FAULT_ENV

    env = {**os.environ, SITE_FAULT_ENV: "site-4@secagg-unmask:0,site-5@secagg-mask:1"}
    parent = subprocess.Popen([sys.executable, "-c", _SITE, site], env=env, stdout=subprocess.PIPE, text=True)
    job_pid = int(parent.stdout.readline())
    try:
        if killed:
            assert parent.wait(timeout=60) == -9, "the site's parent process died of SIGKILL"
            assert not _running(job_pid), "and its job process"
        else:
            assert parent.stdout.readline().strip() == "passed its crash point"
            assert parent.poll() is None, "another site's point: the site lives on"
    finally:
        for pid in (parent.pid, job_pid):
            if _running(pid):
                os.kill(pid, 9)
        parent.wait()
