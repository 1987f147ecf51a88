"""The entrypoint of fedllm's image: `fedllm container-entry server|site|admin [ARGS...]`.

The participant's startup kit is mounted read-only at /fedllm/kit; /fedllm/workspace is its own
writable volume. NVFlare runs a participant in a workspace folder that holds the kit's `startup/`
and `local/` and receives its logs and job folders. The entry makes the volume that folder without
copying a key into it: `startup/` holds links to the files of the read-only mount's `startup/`
(certificate, private key, root CA), which NVFlare only reads; `local/` (no secrets; the server rewrites its resources.json) is
copied. The key thus lives only in the kit on the host, and a named volume never holds it, also
after `docker compose down` without `-v`; a `startup/` that an older image copied into the volume
is removed at the next start. Then it execs NVFlare's `sub_start.sh --once`: compose's restart
policy takes the place of NVFlare's restart loop.

Sites first run GPU preflight on the GPUs the container sees (FEDLLM_SKIP_GPU_PREFLIGHT=1 skips it
for CPU runs). The admin role opens NVFlare's admin console, or runs `fedllm ARGS` with the admin kit.
The console is configured through its own fed_admin.json, so the admin's kit is copied whole, into
the admin container's tmpfs (memory, gone with the container): logged in as the kit's certificate
name (NVFlare's `uid_source: cert`, no `User Name:` prompt), uploading jobs from the shared jobs
folder and downloading results into the shared results folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from nvflare.lighter.utils import update_storage_locations

from fedllm.errors import FedllmError
from fedllm.fileio import write_text
from fedllm.flare.registration import MARKER_NAME
from fedllm.provision.certificates import check_kit_certificate
from fedllm.provision.compose import HOST_JOBS_ENV, HOST_RESULTS_ENV, JOBS_MOUNT, RESULTS_MOUNT
from fedllm.runtime.admin import AdminError, AdminKit
from fedllm.runtime.site_env import SERVER_ENVIRONMENT, read_site_file

ROLES = ("server", "site", "admin")


class ContainerEntryError(FedllmError):
    """The container cannot start its participant; the message says what is missing."""


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name, default))


def stage_workspace(kit: Path, workspace: Path, copy_startup: bool = False) -> Path:
    """Make `workspace` NVFlare's folder for the kit: `local/` copied, `startup/`'s files linked (or copied), fresh.

    `copy_startup` is for the admin console alone, which edits its own fed_admin.json (in a tmpfs).
    """
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
            shutil.rmtree(target)  # also a copy of the key an older entry left in the volume
        if part == "startup" and not copy_startup:
            # A folder of links, not a link to the folder: NVFlare finds its config files with os.walk,
            # which does not descend into a linked folder but lists linked files.
            target.mkdir()
            for entry in sorted((kit / part).iterdir()):
                (target / entry.name).symlink_to(entry.absolute())
        elif (kit / part).is_dir():
            shutil.copytree(kit / part, target)
    os.chmod(workspace / "startup", 0o700)  # it holds the private key, or the links to it
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
    # A marker left by the previous start would make the healthcheck pass before this one registers.
    (ws / MARKER_NAME).unlink(missing_ok=True)
    _exec_nvflare(ws)


def configure_console(kit: Path, jobs: Path, results: Path) -> dict:
    """Point the staged admin kit's console at the shared folders and log it in by certificate.

    NVFlare's console asks for a user name unless `uid_source` is `cert`; the server accepts only the
    certificate's name anyway, so the prompt could only be answered wrongly. Folders that are not
    mounted stay the kit's own `transfer/`.
    """
    path = kit / "startup" / "fed_admin.json"
    config = json.loads(path.read_text())
    admin = config["admin"]
    admin["uid_source"] = "cert"
    if jobs.is_dir():
        admin["upload_dir"] = str(jobs)
    if results.is_dir():
        admin["download_dir"] = str(results)
    write_text(path, json.dumps(config, indent=2) + "\n")
    return admin


def check_admin_user(kit: Path) -> str:
    """The kit's admin name; FEDLLM_ADMIN_USER, when set, must be that name (the server checks it)."""
    try:
        cert_name = AdminKit.open(kit).username
    except AdminError as exc:
        raise ContainerEntryError(str(exc)) from None
    wanted = os.environ.get("FEDLLM_ADMIN_USER")
    if wanted and wanted != cert_name:
        raise ContainerEntryError(
            f"FEDLLM_ADMIN_USER is '{wanted}' but the admin kit mounted at /fedllm/kit belongs to '{cert_name}' "
            "(its certificate's name, the only one the server accepts); unset FEDLLM_ADMIN_USER or mount that "
            "admin's kit"
        )
    return cert_name


def _writable_or_warn(folder: Path, what: str, echo=print) -> None:
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        echo(
            f"[fedllm] warning: {folder} is not writable by uid {os.getuid()}: {what}; "
            f"give the host folder mounted there to uid {os.getuid()} (fedllm provision does, for the folders it creates)"
        )


def run_admin(kit: Path, workspace: Path, args: list[str]) -> None:
    """No args: NVFlare's interactive admin console. Otherwise: `fedllm ARGS` with this admin kit."""
    if not (kit / "startup" / "fed_admin.json").is_file():
        raise ContainerEntryError(f"no admin kit at {kit} (no startup/fed_admin.json); mount the admin's kit there")
    name = check_admin_user(kit)
    # The console writes its history and transfers into its kit folder: use a writable copy of the read-only kit.
    ws = stage_workspace(kit, workspace / "admin-kit", copy_startup=True)
    os.environ["FEDLLM_ADMIN_KIT"] = str(ws)
    if not args:
        jobs, results = Path(JOBS_MOUNT), Path(RESULTS_MOUNT)
        configure_console(ws, jobs, results)
        _writable_or_warn(jobs, "submit_job signs a job folder in place before it uploads it")
        _writable_or_warn(results, "download_job writes there")
        on_host = {k: os.environ.get(k, "?") for k in (HOST_JOBS_ENV, HOST_RESULTS_ENV)}
        print(
            f"[fedllm] admin console as {name}: `submit_job NAME` submits {jobs}/NAME "
            f"(host: {on_host[HOST_JOBS_ENV]}/NAME); `download_job ID` writes {results}/ID "
            f"(host: {on_host[HOST_RESULTS_ENV]}/ID)"
        )
        sys.stdout.flush()
        os.execvp(
            sys.executable,
            [sys.executable, "-m", "nvflare.fuel.hci.tools.admin", "-m", str(ws), "-s", "fed_admin.json"],
        )
    sys.stdout.flush()
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
