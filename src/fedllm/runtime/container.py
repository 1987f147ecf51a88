"""The entrypoint of fedllm's image: `fedllm container-entry server|site|admin [ARGS...]`.

The participant's startup kit is mounted read-only at /fedllm/kit; /fedllm/workspace is its own
writable volume. NVFlare runs a participant in its kit folder and writes logs and job folders there,
so the entry copies the kit's `startup/` and `local/` into the volume (as NVFlare's own sub_start.sh
does for a read-only kit via NVFL_WORKSPACE), then execs NVFlare's `sub_start.sh --once`: compose's
restart policy takes the place of NVFlare's restart loop.

Sites first run GPU preflight on the GPUs the container sees (FEDLLM_SKIP_GPU_PREFLIGHT=1 skips it
for CPU runs). The admin role opens NVFlare's admin console, or runs `fedllm ARGS` with the admin kit.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from nvflare.lighter.utils import update_storage_locations

from fedllm.errors import FedllmError
from fedllm.provision.certificates import check_kit_certificate
from fedllm.runtime.site_env import SERVER_ENVIRONMENT, read_site_file

ROLES = ("server", "site", "admin")


class ContainerEntryError(FedllmError):
    """The container cannot start its participant; the message says what is missing."""


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name, default))


def stage_workspace(kit: Path, workspace: Path) -> Path:
    """Copy the kit's startup/ and local/ into the writable workspace (fresh on every start)."""
    if not (kit / "startup").is_dir():
        raise ContainerEntryError(
            f"no startup kit at {kit} (expected {kit}/startup); mount the participant's kit folder there, "
            "e.g. `-v workspace/<project>/prod_NN/site-1:/fedllm/kit:ro` (compose does this)"
        )
    # An expired certificate makes NVFlare retry its connection without a word: say it, with the fix.
    check_kit_certificate(kit)
    workspace.mkdir(parents=True, exist_ok=True)
    for part in ("startup", "local"):
        target = workspace / part
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        if (kit / part).is_dir():
            shutil.copytree(kit / part, target)
    os.chmod(workspace / "startup", 0o700)  # it holds the private key
    (workspace / "transfer").mkdir(exist_ok=True)
    return workspace


def _exec_nvflare(workspace: Path) -> None:
    script = workspace / "startup" / "sub_start.sh"
    if not script.is_file():
        raise ContainerEntryError(
            f"{script} is missing: the kit is not a server or site kit; re-run `fedllm provision`"
        )
    sys.stdout.flush()
    os.execvp("bash", ["bash", str(script), "--once"])


def run_server(kit: Path, workspace: Path) -> None:
    ws = stage_workspace(kit, workspace)
    # Job store and snapshots into the volume, not the container's /tmp (lost on restart).
    update_storage_locations(str(ws / "local"), str(ws))
    for name, value in SERVER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    _exec_nvflare(ws)


def site_facts(kit: Path) -> dict:
    try:
        return read_site_file(kit)
    except FileNotFoundError as exc:
        raise ContainerEntryError(str(exc)) from None


def run_site(kit: Path, workspace: Path, echo=print) -> None:
    facts = site_facts(kit)
    if os.environ.get("FEDLLM_SKIP_GPU_PREFLIGHT") == "1" or not facts.get("gpus"):
        echo(f"[fedllm] site {facts['name']}: GPU preflight skipped (CPU run)")
        # Hide GPUs from CUDA in CPU runs; in GPU runs the NVIDIA runtime already shows only the site's.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        from fedllm.runtime.preflight import check_container_gpus

        report = check_container_gpus(facts)
        for line in report.lines():
            echo(line)
        if not report.ok:
            raise ContainerEntryError(f"GPU preflight failed for site {facts['name']}; see the messages above")
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ.setdefault("FEDLLM_SITE_NAME", facts["name"])
    os.environ.setdefault("FEDLLM_DATA_DIR", "/fedllm/data")
    ws = stage_workspace(kit, workspace)
    _exec_nvflare(ws)


def run_admin(kit: Path, workspace: Path, args: list[str]) -> None:
    """No args: NVFlare's interactive admin console. Otherwise: `fedllm ARGS` with this admin kit."""
    if not (kit / "startup" / "fed_admin.json").is_file():
        raise ContainerEntryError(f"no admin kit at {kit} (no startup/fed_admin.json); mount the admin's kit there")
    # The console uploads and downloads through <kit>/transfer: use a writable copy of the read-only kit.
    ws = stage_workspace(kit, workspace / "admin-kit")
    os.environ["FEDLLM_ADMIN_KIT"] = str(ws)
    sys.stdout.flush()
    if not args:
        os.execvp(
            sys.executable,
            [sys.executable, "-m", "nvflare.fuel.hci.tools.admin", "-m", str(ws), "-s", "fed_admin.json"],
        )
    os.execvp("fedllm", ["fedllm", *args])


def container_entry(role: str, args: list[str]) -> None:
    kit = _env_path("FEDLLM_KIT", "/fedllm/kit")
    workspace = _env_path("FEDLLM_RUN_DIR", "/fedllm/workspace")
    if role == "server":
        run_server(kit, workspace)
    elif role == "site":
        run_site(kit, workspace)
    elif role == "admin":
        run_admin(kit, workspace, args)
    else:
        raise ContainerEntryError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
