"""The site config: one YAML file that names the project, server, admins and sites.

It is the single source of truth of a federation. Provisioning, the native runtime,
compose files and GPU preflight all read the validated `SiteConfig` object; nothing
else in fedllm parses these files.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from fedllm.config.loader import Path_, load_model
from fedllm.config.problems import FixableError, clip
from fedllm.config.workloads import NEEDS, gpu_shortfall
from fedllm.errors import FedllmError

# One DNS label (RFC 1123), lowercase: usable as a host name, a compose service name and a
# container name, which is what every site and the server become.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
LABEL_RE = re.compile(rf"^{_LABEL}$")
HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# Admins log in with an e-mail style identity (NVFlare's rule for admin users).
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*$")
ORG_RE = re.compile(r"^[A-Za-z0-9_]+$")
SIZE_RE = re.compile(r"^[0-9]+[bkmg]?$")
PORT_RANGE_RE = re.compile(r"^([0-9]{1,5})-([0-9]{1,5})$")
# One port per job running at the same time; a range this long is a typo, not a plan.
MAX_JOB_PORTS = 1000
# No GPU has more memory than this (GiB): a larger gpu_memory_gib is a unit mistake (MiB or bytes).
MAX_GPU_GIB = 1024


def parse_port_range(value: object) -> tuple[int, int] | None:
    """(first, last) of a 'first-last' port range of at most MAX_JOB_PORTS ports, or None if it is not one."""
    m = PORT_RANGE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if not (1 <= first <= last <= 65535) or last - first + 1 > MAX_JOB_PORTS:
        return None
    return first, last


Port = Annotated[StrictInt, Field(ge=1, le=65535)]
GpuId = Annotated[StrictInt, Field(ge=0)]
SUPPORTED_NVFLARE = "2.9"
# Names a site cannot take: compose services and kit folders that fedllm creates beside the sites.
RESERVED_SITE_NAMES = ("admin",)
AdminRole = Literal["project_admin", "org_admin", "lead", "member"]
# The admin roles NVFlare's default authorization lets submit jobs (org_admin and member may not).
SUBMIT_ROLES = ("project_admin", "lead")


class UnknownSiteError(FedllmError):
    """A command named a site the site config does not have."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_gpu_memory(v: object) -> bool:
    """A GiB figure one GPU can have: a number above 0 and at most MAX_GPU_GIB."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_GPU_GIB


def _check_label(value: str, what: str) -> str:
    if not LABEL_RE.fullmatch(value):
        suggestion = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:63] or "site-1"
        raise FixableError(
            f"{what} '{clip(value)}' cannot be used as a host or service name",
            f"use lowercase letters, digits and '-' (at most 63, not starting or ending with '-'), e.g. '{suggestion}'",
        )
    return value


def _check_org(value: str) -> str:
    if not ORG_RE.fullmatch(value):
        raise FixableError(f"org '{clip(value)}' is not valid", "use letters, digits and '_' only, e.g. 'nvidia'")
    return value


class Server(_Strict):
    """The FL server. Sites dial `name:fed_learn_port`; `name` is also its certificate's CN."""

    name: str = "server"
    fed_learn_port: Port = 8002
    admin_port: Port = 8003
    org: str = "nvidia"
    # The machine that runs the server, when the federation spans several hosts (compose per host).
    host: str | None = None
    # Seconds without a heartbeat (sites send one every 10 s) before the server drops a site and
    # stops waiting for its results; NVFlare's default of 600 stalls a round for 10 minutes when a
    # site dies. Raise it for links that can stall longer than this.
    heartbeat_timeout_s: int = Field(default=120, ge=30, le=86400)
    # Ports ("first-last") on which each running job's server process listens (mTLS, like
    # fed_learn_port), one port per job running at once: the sites' job processes connect to it
    # directly (NVFlare's ad-hoc connections) instead of having every byte relayed by the server's
    # parent process — 20 % less CPU per round and 12–13 % shorter rounds for a 1 GiB model
    # (docs/exchange.md). Sites that cannot reach them fall back to fed_learn_port. null: no job ports.
    job_ports: str | None = "8004-8013"

    @field_validator("job_ports")
    @classmethod
    def _job_ports(cls, v: str | None) -> str | None:
        if v is None:
            return v
        port_range = parse_port_range(v)
        if port_range is None:
            raise FixableError(
                f"job_ports '{clip(v)}' is not a port range",
                f"write it as first-last with 1 ≤ first ≤ last ≤ 65535 and at most {MAX_JOB_PORTS} ports, "
                "e.g. '8004-8013' (one port per job running at once), or null to route all traffic through "
                "fed_learn_port",
            )
        return "{}-{}".format(*port_range)

    @property
    def job_port_range(self) -> tuple[int, int] | None:
        """(first, last) of `job_ports`, or None."""
        return parse_port_range(self.job_ports)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not HOSTNAME_RE.fullmatch(v):
            raise FixableError(
                f"server name '{clip(v)}' is not a valid host name",
                "use the server's DNS name (lowercase letters, digits, '-' and '.'), e.g. 'server' "
                "or 'fl.example.org'; sites dial it and verify it as the certificate's CN",
            )
        return v

    @field_validator("org")
    @classmethod
    def _org(cls, v: str) -> str:
        return _check_org(v)


