"""Run a provisioned federation as local processes (no containers).

Each participant starts from its own startup kit with NVFlare's `sub_start.sh --once`
(the same entry a container uses), in its own process group so that `down` can also
reap the per-job processes NVFlare spawns. Readiness is polled through the admin API.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from nvflare.lighter.utils import update_storage_locations

from fedllm.errors import FedllmError
from fedllm.fileio import write_text
from fedllm.provision import Kits
from fedllm.provision.certificates import check_kit_certificate
from fedllm.runtime.admin import AdminError, admin_session, wait_for_sites
from fedllm.runtime.site_env import SERVER_ENVIRONMENT, site_environment

STATE_FILE = "native.json"


class NativeRuntimeError(FedllmError):
    """The federation could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Process:
    name: str
    pid: int
    log: Path


def run_dir(kits: Kits) -> Path:
    return kits.prod_dir.parent / "run"


def _state_path(kits: Kits) -> Path:
    return run_dir(kits) / STATE_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def read_state(kits: Kits) -> list[Process]:
    path = _state_path(kits)
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [Process(p["name"], p["pid"], Path(p["log"])) for p in data.get("processes", [])]


def _write_state(kits: Kits, procs: list[Process]) -> None:
    data = {
        "prod_dir": str(kits.prod_dir),
        "processes": [{"name": p.name, "pid": p.pid, "log": str(p.log)} for p in procs],
    }
    write_text(_state_path(kits), json.dumps(data, indent=2))


def _tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _preflight(kits: Kits, ports: bool = True) -> None:
    # An expired or foreign certificate makes NVFlare retry its connection without a word: say it first.
    for kit in (kits.server(), *(kits.site(s) for s in kits.config.site_names)):
        check_kit_certificate(kit)
    server = kits.config.server
    try:
        socket.getaddrinfo(server.name, server.fed_learn_port)
    except socket.gaierror:
        raise NativeRuntimeError(
            f"server name '{server.name}' does not resolve on this machine, so native sites cannot dial it. "
            "For a one-machine run use a config whose server is 'localhost' (site_configs/local.yaml), "
            f"or map the name in /etc/hosts (127.0.0.1 {server.name})"
        ) from None
    for port in (server.fed_learn_port, server.admin_port) if ports else ():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise NativeRuntimeError(
                    f"port {port} is already in use; stop the federation that holds it (`fedllm down`) "
                    "or change server.fed_learn_port / server.admin_port in the site config and re-provision"
                ) from None


def _spawn(name: str, kit: Path, env: dict[str, str], logs: Path) -> Process:
    kit = kit.absolute()  # sub_start.sh runs inside its kit: a relative path would not be found there
    script = kit / "startup" / "sub_start.sh"
    if not script.is_file():
        raise NativeRuntimeError(f"startup kit {kit} has no startup/sub_start.sh; re-run `fedllm provision`")
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["bash", str(script), "--once"],
            cwd=kit,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: `down` reaps job processes too
        )
    return Process(name, proc.pid, log)


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    # sub_start.sh runs `python3` from PATH: make it this interpreter (the one with nvflare + fedllm).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(kits: Kits, name: str, echo=print) -> Process:
    """Start one participant (the server or a site) from its kit, as `up` does."""
    logs = run_dir(kits) / "logs"
    if name == kits.config.server.name:
        # NVFlare's kits keep the job store and snapshots in /tmp/nvflare, shared by every federation on the
        # machine; like NVFlare's own POC mode, move them into this server's workspace.
        update_storage_locations(str(kits.server() / "local"), str(kits.server()))
        # fedllm's server defaults; a value already in the environment wins.
        proc = _spawn(name, kits.server(), {**SERVER_ENVIRONMENT, **_base_env()}, logs)
        echo(f"started server '{name}' (pid {proc.pid}) from {kits.server()}")
        return proc
    site = kits.config.site(name)
    proc = _spawn(name, kits.site(name), {**_base_env(), **site_environment(kits.site(name))}, logs)
    echo(f"started site '{name}' (pid {proc.pid}, GPUs {','.join(map(str, site.gpus)) or 'none'})")
    return proc


def up(kits: Kits, timeout: float = 120.0, echo=print) -> list[Process]:
    """Start server and sites from their kits and wait until every site is registered.

    Participants still running are left alone: after a crash (or `kill`), `up` starts the ones that died,
    and the server continues the FedAvg jobs it was running (fedllm.flare.resume).
    """
    names = [kits.config.server.name, *kits.config.site_names]
    alive = {p.name: p for p in read_state(kits) if _alive(p.pid)}
    if set(names) <= set(alive):
        raise NativeRuntimeError(
            f"a native federation is already running from {kits.prod_dir.parent} "
            f"({', '.join(alive)}); run `fedllm down` first"
        )
    _preflight(kits, ports=kits.config.server.name not in alive)
    started = {name: _start(kits, name, echo) for name in names if name not in alive}
    procs = [alive.get(name) or started[name] for name in names]
    _write_state(kits, procs)

    def check_alive() -> None:
        for p in procs:
            if not _alive(p.pid):
                raise NativeRuntimeError(f"'{p.name}' exited during start-up; last lines of {p.log}:\n{_tail(p.log)}")

    try:
        t0 = time.monotonic()
        with admin_session(kits, timeout=timeout) as session:
            wait_for_sites(session, kits.config.site_names, timeout=timeout, check=check_alive)
        echo(f"all {len(kits.config.sites)} sites registered in {time.monotonic() - t0:.1f}s")
    except (AdminError, NativeRuntimeError):
        _terminate(list(started.values()), grace=5.0)
        survivors = [p for p in procs if p.name not in started and _alive(p.pid)]
        if survivors:
            _write_state(kits, survivors)
        else:
            _state_path(kits).unlink(missing_ok=True)
        raise
    return procs


