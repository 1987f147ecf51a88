"""mTLS: a site holding a certificate from another provisioning is refused by the server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedllm.config import load_site_config
from fedllm.jobs.submit import submit_job
from fedllm.provision import provision
from fedllm.runtime.admin import admin_session, connected_sites
from tests.support.exchange import echo_job
from tests.support.sites import write_yaml
from tests.support.trust import tls_outcome

pytestmark = pytest.mark.federation


def test_site_with_foreign_certificate_is_refused(federation, tmp_path: Path) -> None:
    # Same project, server name and ports, but provisioned elsewhere: a different root CA signs "site-9".
    legit = yaml.safe_load((federation.prod_dir.parents[2] / "site.yaml").read_text())
    legit["sites"].append({"name": "site-9", "gpus": []})
    foreign = provision(
        load_site_config(write_yaml(tmp_path / "foreign.yaml", legit)), tmp_path / "ws", source="foreign.yaml"
    )
    kit = tmp_path / "site-9"
    shutil.copytree(foreign.site("site-9"), kit)
    # The intruder trusts the real server (real root CA), so only its own certificate can stop it.
    shutil.copy(federation.server() / "startup" / "rootCA.pem", kit / "startup" / "rootCA.pem")
    assert (kit / "startup" / "client.crt").read_bytes() != b""

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "site-9.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
            cwd=kit,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Give it well over the ~1 s a legitimate site needs to register, polling the server meanwhile.
        deadline = time.monotonic() + 20
        with admin_session(federation) as session:
            while time.monotonic() < deadline:
                assert "site-9" not in connected_sites(session), "the server accepted a foreign certificate"
                time.sleep(1)
            assert connected_sites(session) >= {"site-1", "site-2", "site-3"}
        text = log.read_text(errors="replace") + (kit / "log.txt").read_text(errors="replace")
        assert "Successfully registered client:site-9" not in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tls_outcome(kits, cert_dir: Path | None, port: int | None = None) -> str:
    """A TLS connection to a server port with `cert_dir`'s client certificate, or none (tests.support.trust)."""
    return tls_outcome(
        kits.server() / "startup" / "rootCA.pem",
        cert_dir / "client.crt" if cert_dir else None,
        cert_dir / "client.key" if cert_dir else None,
        kits.config.server.name,
        port or kits.config.server.fed_learn_port,
    )


def test_server_refuses_tls_with_a_foreign_client_certificate(federation, tmp_path: Path) -> None:
    legit = yaml.safe_load((federation.prod_dir.parents[2] / "site.yaml").read_text())
    foreign = provision(
        load_site_config(write_yaml(tmp_path / "foreign.yaml", legit)), tmp_path / "ws", source="foreign.yaml"
    )
    # Control: a certificate from this federation's CA completes mutual TLS and the connection stays open.
    assert _tls_outcome(federation, federation.site("site-1") / "startup") == "open"
    # The same connection with a certificate signed by another provisioning's CA is cut by the server.
    assert _tls_outcome(federation, foreign.site("site-1") / "startup").startswith("refused")


def _job_port(kits, job_id: str, timeout: float = 60) -> int:
    """The port the running server job listens on for the sites' job processes (from its log)."""
    log = kits.server() / job_id / "log.txt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if m := re.search(r"created adhoc external listener \S+ for stcp://[^:]+:(\d+)", text):
            return int(m.group(1))
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} opened no job port within {timeout:.0f}s")


def test_job_port_speaks_mtls_only_to_this_federation(federation, tmp_path: Path) -> None:
    """A running job's own listener holds the same line as fed_learn_port: this CA's client certificates only."""
    legit = yaml.safe_load((federation.prod_dir.parents[2] / "site.yaml").read_text())
    foreign = provision(
        load_site_config(write_yaml(tmp_path / "foreign.yaml", legit)), tmp_path / "ws", source="foreign.yaml"
    )
    # Long enough to probe its port while it runs; aborted afterwards.
    job = echo_job(tmp_path / "jobs", 1, sites=3, rounds=200, name="echo-port", verify=False)
    job_id = submit_job(federation, job, wait=False, echo=lambda _m: None).job_id
    try:
        port = _job_port(federation, job_id)
        first, last = federation.config.server.job_port_range
        assert first <= port <= last
        assert _tls_outcome(federation, federation.site("site-1") / "startup", port) == "open"
        assert _tls_outcome(federation, foreign.site("site-1") / "startup", port).startswith("refused")
        assert _tls_outcome(federation, None, port).startswith("refused"), "a client without a certificate got in"
    finally:
        with admin_session(federation) as session:
            session.abort_job(job_id)
            deadline = time.monotonic() + 60
            while not session.get_job_meta(job_id).get("status", "").startswith("FINISHED"):
                assert time.monotonic() < deadline, "the probe job did not stop after abort"
                time.sleep(1)
