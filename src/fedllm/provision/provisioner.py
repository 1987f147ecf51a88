"""Provision a federation: site config → jinja2 project.yml → NVFlare's provisioner.

NVFlare's own Provisioner and Builders create the startup kits and mTLS certificates;
fedllm adds its outputs through its own Builders listed in the same project.yml.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from nvflare.lighter.constants import CtxKey
from nvflare.lighter.prov_utils import prepare_builders
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner

from fedllm.config.site_config import SiteConfig
from fedllm.errors import FedllmError
from fedllm.fileio import write_text
from fedllm.provision.builders import MANIFEST_NAME
from fedllm.resources import resource_dir

PROD_RE = re.compile(r"^prod_(\d{2})$")
# NVFlare numbers kits prod_00 … prod_99 and refuses to go further; keep a few, renumber when full.
KEEP_PROD_DIRS = 3


class ProvisionError(FedllmError):
    """Provisioning failed; the message says why and what to do."""


@dataclass(frozen=True)
class Kits:
    """Where every participant's startup kit is: one provisioning run's prod dir, or each kit's own folder.

    Central provisioning puts all kits side by side in `prod_dir`. Kits made the distributed way
    (fedllm.provision.distributed) each stay in their participant's own workspace; `elsewhere` names
    those folders when one machine runs them together (tests, demos), and `prod_dir` is then the
    server's prod dir, where the run's state is kept.
    """

    prod_dir: Path
    config: SiteConfig
    elsewhere: Mapping[str, Path] = field(default_factory=dict)

    def kit(self, name: str) -> Path:
        return self.elsewhere.get(name) or self.prod_dir / name

    def server(self) -> Path:
        return self.kit(self.config.server.name)

    def site(self, name: str) -> Path:
        return self.kit(name)

    def admin(self, name: str | None = None) -> Path:
        return self.kit(name or self.config.admin.name)

    def participants(self) -> list[Path]:
        return [self.server(), *(self.site(s) for s in self.config.site_names), *map(self.admin, self._admins())]

    def _admins(self) -> list[str]:
        return [a.name for a in self.config.admins]


# Site fields that only plan jobs (fedllm.jobs.plan) and go into no kit: editing them needs no new kits.
PLANNING_ONLY = {"gpu_memory_gib"}


def config_digest(config: SiteConfig) -> str:
    """A stable fingerprint of the validated config (not of its formatting or comments)."""
    dumped = config.model_dump(mode="json", exclude={"sites": {"__all__": PLANNING_ONLY}})
    canonical = json.dumps(dumped, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def participant_digest(config: SiteConfig, name: str) -> str:
    """A fingerprint of what one participant's kit is made from: the project, the server, its own entry.

    A kit made the distributed way holds only its participant's facts, so another site joining the
    config leaves it as good as it was; a change to its own entry, the server or the containers does not.
    """
    own = [e.model_dump(mode="json", exclude=PLANNING_ONLY) for e in (*config.sites, *config.admins) if e.name == name]
    canonical = json.dumps(
        {
            "project": config.project,
            "nvflare_version": config.nvflare_version,
            "server": config.server.model_dump(mode="json"),
            "container": config.container.model_dump(mode="json"),
            "participant": name,
            "own": own,
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fedllm_builders(
    config: SiteConfig, source: str, data_root: Path, participant: str | None = None
) -> list[dict[str, Any]]:
    """fedllm's Builders (path + args, as project.yml lists them) for the whole federation or one participant.

    `participant` is set when one participant packages its own kit (distributed provisioning): the
    server-only Builders are left out of other participants' kits, and the compose bundle holds that
    participant alone.
    """
    for_server = participant is None or participant == config.server.name
    site_config = config.model_dump(mode="json")
    builders: list[dict[str, Any]] = [
        {
            "path": "fedllm.provision.builders.SiteRuntimeBuilder",
            "args": {
                "site_config": site_config,
                "config_digest": config_digest(config),
                "source": source,
                "data_root": str(data_root),
                **(
                    {"participant": participant, "participant_digest": participant_digest(config, participant)}
                    if participant is not None
                    else {}
                ),
            },
        },
        {"path": "fedllm.provision.builders.ComponentPolicyBuilder", "args": {}},
    ]
    if for_server:
        builders.append({"path": "fedllm.provision.builders.JobResumeBuilder", "args": {}})
        builders.append(
            {
                "path": "fedllm.provision.builders.ServerLivenessBuilder",
                "args": {"heartbeat_timeout": config.server.heartbeat_timeout_s},
            }
        )
        if config.server.job_ports:
            builders.append(
                {
                    "path": "fedllm.provision.builders.JobConnectionsBuilder",
                    "args": {"server_name": config.server.name, "ports": config.server.job_ports},
                }
            )
    compose_args: dict[str, Any] = {"site_config": site_config, "source": source, "data_root": str(data_root)}
    if participant is not None:
        compose_args["participant"] = participant
    builders.append({"path": "fedllm.provision.compose.ComposeBuilder", "args": compose_args})
    return builders


def render_project_yml(config: SiteConfig, source: str, data_root: Path, extra_builders=()) -> str:
    """Render NVFlare's project.yml from the validated site config."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(resource_dir("provision/templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    builders = [*fedllm_builders(config, source, data_root), *extra_builders]
    return env.get_template("project.yml.j2").render(cfg=config, source=source, fedllm_builders=builders)


def project_dir(workspace: Path, config: SiteConfig) -> Path:
    return workspace / config.project


def prod_dirs(workspace: Path, config: SiteConfig) -> list[Path]:
    root = project_dir(workspace, config)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PROD_RE.match(p.name)]
    return sorted(found, key=lambda p: int(PROD_RE.match(p.name).group(1)))


