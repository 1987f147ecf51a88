"""A whole federation on this machine for the length of a `with` block: provision → up → use → down.

The demo, the NeMo GPU proof, the exchange benchmark and the federation tests all need the same
thing: mTLS kits from a site config, the server and sites running as local processes, an admin
session to submit jobs with, and everything stopped afterwards — also when something fails half way.
`running_federation` does the same for kits made beforehand, e.g. the distributed way, each in its
participant's own folder.

    with local_federation(config, workspace / "kits", data_root=workspace) as fed:
        result = fed.submit(job_dir, download=workspace / "results")
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config.site_config import SiteConfig
from fedllm.jobs.submit import JobResult, submit_job
from fedllm.provision import Kits, provision
from fedllm.runtime import native
from fedllm.runtime.admin import admin_session

# Where test federations take their ports: below Linux's ephemeral range (32768-60999).
PORTS_BELOW_EPHEMERAL = (20000, 32000)


def _bindable_together(ports: Sequence[int]) -> bool:
    """Whether every one of `ports` can be bound right now, all at once (so none is counted twice)."""
    with contextlib.ExitStack() as held:
        for port in ports:
            s = held.enter_context(socket.socket())
            try:
                s.bind(("", port))
            except OSError:
                return False
    return True


def free_ports(n: int) -> list[int]:
    """n loopback ports nothing listens on right now, below Linux's ephemeral range (32768-60999).

    A port the kernel could hand out as a source port is unsafe for a server that sites on the same
    machine keep dialing while it is down: one of their retries can connect to itself (TCP
    simultaneous open), and then that site holds the port the restarted server must bind.
    """
    rng = random.Random()
    found: list[int] = []
    for _ in range(200 * n):
        port = rng.randrange(*PORTS_BELOW_EPHEMERAL)
        if port not in found and _bindable_together([port]):
            found.append(port)
            if len(found) == n:
                return found
    raise RuntimeError(f"no {n} free ports found below the ephemeral range")


def free_port_range(n: int = 4, *, avoiding: Collection[int] = ()) -> str:
    """'first-last': n consecutive ports nothing listens on now, below Linux's ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(*PORTS_BELOW_EPHEMERAL)
        if not any(first <= port < first + n for port in avoiding) and _bindable_together(range(first, first + n)):
            return f"{first}-{first + n - 1}"
    raise RuntimeError(f"no {n} consecutive free ports found")


def loopback_config_dict(
    project: str = "fedlocal", sites: int = 3, *, gpus: list[list[int]] | None = None, job_ports: bool = True
) -> dict[str, Any]:
    """A site config (as YAML would hold it) for `sites` sites on this machine, on ports free right now."""
    fl_port, admin_port = free_ports(2)
    return {
        "project": project,
        "nvflare_version": "2.9.0",
        "server": {
            "name": "localhost",
            "fed_learn_port": fl_port,
            "admin_port": admin_port,
            "job_ports": free_port_range(avoiding=(fl_port, admin_port)) if job_ports else None,
        },
        "admins": [{"name": "admin@nvidia.com", "org": "nvidia", "role": "project_admin"}],
        "sites": [{"name": f"site-{i + 1}", "org": "nvidia", "gpus": (gpus[i] if gpus else [])} for i in range(sites)],
    }


@dataclass(frozen=True)
class LocalFederation:
    """A running native federation: its kits, its processes, and the admin's way in."""

    kits: Kits
    processes: list[native.Process]

    @property
    def config(self) -> SiteConfig:
        return self.kits.config

    def admin(self, timeout: float = 30.0) -> contextlib.AbstractContextManager:
        """An admin session (NVFlare's FLARE API) logged in with the project admin's kit."""
        return admin_session(self.kits, timeout=timeout)

    def submit(self, job_dir: Path, *, download: Path | None = None, timeout: float = 3600.0, echo=print) -> JobResult:
        """Submit a job folder, follow it to the end and download its result (fedllm.jobs.submit)."""
        return submit_job(self.kits, job_dir, download=download, timeout=timeout, echo=echo)

    def log(self, name: str) -> Path:
        """The stdout/stderr log of one participant (server or site) of this run."""
        return native.run_dir(self.kits) / "logs" / f"{name}.log"


@contextlib.contextmanager
def local_federation(
    config: SiteConfig,
    workspace: Path,
    *,
    data_root: Path | None = None,
    source: str = "fedllm",
    timeout: float = 120.0,
    echo: Callable[[str], None] = print,
) -> Iterator[LocalFederation]:
    """Provision `config` into `workspace`, start it natively, yield it, and stop it whatever happens.

    `data_root` is what sites' relative `data_dir`s resolve against (default: the current folder).
    """
    kits = provision(config, workspace, source=source, data_root=data_root)
    with running_federation(kits, timeout=timeout, echo=echo) as fed:
        yield fed


@contextlib.contextmanager
def running_federation(
    kits: Kits, *, timeout: float = 120.0, echo: Callable[[str], None] = print
) -> Iterator[LocalFederation]:
    """Start kits that already exist (central or distributed, fedllm.provision.distributed.assemble_kits)
    natively, yield the federation, and stop it whatever happens."""
    processes = native.up(kits, timeout=timeout, echo=echo)
    try:
        yield LocalFederation(kits, processes)
    finally:
        native.down(kits, echo=echo)