class Admin(_Strict):
    """A person who submits jobs from the admin console."""

    name: str
    org: str = "nvidia"
    role: AdminRole = "project_admin"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not EMAIL_RE.fullmatch(v):
            raise FixableError(f"admin name '{clip(v)}' is not an e-mail style identity", "use e.g. 'admin@nvidia.com'")
        return v

    @field_validator("org")
    @classmethod
    def _org(cls, v: str) -> str:
        return _check_org(v)


class Site(_Strict):
    """A participant that holds private data and trains on its own GPUs."""

    name: str
    org: str = "nvidia"
    # GPU indices on the site's host, as nvidia-smi numbers them; the site sees only these.
    gpus: list[GpuId] = Field(default_factory=list)
    # The machine the site runs on: GPUs may repeat across hosts, never within one.
    host: str = "localhost"
    # The site's private data, mounted read-only into its container; relative to where fedllm runs.
    data_dir: str | None = None
    # /dev/shm for the site's container: NeMo's data loaders need 16g (the seeds' docker run).
    shm_size: str = "16g"
    # What the site will train: the config checks it has enough GPUs for it, GPU preflight that they
    # have the memory and capability (both from fedllm.config.workloads).
    workload: str = "none"
    # GiB of memory on each of the site's GPUs (nvidia-smi's total / 1024, e.g. 80 for an A100-80GB). The site
    # config cannot see the site's machine: with it, `fedllm validate` checks the workload's need and
    # `fedllm job create` the job's memory estimate (fedllm.config.memory) per site. null: neither is checked.
    gpu_memory_gib: float | None = None

    @field_validator("gpu_memory_gib", mode="before")
    @classmethod
    def _gpu_memory(cls, v: Any) -> Any:
        if v is not None and not _is_gpu_memory(v):
            raise FixableError(
                f"gpu_memory_gib {clip(repr(v))} is not a GPU memory size",
                f"give each GPU's memory in GiB as a number above 0 and at most {MAX_GPU_GIB}, e.g. 80 for an "
                "A100-80GB (nvidia-smi --query-gpu=memory.total --format=csv shows it in MiB), or leave it out",
            )
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_label(v, "site name")
        if v in RESERVED_SITE_NAMES:
            raise FixableError(
                f"site name '{v}' is reserved (the admin console's compose service)",
                "rename the site, e.g. 'site-admin'",
            )
        return v

    @field_validator("org")
    @classmethod
    def _org(cls, v: str) -> str:
        return _check_org(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOSTNAME_RE.fullmatch(v):
            raise FixableError(
                f"host '{clip(v)}' is not a valid host name", "use the machine's DNS name or 'localhost'"
            )
        return v

    @field_validator("workload")
    @classmethod
    def _workload(cls, v: str) -> str:
        if v not in NEEDS:
            raise FixableError(f"workload '{clip(v)}' is not one fedllm knows", f"use one of: {', '.join(NEEDS)}")
        return v

    @field_validator("shm_size")
    @classmethod
    def _shm(cls, v: str) -> str:
        if not SIZE_RE.fullmatch(v):
            raise FixableError(f"shm_size '{clip(v)}' is not a size", "use a number with b, k, m or g, e.g. '16g'")
        return v

    def data_path(self, base: Path) -> Path:
        """Where this site's data lives on its host (default: data/<site name>)."""
        return (base / (self.data_dir or f"data/{self.name}")).resolve()


class Ulimits(_Strict):
    """Resource limits of the site containers; the defaults are what NeMo's containers ask for."""

    # Locked memory for NCCL/pinned buffers: unlimited (-1), as NVIDIA's `docker run --ulimit memlock=-1`.
    memlock: int = -1
    # 64 MiB stack (`--ulimit stack=67108864` in NVIDIA's NeMo instructions).
    stack: int = 67108864

    @field_validator("memlock", "stack")
    @classmethod
    def _limit(cls, v: int) -> int:
        if v < -1 or v == 0:
            raise FixableError(f"ulimit {v} is not valid", "use -1 (unlimited) or a positive number of bytes")
        return v


class Container(_Strict):
    """How the federation runs as containers (`docker compose up`): one image for every participant."""

    # The image `make build` tags; the compose files read it from their .env (FEDLLM_IMAGE) so it can be overridden.
    image: str = "fedllm:latest"
    # The non-root user the containers run as (the image's `fedllm` user). Kits must be readable by it:
    # provisioning as root hands the kits to this uid; a non-root operator's own uid is used instead.
    uid: int = Field(default=10001, ge=1)
    ulimits: Ulimits = Field(default_factory=Ulimits)
    # Compose restart policy for sites and server: a crashed site comes back, a `shutdown` stays down.
    restart: Literal["no", "on-failure", "always", "unless-stopped"] = "on-failure"

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._/:@-]*", v):
            raise FixableError(f"image '{clip(v)}' is not an image reference", "use e.g. 'fedllm:latest'")
        return v


