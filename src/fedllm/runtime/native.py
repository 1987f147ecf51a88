"""Run a provisioned federation's server and sites as local processes (no containers).

Each participant starts from its own startup kit with NVFlare's `sub_start.sh --once`
(the same entry a container uses), in its own process group so that `down` can also
reap the per-job processes NVFlare spawns.

What one machine starts is what its workspace holds: every server and site kit of a central
provisioning, or, in a participant's own workspace (distributed provisioning, where each
participant packages its own kit), the kit(s) packaged there. `up` returns once the server
listens and every site it started is registered, and notices within a second a participant
that exits, printing the tail of its log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from nvflare.lighter.utils import update_storage_locations

from fedllm.errors import FedllmError
from fedllm.fileio import write_text
from fedllm.flare.registration import MARKER_NAME
from fedllm.provision import Kits
from fedllm.provision.builders import MANIFEST_NAME
from fedllm.provision.certificates import check_kit_certificate
from fedllm.provision.compose import REGISTRATION_MAX_AGE_S
from fedllm.runtime.admin import AdminError, admin_session, connected_sites, wait_for_sites
from fedllm.runtime.site_env import SERVER_ENVIRONMENT, site_environment

STATE_FILE = "native.json"
# How often `up` looks at its processes, the server's ports and the sites' registration.
POLL_S = 0.3
# How long `up` waits for a just-killed server's ports that no process owns any more (see _wait_for_port).
PORT_RELEASE_WAIT_S = 60.0


class NativeRuntimeError(FedllmError):
    """The federation could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Process:
    name: str
    pid: int
    log: Path


def absolute_kits(kits: Kits) -> Kits:
    """The same kits with absolute paths: NVFlare runs each participant inside its kit folder, where a
    relative path means something else (every entry point of this module resolves them once, here)."""
    return dataclasses.replace(
        kits,
        prod_dir=kits.prod_dir.absolute(),
        elsewhere={name: path.absolute() for name, path in kits.elsewhere.items()},
    )


def run_dir(kits: Kits) -> Path:
    return kits.prod_dir.absolute().parent / "run"


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


def _running(kits: Kits, proc: Process) -> bool:
    """Whether a recorded participant still runs: its pid is alive and works in that participant's kit.

    A pid alone may by now be another program's (after a reboot, or in a damaged state file): `down`
    must never signal that one.
    """
    if proc.name not in (kits.config.server.name, *kits.config.site_names) or not _alive(proc.pid):
        return False
    try:
        return Path(psutil.Process(proc.pid).cwd()) == kits.kit(proc.name).resolve()
    except psutil.Error:
        return False


def read_state(kits: Kits) -> list[Process]:
    """The processes `up` recorded for this workspace (none when it recorded nothing)."""
    path = _state_path(kits)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        procs = [Process(p["name"], p["pid"], Path(p["log"])) for p in data["processes"]]
        if not all(isinstance(p.name, str) and type(p.pid) is int and p.pid > 0 for p in procs):
            raise ValueError("a name that is not text or a pid that is not a positive number")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise NativeRuntimeError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); it records which processes `fedllm up` started "
            "here. Fix: stop any NVFlare processes of this workspace that still run (`ps -ef | grep nvflare`), "
            "then delete the file"
        ) from None
    return procs


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


def _is_central(kits: Kits) -> bool:
    """Kits of one provisioning run (every kit side by side, one manifest) or kits assembled from elsewhere."""
    return bool(kits.elsewhere) or (kits.prod_dir / MANIFEST_NAME).is_file()


def local_participants(kits: Kits) -> list[str]:
    """The server and sites this workspace starts: all of them for central kits, else those packaged here.

    A participant's own workspace (distributed provisioning) holds its own kit, and maybe other kits of
    its organization, never the whole federation: the rest runs elsewhere and is reached over the network.
    """
    names = [kits.config.server.name, *kits.config.site_names]
    if _is_central(kits):
        return names
    here = [name for name in names if (kits.kit(name) / "startup").is_dir()]
    if not here:
        admins = [a.name for a in kits.config.admins if (kits.kit(a.name) / "startup").is_dir()]
        held = f"only the admin kit of {', '.join(admins)}" if admins else "no startup kit"
        raise NativeRuntimeError(
            f"{kits.prod_dir} holds {held}: no server or site of project '{kits.config.project}' to start here. "
            "An admin starts nothing; it submits jobs (`fedllm job submit`) or opens the console "
            "(startup/fl_admin.sh, or the kit's compose bundle)"
        )
    return here