# In the workspace root: which site config was provisioned into it last, so that the commands after
# `fedllm provision -c FILE` (up, status, job submit, down) find that federation without `-c` again.
PROVISIONED_RECORD = ".fedllm-provisioned.json"


def record_provisioned(workspace: Path, config_file: Path) -> None:
    write_text(
        workspace / PROVISIONED_RECORD,
        json.dumps({"config": str(config_file.absolute())}, indent=2) + "\n",
    )


def provisioned_config(workspace: Path) -> Path | None:
    """The site config last provisioned into `workspace` (None if none was, or it has gone since)."""
    try:
        recorded = Path(json.loads((workspace / PROVISIONED_RECORD).read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if recorded.is_file() else None


def latest_kits(workspace: Path, config: SiteConfig, source: str | None = None) -> Kits:
    """The newest provisioned kits for this config, or a clear error saying to provision.

    `source` names the config file in the messages (which config was looked for).
    """
    workspace = workspace.absolute()
    dirs = prod_dirs(workspace, config)
    if not dirs:
        of = f" (site config {source})" if source else ""
        raise ProvisionError(
            f"no startup kits for project '{config.project}'{of} under {workspace}; "
            f"run `fedllm provision -c {source or '<site config>'} -w {workspace}` first, "
            "or pass the config and workspace you provisioned with (-c, -w)"
        )
    kits = Kits(dirs[-1], config)
    manifest = dirs[-1] / MANIFEST_NAME
    if not manifest.is_file() and (packaged := sorted(dirs[-1].glob(f"*/{MANIFEST_NAME}"))):
        _check_packaged_kits(packaged, config)  # distributed kits: each records its own participant
        return kits
    recorded = json.loads(manifest.read_text()).get("config_digest") if manifest.is_file() else None
    if recorded != config_digest(config):
        of = f" than {source}" if source else ""
        raise ProvisionError(
            f"the kits in {dirs[-1]} were provisioned from a different site config{of}; "
            "re-run `fedllm provision` so that kits, GPUs and sites match the config, "
            "or pass the config they were provisioned from (-c)"
        )
    return kits


def _check_packaged_kits(manifests: list[Path], config: SiteConfig) -> None:
    for manifest in manifests:
        facts = json.loads(manifest.read_text())
        name, recorded = facts.get("participant", manifest.parent.name), facts.get("participant_digest")
        known = name == config.server.name or name in config.site_names or name in {a.name for a in config.admins}
        if not known or recorded != participant_digest(config, name):
            raise ProvisionError(
                f"the kit of '{name}' ({manifest.parent}) was packaged from a different site config "
                "(its own entry, the server's or the container settings differ"
                + ("" if known else f"; '{name}' is not in this config")
                + f"). Fix: `fedllm cert request --name {name} --force` with this config, have it signed, "
                "`fedllm package --force`; or pass the config the kit was made with"
            )


def _make_room(workspace: Path, config: SiteConfig) -> None:
    """Keep the newest kits and renumber them when NVFlare's prod_99 limit is near."""
    dirs = prod_dirs(workspace, config)
    for old in dirs[:-KEEP_PROD_DIRS]:
        shutil.rmtree(old)
    kept = dirs[-KEEP_PROD_DIRS:]
    if kept and int(PROD_RE.match(kept[-1].name).group(1)) >= 98:
        for i, d in enumerate(kept):
            d.rename(d.with_name(f"prod_{i:02d}"))


def provision(
    config: SiteConfig,
    workspace: Path,
    source: str,
    data_root: Path | None = None,
    config_file: Path | None = None,
) -> Kits:
    """Provision kits for every participant of `config` into `workspace/<project>/prod_NN`.

    Re-provisioning keeps the project's root CA (NVFlare's state dir), so kits made before and
    after an edit trust each other; only the newest prod dirs are kept. `config_file`, when given,
    is recorded as the workspace's federation (`provisioned_config`).
    """
    workspace = workspace.resolve()
    data_root = (data_root or Path.cwd()).resolve()
    root = project_dir(workspace, config)
    text = render_project_yml(config, source, data_root)
    project_dict = yaml.safe_load(text)
    try:  # before anything is written: a project NVFlare refuses leaves the workspace as it was
        project = prepare_project(project_dict)
        builders = prepare_builders(project_dict)
    except ValueError as exc:
        raise ProvisionError(f"NVFlare rejected the project rendered from {source}: {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    _make_room(workspace, config)
    write_text(root / "project.yml", text)

    ctx = Provisioner(str(workspace), builders).provision(project, logger=_QuietLogger())
    errors = ctx.get_errors()
    prod = ctx.get_result_location()
    if ctx.get(CtxKey.BUILD_ERROR) or not prod or errors:
        raise ProvisionError("NVFlare's provisioner failed: " + ("; ".join(errors) or "no kits were produced"))
    _point_current(root, Path(prod))
    if config_file is not None:
        record_provisioned(workspace, config_file)
    return Kits(Path(prod), config)


CURRENT_LINK = "current"


def _point_current(root: Path, prod: Path) -> None:
    """Make `<project>/current` name the newest prod dir (the root compose.yaml includes through it)."""
    tmp = root / f".{CURRENT_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(prod.name)
    tmp.replace(root / CURRENT_LINK)


class _QuietLogger:
    """Collects NVFlare's provisioning chatter; errors still reach the ProvisionError."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    def debug(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        self.lines.append("WARNING: " + msg)

    def error(self, msg: str) -> None:
        self.lines.append("ERROR: " + msg)