class SiteConfig(_Strict):
    """A whole federation: project, server, admins and sites."""

    project: str
    nvflare_version: str = "2.9.0"
    description: str = ""
    server: Server = Field(default_factory=Server)
    admins: list[Admin] = Field(min_length=1)
    sites: list[Site] = Field(min_length=1)
    # Several sites may share a GPU only when asked (e.g. three 345M p-tuning sites on one 16 GB GPU).
    allow_gpu_sharing: bool = False
    container: Container = Field(default_factory=Container)

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        return _check_label(v, "project name")

    @field_validator("nvflare_version")
    @classmethod
    def _nvflare(cls, v: str) -> str:
        if not (v == SUPPORTED_NVFLARE or v.startswith(SUPPORTED_NVFLARE + ".")):
            raise FixableError(
                f"nvflare_version '{clip(v)}' is not supported",
                f"use {SUPPORTED_NVFLARE}.x (fedllm pins nvflare 2.9.0)",
            )
        return v

    @field_validator("admins", "sites", mode="before")
    @classmethod
    def _non_empty(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list) and not v:
            what = "site" if info.field_name == "sites" else "admin"
            example = "{name: site-1, gpus: [0]}" if what == "site" else "{name: admin@nvidia.com}"
            raise FixableError(f"the {info.field_name} list is empty", f"add at least one {what}, e.g. {example}")
        return v

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> SiteConfig:
        if info.context and info.context.get("cross_checks_done"):
            return self
        problems = cross_field_problems(self.model_dump(), lambda loc: None)
        if problems:
            loc, msg, fix = problems[0]
            raise FixableError(f"{'.'.join(map(str, loc))}: {msg}" if loc else msg, fix)
        return self

    # ---- derived views, so callers never re-derive them -------------------------------------
    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise UnknownSiteError(
            f"no site named '{name}' in project '{self.project}' (its sites: {', '.join(self.site_names)}). "
            "Fix: use one of those names, or add the site to sites[] in the site config and re-provision"
        )

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def admin(self) -> Admin:
        """The admin fedllm uses for submissions: the first project_admin, else the first lead."""
        for role in SUBMIT_ROLES:
            for admin in self.admins:
                if admin.role == role:
                    return admin
        return self.admins[0]  # the config rule `no admin can submit jobs` keeps this from happening