def _is_whole(kits: Kits, names: Sequence[str]) -> bool:
    return set(names) == {kits.config.server.name, *kits.config.site_names}


def _has_admin_kit(kits: Kits) -> bool:
    return (kits.admin() / "startup" / "fed_admin.json").is_file()


def _preflight(kits: Kits, names: Sequence[str], ports: bool = True, echo: Callable[[str], None] = print) -> None:
    # An expired or foreign certificate makes NVFlare retry its connection without a word: say it first.
    for name in names:
        check_kit_certificate(kits.kit(name))
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
        _wait_for_port(port, echo)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_port(port: int, echo: Callable[[str], None], wait_s: float = PORT_RELEASE_WAIT_S) -> None:
    """Return once the server could bind `port`; a port a live process holds is an error at once.

    A server SIGKILLed a moment ago can leave its listening socket behind with no process owning it
    (seen on CI's 2-core VM after fault-injected kills: it even completes the sites' reconnects) until the
    kernel lets it go, a few seconds later: `up` after a crash waits for that instead of failing.
    """
    deadline = time.monotonic() + wait_s
    said = False
    while not _bindable(port):
        sockets = _port_sockets(port)
        held = _port_holder(port, sockets)
        ownerless = bool(sockets) and not sockets[0].pid  # sorted: an owned socket would come first
        if not ownerless or time.monotonic() > deadline:
            waited = f" (waited {wait_s:.0f} s for it to be released)" if said else ""
            raise NativeRuntimeError(
                f"port {port} is already in use{held}{waited}; stop the federation that holds it "
                "(`fedllm down`) or change server.fed_learn_port / server.admin_port in the site config and "
                "re-provision"
            )
        if not said:
            echo(f"port {port} is still held{held}; waiting up to {wait_s:.0f} s for the kernel to release it")
            said = True
        time.sleep(0.2)


def _port_sockets(port: int) -> list:
    """This machine's TCP sockets on local `port`, a live owner's first and listening ones first among them."""
    try:
        found = [c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port]
    except (psutil.Error, OSError):
        return []
    return sorted(found, key=lambda c: (c.pid is None, c.status != psutil.CONN_LISTEN))


def _port_holder(port: int, sockets: list) -> str:
    """' by pid N (name, state)' for the first of `sockets` (from _port_sockets); '' where none is seen.

    A connection from the port to itself is a client that dialed the stopped server from a source port the
    kernel happened to pick equal to it (TCP simultaneous open): only a server port in the ephemeral range
    (/proc/sys/net/ipv4/ip_local_port_range) lets a same-machine site do that.
    """
    if not sockets:
        return ""
    conn = sockets[0]
    if not conn.pid:  # the kernel's, or another user's: say what state it is in
        return f" by a socket in state {conn.status} that no process of this user owns"
    who = f"pid {conn.pid} ({_process_name(conn.pid)}, {conn.status})"
    if conn.raddr and conn.raddr.port == port and conn.raddr.ip == conn.laddr.ip:
        return (
            f" by a connection of {who} to itself, made while it dialed the stopped server from a source "
            "port equal to the server's: restart that participant, and give the server a port below the "
            "ephemeral range (see /proc/sys/net/ipv4/ip_local_port_range)"
        )
    return f" by {who}"


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "gone"


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
    # The marker a registered site keeps fresh (fedllm.flare.registration): a stale one must not count.
    (kits.site(name) / MARKER_NAME).unlink(missing_ok=True)
    proc = _spawn(name, kits.site(name), {**_base_env(), **site_environment(kits.site(name))}, logs)
    echo(f"started site '{name}' (pid {proc.pid}, GPUs {','.join(map(str, site.gpus)) or 'none'})")
    return proc


def _exited(procs: Sequence[Process]) -> Callable[[], None]:
    """A check that raises, with the tail of its log, as soon as one of the processes has exited."""

    def check() -> None:
        for p in procs:
            if not _alive(p.pid):
                raise NativeRuntimeError(f"'{p.name}' exited during start-up; last lines of {p.log}:\n{_tail(p.log)}")

    return check


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for_server(kits: Kits, check: Callable[[], None], deadline: float) -> None:
    """Until the server accepts connections on its admin port (NVFlare opens it once the server runs)."""
    server = kits.config.server
    while not _port_open(server.name, server.admin_port):
        check()
        if time.monotonic() > deadline:
            raise NativeRuntimeError(
                f"the server '{server.name}' did not open its admin port {server.admin_port} in time; "
                f"see {run_dir(kits) / 'logs' / (server.name + '.log')}"
            )
        time.sleep(POLL_S)