REGISTERED = "Successfully registered client:{name}"


def restart_site(kits: Kits, name: str, timeout: float = 120.0, echo=print) -> Process:
    """Stop one running site and start it again from its kit (e.g. after its key was rotated); the rest keep running.

    The server forgets a stopped site only after its heartbeat timeout, so the new process counts as
    registered when its own log says so, not when the server lists the name.
    """
    procs = read_state(kits)
    old = next((p for p in procs if p.name == name and _alive(p.pid)), None)
    if old is None or name not in kits.config.site_names:
        raise NativeRuntimeError(
            f"site '{name}' is not running natively from {kits.prod_dir.parent}; start the federation with `fedllm up`"
        )
    check_kit_certificate(kits.site(name))
    _terminate([old], grace=5.0, job_pids=_descendants([old]))
    before = old.log.read_text(errors="replace").count(REGISTERED.format(name=name)) if old.log.is_file() else 0
    new = _start(kits, name, echo=lambda _m: None)
    _write_state(kits, [new if p.name == name else p for p in procs])
    deadline = time.monotonic() + timeout
    while new.log.read_text(errors="replace").count(REGISTERED.format(name=name)) <= before:
        if not _alive(new.pid):
            raise NativeRuntimeError(f"'{name}' exited during start-up; last lines of {new.log}:\n{_tail(new.log)}")
        if time.monotonic() > deadline:
            raise NativeRuntimeError(f"'{name}' did not register within {timeout:.0f}s; see {new.log}")
        time.sleep(0.3)
    echo(f"restarted site '{name}' (pid {new.pid}) from {kits.site(name)}")
    return new


def _descendants(procs: list[Process]) -> list[int]:
    """Pids of everything the processes started, found while the parents still live.

    NVFlare 2.9 starts every job process in a session of its own (setsid), so signalling a
    site's process group does not reach its running job.
    """
    pids: list[int] = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            pids += [child.pid for child in psutil.Process(p.pid).children(recursive=True)]
    return pids


def _terminate(
    procs: list[Process],
    grace: float,
    job_pids: Sequence[int] = (),
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGKILL),
) -> None:
    """Signal each process group and job process, waiting up to `grace` after each signal for them to go."""
    for sig in signals:
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        for pid in job_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in [*(p.pid for p in procs), *job_pids]):
            time.sleep(0.2)


def down(kits: Kits, timeout: float = 60.0, echo=print) -> None:
    """Stop the federation through the admin API, then make sure every process is gone."""
    procs = read_state(kits)
    alive = [p for p in procs if _alive(p.pid)]
    if not alive:
        echo("no native federation is running")
        _state_path(kits).unlink(missing_ok=True)
        return
    job_pids = _descendants(alive)
    grace = timeout
    try:
        # FLARE prints connection chatter while it waits for the server to go away.
        with admin_session(kits, timeout=10.0) as session, _quiet():
            session.shutdown("all", wait=True, timeout=timeout)
        echo("server and sites acknowledged shutdown")
    except Exception as exc:  # the server may be gone, or the admin may not operate every site (its role)
        echo(f"admin shutdown failed ({exc}); stopping processes directly")
        grace = 5.0  # for those the command did reach
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p.pid) for p in alive):
        time.sleep(0.3)
    _terminate([p for p in alive if _alive(p.pid)], grace=5.0, job_pids=job_pids)
    # Job processes that outlived their parent.
    _terminate(alive, grace=2.0, job_pids=job_pids)
    _state_path(kits).unlink(missing_ok=True)
    echo("federation stopped")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def status(kits: Kits) -> dict[str, bool]:
    return {p.name: _alive(p.pid) for p in read_state(kits)}


def _participant(kits: Kits, name: str) -> Process:
    for proc in read_state(kits):
        if proc.name == name:
            return proc
    raise NativeRuntimeError(
        f"'{name}' is not part of the native federation started from {kits.prod_dir.parent} "
        f"(participants: {', '.join(p.name for p in read_state(kits)) or 'none: run `fedllm up --native`'})"
    )


def kill(kits: Kits, name: str) -> None:
    """SIGKILL one participant and the job processes it started, as a crash or an OOM kill would (drills, tests).

    Nothing is told first: the server's job store keeps what it had, a site's job processes die with it.
    `up` starts it again.
    """
    proc = _participant(kits, name)
    job_pids = _descendants([proc])  # in sessions of their own (NVFlare), found while the parent lives
    _terminate([proc], grace=10.0, job_pids=job_pids, signals=(signal.SIGKILL,))
