"""ComposeBuilder: the docker compose files of a federation, written while NVFlare provisions its kits.

Layout (Flower-style layering: a base file plus overlays):

    prod_NN/compose/compose.yaml      server, every site on the server's host, admin (profile "admin")
    prod_NN/compose/compose.gpu.yaml  each site pinned to its GPUs (deploy.resources.reservations.devices)
    prod_NN/compose/compose.cpu.yaml  the same stack without GPUs (CI, laptops): preflight skipped
    prod_NN/compose/.env              image, uid, and COMPOSE_FILE = base + GPU overlay
    prod_NN/hosts/<host>/...          the same three files for sites on other hosts (multi-host only)

Every service mounts only its own kit (read-only) and its own data dir (read-only), and writes into its
own named volume. Paths to kits are relative (`../<participant>`), so a prod dir can be copied whole.
Bind mounts never create their source: a missing data dir stops the site with Docker's "bind source
path does not exist: <path>" instead of an empty root-owned folder.

The admin service (`docker compose run --rm admin`) works in a tmpfs (its staged kit copy never
touches a disk) and shares two host folders, set in `.env`: the jobs folder (`/fedllm/jobs`, where the
console's `submit_job NAME` looks) and the results folder (`/fedllm/results`, where `download_job`
and `job submit --download /fedllm/results` write), `runs/jobs` and `runs/results` of the folder
provisioning ran in, as for native runs. With no named volume of its own, `docker compose down -v`
leaves nothing behind.

Each server and site service carries its kit's digest as a label: re-provisioning changes the
service definition exactly where a kit changed, so `docker compose up -d` recreates those containers
(and only those) under either overlay. Sites have a healthcheck that means "registered with the
server": fedllm.flare.registration.RegistrationMarker, added to every site kit's resources, keeps a
file fresh while the site is registered, so `docker compose up -d --wait` returns when the federation
is ready.

A kit made the distributed way (fedllm.provision.distributed: each participant packages its own kit)
carries its own bundle, `prod_NN/<participant>/compose/`, with that one participant: the server alone,
a site that dials the server by name, or one admin's console. It lives inside the kit because NVFlare's
`nvflare package` adds each newly packaged kit to prod_NN without touching what is already beside it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedllm.config.site_config import Site, SiteConfig
from fedllm.fileio import write_text
from fedllm.flare.registration import MARKER_NAME
from fedllm.provision.builders import add_parent_component

COMPOSE_DIR = "compose"
HOSTS_DIR = "hosts"
OVERLAYS = ("gpu", "cpu")
# Where the image expects things (docker/Dockerfile).
KIT_MOUNT = "/fedllm/kit"
DATA_MOUNT = "/fedllm/data"
WORKSPACE_MOUNT = "/fedllm/workspace"
RESULTS_MOUNT = "/fedllm/results"
JOBS_MOUNT = "/fedllm/jobs"
# Host folders shared with the admin container, relative to the folder provisioning ran in (as `data/<site>`).
JOBS_DIR = "runs/jobs"
RESULTS_DIR = "runs/results"
JOBS_ENV = "FEDLLM_JOBS_DIR"
RESULTS_ENV = "FEDLLM_RESULTS_DIR"
# Inside the admin container: the same folders' host paths, for the messages that name them.
HOST_JOBS_ENV = "FEDLLM_HOST_JOBS_DIR"
HOST_RESULTS_ENV = "FEDLLM_HOST_RESULTS_DIR"
KIT_DIGEST_LABEL = "fedllm.kit-digest"
# A site is healthy while its registration marker is younger than this (NVFlare heartbeats every 10 s).
REGISTRATION_MAX_AGE_S = 60
ADMIN_SERVICE = "admin"
ADMIN_PROFILE = "admin"
# The CPU overlay cannot raise memlock: an unprivileged runc (CI, rootless, laptops) fails with
# "error setting rlimit type 8" for memlock -1, and nothing on CPU pins memory for NCCL anyway.
HEADER = "# Written by fedllm's ComposeBuilder from {source}; edit the site config and re-provision instead.\n"
# The site healthcheck: the marker RegistrationMarker keeps fresh, read with nothing but the stdlib.
SITE_HEALTH = (
    "import os, sys, time; "
    f"p = '{WORKSPACE_MOUNT}/{MARKER_NAME}'; "
    "age = time.time() - os.path.getmtime(p) if os.path.exists(p) else None; "
    f"ok = age is not None and age < {REGISTRATION_MAX_AGE_S}; "
    "print('registered with the server' if ok else 'not registered with the server' "
    "+ ('' if age is None else f' (last heartbeat {age:.0f} s ago)')); "
    "sys.exit(0 if ok else 1)"
)
REGISTRATION_COMPONENT = {
    "id": "fedllm_registration_marker",
    "path": "fedllm.flare.registration.RegistrationMarker",
    "args": {"file_name": MARKER_NAME},
}


def server_host(config: SiteConfig) -> str:
    return config.server.host or "localhost"


def sites_by_host(config: SiteConfig) -> dict[str, list[Site]]:
    """Sites grouped by the machine they run on, the server's host first ('localhost' = the server's host)."""
    home = server_host(config)
    groups: dict[str, list[Site]] = {home: []}
    for site in config.sites:
        groups.setdefault(home if site.host == "localhost" else site.host, []).append(site)
    return groups


def _dump(path: Path, data: dict[str, Any], source: str) -> None:
    """Write YAML atomically (temp + rename): a half-written compose file must never be picked up."""
    write_text(path, HEADER.format(source=source) + yaml.safe_dump(data, sort_keys=False))


def _write_env(path: Path, values: dict[str, str]) -> None:
    write_text(path, "".join(f"{k}={v}\n" for k, v in values.items()))


def read_env(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of a `.env` this builder wrote."""
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {k.strip(): v.strip() for k, v in pairs}