def _registered_here(kits: Kits, site: str, max_age: float | None = None) -> bool:
    """Whether a site running from this workspace is registered with the server, by its own marker."""
    marker = kits.site(site) / MARKER_NAME
    try:
        age = time.time() - marker.stat().st_mtime
    except OSError:
        return False
    return max_age is None or age < max_age


def _wait_for_markers(kits: Kits, sites: Sequence[str], check: Callable[[], None], deadline: float) -> None:
    """Until every site started here has registered with the (remote) server, by its own marker."""
    server = kits.config.server
    while missing := [s for s in sites if not _registered_here(kits, s)]:
        check()
        if time.monotonic() > deadline:
            raise NativeRuntimeError(
                f"{', '.join(missing)} did not register with the server {server.name}:{server.fed_learn_port} "
                f"in time; is the server up and reachable from here? See {run_dir(kits) / 'logs'}"
            )
        time.sleep(POLL_S)


def up(kits: Kits, timeout: float = 120.0, echo=print) -> list[Process]:
    """Start the server and sites whose kits this workspace holds; return once they are ready.

    Ready: the server listens, and every site is registered (the server's own list when the whole
    federation runs from here with its admin kit, else each site's registration marker). A participant
    that exits meanwhile stops the wait at once, with the tail of its log.

    Participants still running are left alone: after a crash (or `kill`), `up` starts the ones that died,
    and the server continues the FedAvg jobs it was running (fedllm.flare.resume).
    """
    kits = absolute_kits(kits)
    names = local_participants(kits)
    server = kits.config.server.name
    alive = {p.name: p for p in read_state(kits) if p.name in names and _running(kits, p)}
    if set(names) <= set(alive):
        raise NativeRuntimeError(
            f"{', '.join(alive)} already running from {kits.prod_dir.parent}; run `fedllm down` first"
        )
    _preflight(kits, [n for n in names if n not in alive], ports=server in names and server not in alive, echo=echo)
    started: dict[str, Process] = {}
    try:
        for name in names:
            if name not in alive:
                started[name] = _start(kits, name, echo)
    except BaseException:
        _terminate(list(started.values()), grace=5.0)
        raise
    procs = [alive.get(name) or started[name] for name in names]
    _write_state(kits, procs)

    t0 = time.monotonic()
    deadline = t0 + timeout
    check = _exited(procs)
    sites = [n for n in names if n != server]
    try:
        if server in names:
            _wait_for_server(kits, check, deadline)
        if server in names and _has_admin_kit(kits):
            # The server's own view; the session opens at once now that the admin port listens.
            remaining = max(deadline - time.monotonic(), 5.0)
            with admin_session(kits, timeout=min(remaining, 30.0)) as session:
                wait_for_sites(session, sites, timeout=remaining, check=check, poll_s=POLL_S)
        else:
            _wait_for_markers(kits, [s for s in sites if s in started], check, deadline)
    except (AdminError, NativeRuntimeError):
        _terminate(list(started.values()), grace=5.0)
        survivors = [p for p in procs if p.name not in started and _alive(p.pid)]
        if survivors:
            _write_state(kits, survivors)
        else:
            _state_path(kits).unlink(missing_ok=True)
        raise
    took = f"{time.monotonic() - t0:.1f}s"
    if _is_whole(kits, names):
        echo(f"all {len(sites)} sites registered in {took}")
    else:
        address = f"{kits.config.server.name}:{kits.config.server.fed_learn_port}"
        if server in names:
            echo(f"server '{server}' listening in {took} (sites register with {address} as they start)")
        if sites:
            echo(f"{', '.join(sites)} registered with the server {address} in {took}")
    return procs


REGISTERED = "Successfully registered client:{name}"


