"""fedllm's NVFlare Builders: what the provisioner adds to NVFlare's own kits.

They are listed in the rendered project.yml like NVFlare's builders and follow the same
initialize → build → finalize lifecycle over the ProvisionContext; they write into the
work-in-progress tree that NVFlare's WorkspaceBuilder moves to prod_NN at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedllm.config.site_config import SiteConfig
from fedllm.fileio import write_text

MANIFEST_NAME = "fedllm.json"
SITE_FILE_NAME = "fedllm_site.json"
RESOURCES_DEFAULT = "resources.json.default"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def add_parent_component(kit: Path, component: dict[str, Any]) -> None:
    """Put `component` into a kit's resources.json.default (its parent process's components), replacing its id."""
    path = kit / RESOURCES_DEFAULT
    resources = json.loads(path.read_text(encoding="utf-8"))
    components = [c for c in resources.get("components", []) if c.get("id") != component["id"]]
    resources["components"] = [*components, dict(component)]
    _write_json(path, resources)


class SiteRuntimeBuilder(Builder):
    """Writes each site's runtime facts into its kit and a manifest beside the kits.

    `local/fedllm_site.json` tells a site process (native or in its container) which GPUs
    and data directory are its own, without giving it the whole federation's config.
    `prod_NN/fedllm.json` records which site config produced the kits, so the runtime can
    refuse kits that no longer match the config; a kit packaged by its own participant records
    that participant's part of the config in `<kit>/fedllm.json` instead.
    """

    def __init__(
        self,
        site_config: dict[str, Any],
        config_digest: str,
        source: str,
        data_root: str,
        participant: str | None = None,
        participant_digest: str | None = None,
    ):
        self.config = SiteConfig.model_validate(site_config)
        self.config_digest = config_digest
        self.source = source
        self.data_root = Path(data_root)
        # Set when one participant packages its own kit (distributed provisioning).
        self.participant = participant
        self.participant_digest = participant_digest

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        for client in project.get_clients():
            site = self.config.site(client.name)
            _write_json(
                Path(ctx.get_local_dir(client)) / SITE_FILE_NAME,
                {
                    "name": site.name,
                    "gpus": site.gpus,
                    "host": site.host,
                    "data_dir": str(site.data_path(self.data_root)),
                    "workload": site.workload,
                },
            )
        if self.participant is not None:
            # In the kit itself: `nvflare package` replaces a re-packaged kit but keeps what lies beside it.
            entity = next(p for p in project.get_all_participants() if p.name == self.participant)
            _write_json(
                Path(ctx.get_ws_dir(entity)) / MANIFEST_NAME,
                {
                    "project": self.config.project,
                    "source": self.source,
                    "participant": self.participant,
                    "participant_digest": self.participant_digest,
                },
            )
            return
        _write_json(
            Path(ctx.get_wip_dir()) / MANIFEST_NAME,
            {
                "project": self.config.project,
                "source": self.source,
                "config_digest": self.config_digest,
                "server": self.config.server.name,
                "sites": self.config.site_names,
                "admins": [a.name for a in self.config.admins],
            },
        )


class ServerLivenessBuilder(Builder):
    """Sets how long the server waits on a silent site (`heart_beat_timeout` in fed_server.json).

    NVFlare's StaticFileBuilder has no argument for it, so this Builder adds the key to the file
    StaticFileBuilder just wrote. A site declared dead releases the round it was part of: FedAvg
    goes on with the results of the others.
    """

    def __init__(self, heartbeat_timeout: int):
        self.heartbeat_timeout = heartbeat_timeout

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        path = Path(ctx.get_kit_dir(project.get_server())) / "fed_server.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        for server in config["servers"]:
            server["heart_beat_timeout"] = self.heartbeat_timeout
        _write_json(path, config)


COMM_CONFIG_NAME = "comm_config.json"


class JobConnectionsBuilder(Builder):
    """Lets each server job accept the sites' job connections itself (NVFlare's ad-hoc connections).

    Without it, every byte between a site's job process and the server's job process is relayed by
    the server's parent process (read, re-framed, re-sent): at 1 GiB per round that relay took ~30 %
    of the federation's CPU on 2 cores (docs/exchange.md). With `allow_adhoc_conns` each server job
    opens one listener on a port of `ports` (mTLS with the server's certificate, client certificates
    required, like fed_learn_port) and tells the sites' job processes the URL; they connect to it and
    keep using the relay until that connection is up, or for good if they cannot reach it. Only the
    server's kit gets the setting: sites never listen.
    """

    def __init__(self, server_name: str, ports: str, scheme: str = "tcp"):
        self.server_name = server_name
        self.ports = ports
        self.scheme = scheme

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        path = Path(ctx.get_local_dir(project.get_server())) / COMM_CONFIG_NAME
        config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        config["allow_adhoc_conns"] = True
        config["adhoc"] = {
            "scheme": self.scheme,
            "resources": {
                # Advertised to the sites, who dial it and check it against the server certificate's CN.
                "host": self.server_name,
                "ports": self.ports,
                "secure": True,
                "connection_security": "mtls",
            },
        }
        _write_json(path, config)


# Classes fedllm's jobs instantiate on the server from config (job apps without custom code are
# checked against the site's class_allow_list in NVFlare 2.9; NVFlare's default list lacks these).
FEDLLM_COMPONENTS = (
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "fedllm.",  # a package prefix: fedllm's own persistors, filters and aggregators
)


class ComponentPolicyBuilder(Builder):
    """Adds fedllm's components to every participant's class allow-list.

    NVFlare refuses to build components that are not in `class_allow_list` of the site's
    resources (for jobs without custom code). fedllm extends NVFlare's own default list rather
    than disabling the check, so the policy stays explicit and reviewable in each kit.
    """

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        for participant in [project.get_server(), *project.get_clients()]:
            path = Path(ctx.get_local_dir(participant)) / RESOURCES_DEFAULT
            resources = json.loads(path.read_text(encoding="utf-8"))
            allowed = list(resources.get("class_allow_list", []))
            resources["class_allow_list"] = allowed + [c for c in FEDLLM_COMPONENTS if c not in allowed]
            _write_json(path, resources)


# The server parent's component that continues a FedAvg job a server or site restart interrupted.
JOB_RESUMER_ID = "fedllm_job_resumer"
JOB_RESUMER_PATH = "fedllm.flare.resume.JobResumer"
# How often restarts of one site may continue one job within an hour (a job overrides it in its meta).
DEFAULT_MAX_SITE_RESTARTS_PER_HOUR = 3


class JobResumeBuilder(Builder):
    """Adds fedllm's JobResumer to the server's resources (the components of its parent process).

    NVFlare 2.9 neither restores a job after a server restart nor notices a site that restarted
    mid-job; the resumer continues such a job from its last completed round (fedllm.flare.resume).
    It goes into resources.json.default, from which `fedllm up` and the server container write the
    resources.json NVFlare reads (with the job store moved into the server's workspace).
    `max_site_restarts_per_hour` bounds a flapping site: beyond it the job fails with a message naming
    the site instead of being continued again (a job overrides it with
    `custom_props.fedllm_max_site_restarts_per_hour` in its meta.json).
    """

    def __init__(self, max_site_restarts_per_hour: int = DEFAULT_MAX_SITE_RESTARTS_PER_HOUR):
        if isinstance(max_site_restarts_per_hour, bool) or not isinstance(max_site_restarts_per_hour, int):
            raise ValueError(f"max_site_restarts_per_hour must be an integer, not {max_site_restarts_per_hour!r}")
        if max_site_restarts_per_hour < 0:
            raise ValueError(f"max_site_restarts_per_hour must be ≥ 0, not {max_site_restarts_per_hour}")
        self.max_site_restarts_per_hour = max_site_restarts_per_hour

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        add_parent_component(
            Path(ctx.get_local_dir(project.get_server())),
            {
                "id": JOB_RESUMER_ID,
                "path": JOB_RESUMER_PATH,
                "args": {"max_site_restarts_per_hour": self.max_site_restarts_per_hour},
            },
        )
