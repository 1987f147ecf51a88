"""A test hook: SIGKILL the server at one named step, to prove that a job survives a crash exactly there.

`FEDLLM_FAULT=<point>[:<round>]` in the server's environment (a test sets it when it starts the server)
makes the server's own components kill the server's processes with SIGKILL when they reach that point:
the parent process and every job process it started, as a crash or an OOM kill would, with nothing told
first. Unset (always, outside tests), `crash_point` is one environment lookup and does nothing.

Points (tests/federation/test_resume.py uses each):

- `round-start:<r>`: the server job, as round r starts (before its task goes out);
- `aggregation:<r>`: the server job, once the first site's result of round r has been aggregated;
- `checkpoint-write:<r>`: the server job's checkpoint writer, when round r's global checkpoint is in its
  temp file but not yet renamed over the last one;
- `continuation-deploy`: a continuation's server job, before it takes over the checkpoint it starts from;
- `journal:<phase>[:<n>]`: the server's parent process (fedllm.flare.resume.JobResumer), right after it
  has journaled `<phase>` of continuing a job, before acting on it (`intent`, `aborted`, `collected`,
  `cloning`, `cloned`, `marked`); with n, only while it makes the job's n-th continuation.

Without `:<n>`, a point fires whatever its round.

`FEDLLM_SITE_FAULT=<site>@<point>[:<round>][,...]` in a site's environment does the same on the site side
(`site_crash_point`): the named site's parent process and its job processes die by SIGKILL, as when the
site's machine is lost. (Killing only a site's job process would not be a lost site: NVFlare 2.9's site
parent reports the job process's death and the server then fails the whole job.) Points
(tests/federation/test_secure_aggregation_dropout.py):

- `secagg-mask:<r>`: the site's secure-aggregation output filter, before its masked update of round r leaves;
- `secagg-unmask:<r>`: the site's secure-aggregation component, when the server asks for its unmasking shares
  of round r (its masked update has been sent).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import psutil

FAULT_ENV = "FEDLLM_FAULT"
SITE_FAULT_ENV = "FEDLLM_SITE_FAULT"


def crash_point(point: str, round_number: int | None = None, *, job_process: bool = False) -> None:
    """SIGKILL the server here if FEDLLM_FAULT names this point (and round, or continuation); otherwise nothing.

    `job_process`: the caller runs in a server job process, whose parent is the server's parent process.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or not fault_matches(spec, point, round_number):
        return
    print(f"{FAULT_ENV}={spec}: SIGKILL of the server at {point}", file=sys.stderr, flush=True)
    kill_server(job_process=job_process)


def fault_matches(spec: str, point: str, round_number: int | None) -> bool:
    name, _, at = spec.strip().rpartition(":")
    if not name or not at.isdigit():  # no round given: `point` is the whole spec
        return spec.strip() == point
    return name == point and round_number is not None and int(at) == round_number


def kill_server(*, job_process: bool) -> None:
    """SIGKILL the server's parent process first (it can react to nothing after), its job processes, then this one."""
    me = psutil.Process()
    parent = me.parent() if job_process else me
    victims = [parent, *parent.children(recursive=True)] if parent is not None else []
    for victim in victims:
        if victim.pid != me.pid:
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGKILL)
    os.kill(me.pid, signal.SIGKILL)


def site_crash_point(point: str, site: str, round_number: int | None = None) -> None:
    """SIGKILL the site (its parent and job processes) if FEDLLM_SITE_FAULT names `site` at this point and round.

    Called in a site's job process; unset (always, outside tests), one environment lookup and nothing else.
    """
    spec = os.environ.get(SITE_FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name == site and fault_matches(at, point, round_number):
            print(f"{SITE_FAULT_ENV}={spec}: SIGKILL of {site} at {point}", file=sys.stderr, flush=True)
            kill_server(job_process=True)  # the same tree as a server's: the parent, its job processes, this one