def console_jobs_dir(workspace: Path, project: str) -> Path | None:
    """The folder the admin console's `submit_job` reads, as seen here; None where none is provisioned.

    FEDLLM_JOBS_DIR when set (the admin container sets it to its mount; on the host it overrides the
    .env, for compose as for this lookup), else what the newest provisioning wrote into its .env.
    """
    from fedllm.provision.provisioner import CURRENT_LINK

    value = os.environ.get(JOBS_ENV) or read_env(workspace / project / CURRENT_LINK / COMPOSE_DIR / ".env").get(
        JOBS_ENV
    )
    return Path(value) if value else None


def kit_digest(kit: Path) -> str:
    """A fingerprint of every file of a kit (names and bytes): it changes exactly when the kit does.

    A distributed kit's own compose bundle (`<kit>/compose/`) is not part of what it fingerprints.
    """
    digest = hashlib.sha256()
    files = (p for p in kit.rglob("*") if p.is_file() and p.relative_to(kit).parts[0] != COMPOSE_DIR)
    for path in sorted(files):
        digest.update(str(path.relative_to(kit)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _bind(source: str, target: str, read_only: bool) -> dict[str, Any]:
    """A bind mount that fails when its source is missing (Docker would otherwise create it, empty, as root)."""
    return {"type": "bind", "source": source, "target": target, "read_only": read_only,
            "bind": {"create_host_path": False}}  # fmt: skip


def _required(variable: str) -> str:
    return "${" + variable + ":?is set in the bundle's .env by fedllm provision}"


def _volume(name: str) -> dict[str, Any]:
    return {"type": "volume", "source": name, "target": WORKSPACE_MOUNT}


class ComposeBuilder(Builder):
    """Writes compose files for the validated site config into every provisioned prod dir."""

    def __init__(self, site_config: dict[str, Any], source: str, data_root: str, participant: str | None = None):
        self.config = SiteConfig.model_validate(site_config)
        self.source = source
        self.data_root = Path(data_root)
        # Set when one participant packages its own kit: its bundle holds that participant only.
        self.participant = participant

    # ---- services -------------------------------------------------------------------------------
    def _user_ids(self) -> tuple[str, str]:
        """The containers' uid and gid as compose variables (.env sets them; the config's uid otherwise)."""
        default = str(self.config.container.uid)
        return "${FEDLLM_UID:-" + default + "}", "${FEDLLM_GID:-" + default + "}"

    def _common(self, kit_rel: str) -> dict[str, Any]:
        c = self.config.container
        return {
            "image": "${FEDLLM_IMAGE:-" + c.image + "}",
            "user": ":".join(self._user_ids()),
            # An init as PID 1: python as PID 1 ignores SIGTERM, so `docker compose down` would wait 10 s and kill.
            "init": True,
            "restart": c.restart,
            "volumes": [_bind(kit_rel, KIT_MOUNT, read_only=True)],
        }

    def _server(self, kit_rel: str, digest: str) -> dict[str, Any]:
        server = self.config.server
        svc = self._common(kit_rel)
        svc["command"] = ["server"]
        svc["hostname"] = server.name
        svc["labels"] = {KIT_DIGEST_LABEL: digest}
        svc["volumes"].append(_volume(f"{server.name}-workspace"))
        svc["networks"] = {"default": {"aliases": [server.name]}}
        svc["ports"] = [f"{p}:{p}" for p in (server.fed_learn_port, server.admin_port)]
        if server.job_ports:  # each running job's own mTLS listener (JobConnectionsBuilder)
            svc["ports"].append(f"{server.job_ports}:{server.job_ports}")
        svc["healthcheck"] = {
            # Healthy once the admin port accepts connections: NVFlare opens it when the server has started.
            "test": [
                "CMD",
                "python3",
                "-c",
                f"import socket; socket.create_connection(('127.0.0.1', {server.admin_port}), 2).close()",
            ],
            "interval": "2s",
            "timeout": "3s",
            "retries": 60,
            "start_period": "5s",
        }
        return svc

    def _site(self, site: Site, kit_rel: str, digest: str, with_server: bool) -> dict[str, Any]:
        svc = self._common(kit_rel)
        svc["command"] = ["site"]
        svc["hostname"] = site.name
        svc["labels"] = {KIT_DIGEST_LABEL: digest}
        svc["volumes"] += [
            _bind(str(site.data_path(self.data_root)), DATA_MOUNT, read_only=True),
            _volume(f"{site.name}-workspace"),
        ]
        svc["shm_size"] = site.shm_size
        svc["ulimits"] = {"stack": self.config.container.ulimits.stack}
        svc["environment"] = {"FEDLLM_SITE_NAME": site.name, "FEDLLM_DATA_DIR": DATA_MOUNT}
        svc["healthcheck"] = {
            # Healthy while registered with the server (RegistrationMarker); `up --wait` waits for it.
            "test": ["CMD", "python3", "-c", SITE_HEALTH],
            "interval": "5s",
            "timeout": "5s",
            "retries": 3,
            "start_period": "120s",
        }
        if with_server:
            svc["depends_on"] = {self._server_service(): {"condition": "service_healthy"}}
        return svc

    def _admin(self, kit_rel: str, name: str | None = None, with_server: bool = True) -> dict[str, Any]:
        admin = next((a for a in self.config.admins if a.name == name), self.config.admin)
        uid, gid = self._user_ids()
        svc = self._common(kit_rel)
        svc["restart"] = "no"
        svc["profiles"] = [ADMIN_PROFILE]
        # `docker compose run --rm admin` → the console; `... admin job submit DIR` → `fedllm job submit DIR`.
        svc["entrypoint"] = ["fedllm", "container-entry", "admin"]
        svc["stdin_open"] = True
        svc["tty"] = True
        jobs, results = (_required(name) for name in (JOBS_ENV, RESULTS_ENV))
        svc["environment"] = {
            "FEDLLM_ADMIN_USER": admin.name,
            JOBS_ENV: JOBS_MOUNT,  # `fedllm job create` in the container prints the console's path for this folder
            HOST_JOBS_ENV: jobs,
            HOST_RESULTS_ENV: results,
        }
        # No named volume: the staged kit lives in memory and goes with the container.
        svc["tmpfs"] = [f"{WORKSPACE_MOUNT}:uid={uid},gid={gid},mode=0700"]
        svc["volumes"] += [_bind(jobs, JOBS_MOUNT, read_only=False), _bind(results, RESULTS_MOUNT, read_only=False)]
        if with_server:
            svc["depends_on"] = {self._server_service(): {"condition": "service_healthy"}}
        return svc

    def _server_service(self) -> str:
        return self.config.server.name.replace(".", "-")

    # ---- files ----------------------------------------------------------------------------------
    def _gpu_overlay(self, sites: list[Site]) -> dict[str, Any]:
        services = {}
        for site in sites:
            ids = [str(g) for g in site.gpus]
            svc: dict[str, Any] = {
                "environment": {
                    # The NVIDIA runtime exposes these host GPUs; inside, CUDA numbers them 0..n-1.
                    "NVIDIA_VISIBLE_DEVICES": ",".join(ids) if ids else "void",
                    "FEDLLM_GPU_COUNT": str(len(ids)),
                },
                "ulimits": {"memlock": self.config.container.ulimits.memlock},
            }
            if ids:
                svc["deploy"] = {
                    "resources": {
                        "reservations": {"devices": [{"driver": "nvidia", "device_ids": ids, "capabilities": ["gpu"]}]}
                    }
                }
            services[site.name] = svc
        return {"services": services}

    def _cpu_overlay(self, sites: list[Site]) -> dict[str, Any]:
        env = {"FEDLLM_ACCELERATOR": "cpu", "FEDLLM_SKIP_GPU_PREFLIGHT": "1", "NVIDIA_VISIBLE_DEVICES": "void"}
        return {"services": {site.name: {"environment": dict(env)} for site in sites}}

    def _write_bundle(self, wip: Path, out: Path, sites: list[Site], on_server_host: bool, prefix: str) -> None:
        project = self.config.project
        services: dict[str, Any] = {}
        server = self.config.server.name
        if on_server_host:
            services[self._server_service()] = self._server(f"{prefix}{server}", kit_digest(wip / server))
        for site in sites:
            services[site.name] = self._site(
                site, f"{prefix}{site.name}", kit_digest(wip / site.name), with_server=on_server_host
            )
        if on_server_host:
            services[ADMIN_SERVICE] = self._admin(f"{prefix}{self.config.admin.name}")
        # Sites on another host dial the server by its DNS name (the certificate's CN); nothing to wait for here.
        compose_project = f"fedllm-{project}" if on_server_host else f"fedllm-{project}-{out.name}"
        self._write_files(out, compose_project, services, sites)

    def _write_files(self, out: Path, compose_project: str, services: dict[str, Any], sites: list[Site]) -> None:
        """A bundle's compose file (one named volume per server and site: its writable workspace), overlays, .env."""
        volumes = {
            v["source"]: {} for svc in services.values() for v in svc["volumes"] if v["target"] == WORKSPACE_MOUNT
        }
        _dump(out / "compose.yaml", {"name": compose_project, "services": services, "volumes": volumes}, self.source)
        _dump(out / "compose.gpu.yaml", self._gpu_overlay(sites), self.source)
        _dump(out / "compose.cpu.yaml", self._cpu_overlay(sites), self.source)
        _write_env(out / ".env", self._env_values(with_admin=ADMIN_SERVICE in services))

    def _env_values(self, with_admin: bool) -> dict[str, str]:
        uid, gid = self._container_ids()
        values = {
            "FEDLLM_IMAGE": self.config.container.image,
            "FEDLLM_UID": str(uid),
            "FEDLLM_GID": str(gid),
            # `docker compose up` in this folder: base + GPU overlay. CPU: COMPOSE_FILE=compose.yaml:compose.cpu.yaml
            "COMPOSE_FILE": "compose.yaml:compose.gpu.yaml",
        }
        if with_admin:  # the admin's shared folders (a shell variable of the same name wins)
            values[JOBS_ENV] = str(self._shared_dir(JOBS_DIR))
            values[RESULTS_ENV] = str(self._shared_dir(RESULTS_DIR))
        return values

    def _shared_dir(self, relative: str) -> Path:
        return (self.data_root / relative).resolve()

    def _container_ids(self) -> tuple[int, int]:
        """The user the containers run as: it must be able to read the kits' private keys (mode 0600)."""
        if os.getuid() == 0:
            return self.config.container.uid, self.config.container.uid
        return os.getuid(), os.getgid()

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        # Every site kit gets the component behind its healthcheck (see fedllm.flare.registration).
        for client in project.get_clients():
            add_parent_component(Path(ctx.get_local_dir(client)), REGISTRATION_COMPONENT)
        for relative in (JOBS_DIR, RESULTS_DIR):
            self._shared_dir(relative).mkdir(parents=True, exist_ok=True)

    def _write_participant_bundle(self, kit: Path, name: str) -> None:
        """One participant's own bundle (distributed kits): nothing else of the federation is on this machine."""
        out = kit / COMPOSE_DIR
        sites = [s for s in self.config.sites if s.name == name]
        digest = kit_digest(kit)
        if name == self.config.server.name:
            services = {self._server_service(): self._server("..", digest)}
        elif sites:
            services = {name: self._site(sites[0], "..", digest, with_server=False)}
        else:
            services = {ADMIN_SERVICE: self._admin("..", name, with_server=False)}
        compose_project = f"fedllm-{self.config.project}-" + re.sub(r"[^a-z0-9_-]+", "-", name.lower())
        self._write_files(out, compose_project, services, sites)

    def finalize(self, project: Project, ctx: ProvisionContext) -> None:
        # Runs after every Builder's build() (so the kits are complete and their digests final) and before
        # NVFlare's WorkspaceBuilder moves wip → prod_NN (finalize goes in reverse order).
        wip = Path(ctx.get_wip_dir())
        if self.participant is not None:
            # NVFlare packages this participant beside a placeholder server: only this one gets a bundle.
            entity = next(p for p in project.get_all_participants() if p.name == self.participant)
            self._write_participant_bundle(Path(ctx.get_ws_dir(entity)), self.participant)
        for host, sites in [] if self.participant is not None else sites_by_host(self.config).items():
            if host == server_host(self.config):
                self._write_bundle(wip, wip / COMPOSE_DIR, sites, on_server_host=True, prefix="../")
            else:
                self._write_bundle(wip, wip / HOSTS_DIR / host, sites, on_server_host=False, prefix="../../")
        if os.getuid() != 0:
            return
        uid, gid = self._container_ids()
        # The containers' user reads the kits (keys are 0600) and writes into the shared folders; it owns
        # the jobs in the jobs folder too, as NVFlare's console signs a job folder in place when submitting it.
        jobs, results = self._shared_dir(JOBS_DIR), self._shared_dir(RESULTS_DIR)
        for path in [jobs, *jobs.rglob("*"), results, *wip.rglob("*")]:
            os.chown(path, uid, gid, follow_symlinks=False)
        os.chown(wip, uid, gid)
