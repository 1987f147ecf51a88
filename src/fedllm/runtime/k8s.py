"""Kubernetes for sites that outgrow one machine: NVFlare's own `nvflare deploy prepare` (runtime k8s).

For the server and every site, fedllm writes NVFlare's deploy config from the validated site config
(image, namespace, the server's service name, GPU requests = the site's GPU count) and lets NVFlare
render the prepared kit and its Helm chart. Kubernetes schedules GPUs by count (`nvidia.com/gpu`),
not by index: the site config's indices pin GPUs under compose; on a cluster the device plugin picks.

The prepared kits hold the participants' private keys, like the kits they come from: they are written
under `prod_NN/k8s/` and travel to each cluster the same way kits do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedllm.config.site_config import LABEL_RE, Site
from fedllm.errors import FedllmError
from fedllm.provision import Kits
from fedllm.provision.builders import COMM_CONFIG_NAME

K8S_DIR = "k8s"
# NVFlare's default parent-pod requests; GPUs are added per site. Override per cluster in values.yaml.
DEFAULT_REQUESTS = {"cpu": "2", "memory": "8Gi"}


class K8sRenderError(FedllmError):
    """`nvflare deploy prepare` refused a participant; the message carries NVFlare's reason."""


@dataclass(frozen=True)
class Rendered:
    name: str
    prepared_kit: Path
    helm_chart: Path
    gpus: int


def deploy_config(kits: Kits, image: str, namespace: str, site: Site | None) -> dict:
    """NVFlare's runtime-k8s deploy config for the server (site=None) or one site."""
    resources: dict = {"requests": dict(DEFAULT_REQUESTS)}
    if site is not None and site.gpus:
        resources["limits"] = {"nvidia.com/gpu": len(site.gpus)}
    cfg: dict = {
        "runtime": "k8s",
        "namespace": namespace,
        "parent": {"docker_image": image, "python_path": "python3", "resources": resources},
    }
    # Sites dial the server by its name (its certificate's CN): a one-label name becomes the server's Service.
    if LABEL_RE.fullmatch(kits.config.server.name):
        cfg["server_service_name"] = kits.config.server.name
    return cfg


def _without_job_ports(comm_config: Path) -> None:
    """Drop the server's job ports (fedllm.provision.builders.JobConnectionsBuilder) from a prepared k8s kit.

    On Kubernetes each job runs in a pod of its own, which the server's Service does not front: sites
    dialing `server:<job port>` would only retry a refused connection. Jobs talk through the server
    parent there, as NVFlare's k8s launcher sets up (its `internal` section stays).
    """
    if not comm_config.is_file():
        return
    config = json.loads(comm_config.read_text(encoding="utf-8"))
    config.pop("adhoc", None)
    config["allow_adhoc_conns"] = False
    comm_config.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def render(kits: Kits, image: str, namespace: str = "fedllm", out: Path | None = None, echo=print) -> list[Rendered]:
    """A Helm chart for the server and every site whose kit is in `kits`.

    Central kits hold every participant; a workspace of distributed kits (fedllm.provision.distributed)
    holds only its own participant's, so only that one is rendered, and the others are named as absent.
    """
    out = (out or kits.prod_dir / K8S_DIR).resolve()
    participants: list[tuple[str, Site | None]] = [(kits.config.server.name, None)]
    participants += [(s.name, s) for s in kits.config.sites]
    absent = [name for name, _ in participants if not (kits.kit(name) / "startup").is_dir()]
    if len(absent) == len(participants):
        raise K8sRenderError(
            f"no server or site kit in {kits.prod_dir}; run `fedllm provision`, or `fedllm package` at the participant"
        )
    if absent:
        echo(f"not here (each distributed kit stays with its participant, who renders its own): {', '.join(absent)}")
    rendered = []
    for name, site in participants:
        if name in absent:
            continue
        target = out / name
        config_path = out / f"{name}.deploy.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(deploy_config(kits, image, namespace, site), sort_keys=False))
        cmd = [sys.executable, "-m", "nvflare.cli", "deploy", "prepare", str(kits.kit(name))]
        cmd += ["--config", str(config_path), "--output", str(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        chart = target / "helm_chart"
        if proc.returncode != 0 or not (chart / "Chart.yaml").is_file():
            raise K8sRenderError(
                f"nvflare deploy prepare failed for '{name}' (config {config_path}):\n{(proc.stdout + proc.stderr)[-2000:]}"
            )
        if site is None:
            _without_job_ports(target / "local" / COMM_CONFIG_NAME)
        gpus = len(site.gpus) if site else 0
        rendered.append(Rendered(name, target, chart, gpus))
        echo(
            f"{name}: Helm chart {chart} ({gpus} GPU(s)); install: helm upgrade --install {name} {chart} -n {namespace}"
        )
    return rendered