def cross_field_problems(raw: Any, line_of: Callable[[Path_], int | None]) -> list[tuple[Path_, str, str]]:
    """Rules that span several fields, checked on raw data so they report alongside field errors."""
    out: list[tuple[Path_, str, str]] = []
    if not isinstance(raw, dict):
        return out

    server = raw.get("server") if isinstance(raw.get("server"), dict) else {}
    fl_port, adm_port = server.get("fed_learn_port", 8002), server.get("admin_port", 8003)
    if isinstance(fl_port, int) and fl_port == adm_port:
        out.append(
            (
                ("server", "admin_port"),
                f"admin_port equals fed_learn_port ({fl_port})",
                "use two different ports, e.g. fed_learn_port: 8002 and admin_port: 8003",
            )
        )
    job_port_range = parse_port_range(server.get("job_ports", Server.model_fields["job_ports"].default))
    if job_port_range is not None:  # else the field check reports it
        first, last = job_port_range
        ports = {k: p for k, p in (("fed_learn_port", fl_port), ("admin_port", adm_port)) if isinstance(p, int)}
        above = max(ports.values(), default=0) + 1
        for key, port in ports.items():
            if first <= port <= last:
                out.append(
                    (
                        ("server", "job_ports"),
                        f"job_ports {first}-{last} includes {key} {port}",
                        f"move the range off the server's ports, e.g. job_ports: '{above}-{above + last - first}'",
                    )
                )

    def entries(key: str) -> list[tuple[int, dict]]:
        items = raw.get(key)
        return [(i, e) for i, e in enumerate(items) if isinstance(e, dict)] if isinstance(items, list) else []

    for key, what in (("sites", "site"), ("admins", "admin")):
        first: dict[str, int] = {}
        for i, entry in entries(key):
            name = entry.get("name")
            if not isinstance(name, str):
                continue
            if name in first:
                out.append(
                    (
                        (key, i, "name"),
                        f"duplicate {what} name '{clip(name)}' (also {key}[{first[name]}], line {line_of((key, first[name]))})",
                        f"give every {what} a unique name",
                    )
                )
            else:
                first[name] = i

    server_name = server.get("name", "server")
    for i, entry in entries("sites"):
        if entry.get("name") == server_name:
            out.append(
                ((("sites", i, "name")), f"site name '{clip(server_name)}' is the server's name", "rename the site")
            )

    out += _gpu_problems(raw, entries("sites"), line_of)
    out += _submitter_problems(entries("admins"))
    return out


def _gpu_ids(entry: dict) -> tuple[dict[int, int], bool]:
    """The site's valid GPU indices (gpus index -> GPU), and whether all of them are (the field check reports the rest)."""
    gpus = entry.get("gpus", [])
    if not isinstance(gpus, list):
        return {}, False
    valid = {j: g for j, g in enumerate(gpus) if isinstance(g, int) and not isinstance(g, bool) and g >= 0}
    return valid, len(valid) == len(gpus)