def restart_site(kits: Kits, name: str, timeout: float = 120.0, echo=print) -> Process:
    """Stop one running site and start it again from its kit (e.g. after its key was rotated); the rest keep running.

    The server forgets a stopped site only after its heartbeat timeout, so the new process counts as
    registered when its own log says so, not when the server lists the name.
    """
    kits = absolute_kits(kits)
    procs = read_state(kits)
    old = next((p for p in procs if p.name == name and _running(kits, p)), None)
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
        time.sleep(POLL_S)
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
    """Stop what runs natively from this workspace, then make sure every process is gone.

    The whole federation (its server, every site and the admin kit here) is shut down through the admin
    API; a participant's own kit(s) only by signal: an admin command would reach the rest of the federation.
    """
    kits = absolute_kits(kits)
    procs = read_state(kits)
    alive = [p for p in procs if _running(kits, p)]
    if not alive:
        echo(f"nothing runs natively from {kits.prod_dir.parent}")
        _state_path(kits).unlink(missing_ok=True)
        return
    job_pids = _descendants(alive)
    grace = timeout
    if _is_whole(kits, [p.name for p in procs]) and _has_admin_kit(kits):
        try:
            # FLARE prints connection chatter while it waits for the server to go away.
            with admin_session(kits, timeout=10.0) as session, _quiet():
                session.shutdown("all", wait=True, timeout=timeout)
            echo("server and sites acknowledged shutdown")
        except Exception as exc:  # the server may be gone, or the admin may not operate every site (its role)
            echo(f"admin shutdown failed ({exc}); stopping processes directly")
            grace = 5.0  # for those the command did reach
    else:
        echo(f"stopping {', '.join(p.name for p in alive)} (the rest of the federation does not run from here)")
        _terminate(alive, grace=10.0, job_pids=job_pids, signals=(signal.SIGTERM,))
        grace = 0.0
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p.pid) for p in alive):
        time.sleep(0.3)
    _terminate([p for p in alive if _alive(p.pid)], grace=5.0, job_pids=job_pids)
    # Job processes that outlived their parent.
    _terminate(alive, grace=2.0, job_pids=job_pids)
    _state_path(kits).unlink(missing_ok=True)
    echo("federation stopped" if _is_whole(kits, [p.name for p in procs]) else "stopped")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def status(kits: Kits) -> dict[str, bool]:
    """Each participant started from this workspace, and whether its process still runs."""
    kits = absolute_kits(kits)
    return {p.name: _running(kits, p) for p in read_state(kits)}


@dataclass(frozen=True)
class ParticipantState:
    """One server or site as `fedllm status` reports it."""

    name: str
    role: str  # "server" | "site"
    here: bool  # its kit is in this workspace
    pid: int | None  # running natively from this workspace
    registered: bool | None = None  # sites: registered with the server; None: cannot be told from here


@dataclass(frozen=True)
class FederationState:
    participants: list[ParticipantState]
    server_address: str  # the server's admin port, host:port
    server_reachable: bool  # it accepts connections from here
    asked_server: bool  # the sites' registration is the server's own list (else each local site's marker)


def federation_state(kits: Kits, admin_timeout: float = 10.0) -> FederationState:
    """Which participants run from here and which sites are registered, asking cheaply first.

    The admin port is probed with a plain TCP connect (at once when nothing listens); only a listening
    server is asked, quietly, through an admin session, for the sites it has registered. Without the
    admin kit (a participant's own workspace) a site running here is registered while its marker is fresh.
    """
    kits = absolute_kits(kits)
    server = kits.config.server
    names = local_participants(kits)
    running = {p.name: p.pid for p in read_state(kits) if _running(kits, p)}
    reachable = _port_open(server.name, server.admin_port)
    listed: set[str] | None = None
    if reachable and _has_admin_kit(kits):
        with contextlib.suppress(AdminError), admin_session(kits, timeout=admin_timeout) as session:
            listed = connected_sites(session)

    def registered(site: str) -> bool | None:
        if listed is not None:
            return site in listed
        if not reachable and _is_whole(kits, names):
            return False  # no server, no registration
        if site in names:  # its kit is here: registered while it runs and its marker is fresh
            return site in running and _registered_here(kits, site, max_age=REGISTRATION_MAX_AGE_S)
        return None

    states = [ParticipantState(server.name, "server", server.name in names, running.get(server.name))]
    states += [ParticipantState(s, "site", s in names, running.get(s), registered(s)) for s in kits.config.site_names]
    return FederationState(states, f"{server.name}:{server.admin_port}", reachable, listed is not None)


def _participant(kits: Kits, name: str) -> Process:
    for proc in read_state(kits):
        if proc.name == name and _running(kits, proc):
            return proc
    running = [p.name for p in read_state(kits) if _running(kits, p)]
    raise NativeRuntimeError(
        f"'{name}' does not run natively from {kits.prod_dir.parent} "
        f"(running: {', '.join(running) or 'none; `fedllm up` starts them'})"
    )


def kill(kits: Kits, name: str) -> None:
    """SIGKILL one participant and the job processes it started, as a crash or an OOM kill would (drills, tests).

    Nothing is told first: the server's job store keeps what it had, a site's job processes die with it.
    `up` starts it again.
    """
    kits = absolute_kits(kits)
    proc = _participant(kits, name)
    job_pids = _descendants([proc])  # in sessions of their own (NVFlare), found while the parent lives
    _terminate([proc], grace=10.0, job_pids=job_pids, signals=(signal.SIGKILL,))
