"""ComposeBuilder: the docker compose files of a federation, written while NVFlare provisions its kits.

Layout (Flower-style layering: a base file plus overlays):

    prod_NN/compose/compose.yaml      server, every site on the server's host, admin (profile "admin")
    prod_NN/compose/compose.gpu.yaml  each site pinned to its GPUs (deploy.resources.reservations.devices)
    prod_NN/compose/compose.cpu.yaml  the same stack without GPUs (CI, laptops): preflight skipped
    prod_NN/compose/.env              image, uid, and COMPOSE_FILE = base + GPU overlay
    prod_NN/hosts/<host>/...          the same three files for sites on other hosts (multi-host only)

A kit made the distributed way (fedllm.provision.distributed: each participant packages its own kit)
carries its own bundle, `prod_NN/<participant>/compose/`, with that one participant: the server alone,
a site that dials the server by name, or one admin's console. It lives inside the kit because NVFlare's
`nvflare package` adds each newly packaged kit to prod_NN without touching what is already beside it.

Every service mounts only its own kit (read-only) and its own data dir (read-only), and writes into its
own named volume. Paths to kits are relative (`../<participant>`), so a prod dir can be copied whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedllm.config.site_config import Site, SiteConfig
from fedllm.fileio import write_text

COMPOSE_DIR = "compose"
HOSTS_DIR = "hosts"
OVERLAYS = ("gpu", "cpu")
# Where the image expects things (docker/Dockerfile).
KIT_MOUNT = "/fedllm/kit"
DATA_MOUNT = "/fedllm/data"
WORKSPACE_MOUNT = "/fedllm/workspace"
RESULTS_MOUNT = "/fedllm/results"
ADMIN_SERVICE = "admin"
ADMIN_PROFILE = "admin"
# The CPU overlay cannot raise memlock: an unprivileged runc (CI, rootless, laptops) fails with
# "error setting rlimit type 8" for memlock -1, and nothing on CPU pins memory for NCCL anyway.
HEADER = "# Written by fedllm's ComposeBuilder from {source}; edit the site config and re-provision instead.\n"


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


class ComposeBuilder(Builder):
    """Writes compose files for the validated site config into every provisioned prod dir."""

    def __init__(self, site_config: dict[str, Any], source: str, data_root: str, participant: str | None = None):
        self.config = SiteConfig.model_validate(site_config)
        self.source = source
        self.data_root = Path(data_root)
        # Set when one participant packages its own kit: its bundle holds that participant only.
        self.participant = participant

    # ---- services -------------------------------------------------------------------------------
    def _common(self, name: str, kit_rel: str) -> dict[str, Any]:
        c = self.config.container
        return {
            "image": "${FEDLLM_IMAGE:-" + c.image + "}",
            "user": "${FEDLLM_UID:-" + str(c.uid) + "}:${FEDLLM_GID:-" + str(c.uid) + "}",
            # An init as PID 1: python as PID 1 ignores SIGTERM, so `docker compose down` would wait 10 s and kill.
            "init": True,
            "restart": c.restart,
            "volumes": [
                f"{kit_rel}:{KIT_MOUNT}:ro",
                f"{name}-workspace:{WORKSPACE_MOUNT}",
            ],
        }

    def _server(self, kit_rel: str) -> dict[str, Any]:
        server = self.config.server
        svc = self._common(server.name, kit_rel)
        svc["command"] = ["server"]
        svc["hostname"] = server.name
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

    def _site(self, site: Site, kit_rel: str, with_server: bool) -> dict[str, Any]:
        svc = self._common(site.name, kit_rel)
        svc["command"] = ["site"]
        svc["hostname"] = site.name
        svc["volumes"].insert(1, f"{site.data_path(self.data_root)}:{DATA_MOUNT}:ro")
        svc["shm_size"] = site.shm_size
        svc["ulimits"] = {"stack": self.config.container.ulimits.stack}
        svc["environment"] = {"FEDLLM_SITE_NAME": site.name, "FEDLLM_DATA_DIR": DATA_MOUNT}
        if with_server:
            svc["depends_on"] = {self._server_service(): {"condition": "service_healthy"}}
        return svc

    def _admin(
        self, kit_rel: str, name: str | None = None, with_server: bool = True, results_rel: str = "../../results"
    ) -> dict[str, Any]:
        admin = next((a for a in self.config.admins if a.name == name), self.config.admin)
        svc = self._common(ADMIN_SERVICE, kit_rel)
        svc["restart"] = "no"
        svc["profiles"] = [ADMIN_PROFILE]
        # `docker compose run --rm admin` → the console; `... admin job submit DIR` → `fedllm job submit DIR`.
        svc["entrypoint"] = ["fedllm", "container-entry", "admin"]
        svc["stdin_open"] = True
        svc["tty"] = True
        svc["environment"] = {"FEDLLM_ADMIN_USER": admin.name}
        svc["volumes"].append("${FEDLLM_RESULTS_DIR:-" + results_rel + "}:" + RESULTS_MOUNT)
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

    def _write_bundle(self, out: Path, sites: list[Site], on_server_host: bool, prefix: str) -> None:
        project = self.config.project
        services: dict[str, Any] = {}
        if on_server_host:
            services[self._server_service()] = self._server(f"{prefix}{self.config.server.name}")
        for site in sites:
            services[site.name] = self._site(site, f"{prefix}{site.name}", with_server=on_server_host)
        if on_server_host:
            services[ADMIN_SERVICE] = self._admin(f"{prefix}{self.config.admin.name}")
        # One named volume per participant: its writable workspace.
        volumes = {
            v.split(":")[0]: {}
            for svc in services.values()
            for v in svc["volumes"]
            if v.endswith(f":{WORKSPACE_MOUNT}")
        }
        base = {"name": f"fedllm-{project}", "services": services, "volumes": volumes}
        if not on_server_host:
            # Sites on another host dial the server by its DNS name (the certificate's CN); nothing to wait for here.
            base["name"] = f"fedllm-{project}-{out.name}"
        _dump(out / "compose.yaml", base, self.source)
        _dump(out / "compose.gpu.yaml", self._gpu_overlay(sites), self.source)
        _dump(out / "compose.cpu.yaml", self._cpu_overlay(sites), self.source)
        _write_env(out / ".env", self._env_values())

    def _env_values(self) -> dict[str, str]:
        uid, gid = self._container_ids()
        return {
            "FEDLLM_IMAGE": self.config.container.image,
            "FEDLLM_UID": str(uid),
            "FEDLLM_GID": str(gid),
            # `docker compose up` in this folder: base + GPU overlay. CPU: COMPOSE_FILE=compose.yaml:compose.cpu.yaml
            "COMPOSE_FILE": "compose.yaml:compose.gpu.yaml",
        }

    def _container_ids(self) -> tuple[int, int]:
        """The user the containers run as: it must be able to read the kits' private keys (mode 0600)."""
        if os.getuid() == 0:
            return self.config.container.uid, self.config.container.uid
        return os.getuid(), os.getgid()

    def _write_participant_bundle(self, out: Path, name: str) -> None:
        """One participant's own bundle (distributed kits): nothing else of the federation is on this machine."""
        sites = [s for s in self.config.sites if s.name == name]
        # `out` is <kit>/compose: the kit is its parent, results go beside prod_NN like a central bundle's.
        if name == self.config.server.name:
            services = {self._server_service(): self._server("..")}
        elif sites:
            services = {name: self._site(sites[0], "..", with_server=False)}
        else:
            services = {ADMIN_SERVICE: self._admin("..", name, with_server=False, results_rel="../../../results")}
        volumes = {
            v.split(":")[0]: {}
            for svc in services.values()
            for v in svc["volumes"]
            if v.endswith(f":{WORKSPACE_MOUNT}")
        }
        compose_project = f"fedllm-{self.config.project}-" + re.sub(r"[^a-z0-9_-]+", "-", name.lower())
        _dump(out / "compose.yaml", {"name": compose_project, "services": services, "volumes": volumes}, self.source)
        _dump(out / "compose.gpu.yaml", self._gpu_overlay(sites), self.source)
        _dump(out / "compose.cpu.yaml", self._cpu_overlay(sites), self.source)
        _write_env(out / ".env", self._env_values())

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        wip = Path(ctx.get_wip_dir())
        if self.participant is not None:
            # NVFlare packages this participant beside a placeholder server: only this one gets a bundle.
            entity = next(p for p in project.get_all_participants() if p.name == self.participant)
            self._write_participant_bundle(Path(ctx.get_ws_dir(entity)) / COMPOSE_DIR, self.participant)
            (wip.parent / "results").mkdir(exist_ok=True)
            return
        for host, sites in sites_by_host(self.config).items():
            if host == server_host(self.config):
                self._write_bundle(wip / COMPOSE_DIR, sites, on_server_host=True, prefix="../")
            else:
                self._write_bundle(wip / HOSTS_DIR / host, sites, on_server_host=False, prefix="../../")
        (wip.parent / "results").mkdir(exist_ok=True)

    def finalize(self, project: Project, ctx: ProvisionContext) -> None:
        # Runs before NVFlare's WorkspaceBuilder moves wip → prod_NN (finalize goes in reverse order).
        if os.getuid() != 0:
            return
        uid, gid = self._container_ids()
        wip = Path(ctx.get_wip_dir())
        for path in [wip.parent / "results", *(p for p in wip.rglob("*"))]:
            os.chown(path, uid, gid, follow_symlinks=False)
        os.chown(wip, uid, gid)