def _gpu_problems(
    raw: dict, sites: list[tuple[int, dict]], line_of: Callable[[Path_], int | None]
) -> list[tuple[Path_, str, str]]:
    """A GPU listed twice by one site, shared by sites of one host, or too few GPUs for a site's workload.

    Each clash is reported once, at the first site that takes a GPU another site already has,
    naming every site that has it.
    """
    out: list[tuple[Path_, str, str]] = []
    holders: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (host, gpu) -> [(site index, gpus index)]
    for i, entry in sites:
        gpus, all_valid = _gpu_ids(entry)
        first: dict[int, int] = {}  # GPU -> where the site lists it first
        for j, g in gpus.items():
            first.setdefault(g, j)
        for g in sorted(g for g, n in Counter(gpus.values()).items() if n > 1):
            out.append((("sites", i, "gpus"), f"GPU {g} is listed twice", "list each GPU once"))
        host = entry.get("host", "localhost")
        if isinstance(host, str):
            for g, j in first.items():
                holders.setdefault((host, g), []).append((i, j))
        workload = entry.get("workload", "none")
        known = isinstance(workload, str) and workload in NEEDS
        shortfall = gpu_shortfall(workload, len(first)) if known and all_valid else None
        if shortfall:
            out.append(
                (
                    ("sites", i, "workload"),
                    shortfall,
                    f"list {NEEDS[workload].min_gpus} GPUs in its gpus, or give it a workload its GPUs can run",
                )
            )
        out += _memory_problems(i, entry, gpus if all_valid else None, workload if known else None)
    if raw.get("allow_gpu_sharing", False) is True:
        return out
    names = {i: entry.get("name") for i, entry in sites}

    def site(i: int) -> str:
        return f"'{names[i]}'" if isinstance(names[i], str) else f"sites[{i}]"

    for (host, g), held in holders.items():
        if len(held) < 2:
            continue
        (owner, _), (second, j) = held[0], held[1]
        message = f"GPU {g} on host '{clip(host)}' is already assigned to site {site(owner)}"
        if len(held) > 2:
            message += "; also taken by " + ", ".join(f"{site(i)} (line {line_of(('sites', i))})" for i, _ in held[2:])
        out.append(
            (
                ("sites", second, "gpus", j),
                message,
                f"give site {site(second)} other GPUs, move it to another host, or set allow_gpu_sharing: true "
                "if the sites are meant to share (small models only)",
            )
        )
    return out


def _memory_problems(
    i: int, entry: dict, gpus: dict[int, int] | None, workload: str | None
) -> list[tuple[Path_, str, str]]:
    """gpu_memory_gib on a site without GPUs, or below what the site's workload needs per GPU."""
    memory = entry.get("gpu_memory_gib")
    if not _is_gpu_memory(memory):
        return []  # absent, or the field check reports it
    where = ("sites", i, "gpu_memory_gib")
    if gpus is not None and not gpus:
        return [
            (
                where,
                "gpu_memory_gib is set but the site lists no GPUs",
                "list the site's GPUs in gpus, or drop gpu_memory_gib",
            )
        ]
    need = NEEDS[workload] if workload else None
    if need is not None and memory < need.free_gib_per_gpu:
        return [
            (
                where,
                f"workload {workload} needs {need.free_gib_per_gpu:g} GiB on each GPU ({need.why}); the site's GPUs have "
                f"{memory:g} GiB",
                "give the site GPUs with more memory (and correct gpu_memory_gib), or a smaller workload",
            )
        ]
    return []


def _submitter_problems(admins: list[tuple[int, dict]]) -> list[tuple[Path_, str, str]]:
    """A federation needs an admin who may submit jobs (NVFlare's default authorization)."""
    roles = [a.get("role", "project_admin") for _, a in admins]
    if not roles or any(r not in get_args(AdminRole) for r in roles):
        return []  # no admins, or a role the field check reports
    if any(r in SUBMIT_ROLES for r in roles):
        return []
    listed = ", ".join(f"{a.get('name')} ({a.get('role', 'project_admin')})" for _, a in admins)
    return [
        (
            ("admins",),
            f"no admin can submit jobs: NVFlare lets {' and '.join(SUBMIT_ROLES)} submit, the admins are {listed}",
            "give one admin role lead (or project_admin, for a federation `fedllm provision` makes centrally)",
        )
    ]


_FIELD_FIXES = {
    "gpus": "use non-negative whole-number GPU indices as `nvidia-smi -L` lists them, e.g. [0, 1]",
    "fed_learn_port": "use a port number between 1 and 65535",
    "admin_port": "use a port number between 1 and 65535",
}


def load_site_config(path: Path | str) -> SiteConfig:
    """Load and validate a site config file; raises ConfigError naming every problem."""
    return load_model(
        path,
        SiteConfig,
        kind="site config",
        extra_checks=cross_field_problems,
        context={"cross_checks_done": True},
        field_fixes=_FIELD_FIXES,
    )
