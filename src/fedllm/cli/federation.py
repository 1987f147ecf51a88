"""Commands that define and run a federation: validate, provision, up, down, status."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import (
    DEFAULT_WORKSPACE,
    ConfigOpt,
    WorkspaceOpt,
    console,
    done,
    echo,
    federation_kits,
    load_config,
)
from fedllm.config.problems import display_path
from fedllm.output import styled
from fedllm.provision import provision


def validate(config: ConfigOpt = None) -> None:
    """Check a site config and report every problem at once (file, line, field, fix).

    Errors (exit 1) are faults of the file. Warnings (exit 0) are about this host: a data folder of a
    site that runs here is missing (it may be made later; `fedllm preflight` fails on it at start).
    """
    from pathlib import Path

    from fedllm.config.readiness import here, host_warnings

    cfg, path = load_config(config)
    sites = ", ".join(f"{s.name} (GPUs {','.join(map(str, s.gpus)) or 'none'})" for s in cfg.sites)
    done("OK", f" {display_path(path)}: project '{cfg.project}', server '{cfg.server.name}', {sites}")
    for problem in host_warnings(cfg, path, Path.cwd()):
        console.print(styled("warning:", "yellow", f" {problem}"))
    _, elsewhere = here(cfg)
    if elsewhere:
        names = ", ".join(f"{s.name} ({s.host})" for s in elsewhere)
        console.print(f"  not checked here, `fedllm preflight` checks them on their hosts: data folders of {names}")


def _workspace_folder(workspace: Path) -> Path:
    """The kits' folder, or a usage error naming the path when it cannot be one (a file, or under a file)."""
    for path in (workspace, *workspace.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == workspace else f"cannot be created: {display_path(path)} "
                raise typer.BadParameter(
                    f"{display_path(workspace)} {where}is a file, not a folder; pass a folder for the kits "
                    "(it is created if missing)",
                    param_hint="'-w' / '--workspace'",
                )
            if not os.access(path, os.W_OK | os.X_OK):
                raise typer.BadParameter(
                    f"cannot create or write {display_path(workspace)}: {display_path(path)} is not writable "
                    "by this user; pass a folder you can write",
                    param_hint="'-w' / '--workspace'",
                )
            break
    return workspace


def provision_cmd(config: ConfigOpt = None, workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Render NVFlare's project.yml from the site config and provision mTLS startup kits.

    The workspace remembers the config, so the commands that follow (up, status, job submit, down) find
    this federation without `-c`.
    """
    cfg, path = load_config(config)
    kits = provision(cfg, _workspace_folder(workspace), source=display_path(path), config_file=path)
    done("provisioned", f" {len(cfg.sites)} sites, {len(cfg.admins)} admin(s) → {display_path(kits.prod_dir)}")
    for kit in (kits.server(), *(kits.site(s) for s in cfg.site_names), kits.admin()):
        console.print(f"  {display_path(kit)}")


def up(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    native: Annotated[
        bool, typer.Option("--native", hidden=True, help="Accepted for older scripts: `up` runs local processes.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server and every site to be ready.")] = 120.0,
) -> None:
    """Start the server and sites as local processes; return once every site is registered.

    Starts the kits this workspace holds: in a participant's own workspace (fedllm package), only its own.

    Participants still running are left alone. Containers: docker compose up -d --wait (docs/containers.md).
    """
    from fedllm.runtime import native as runtime

    kits = federation_kits(config, workspace)
    runtime.up(kits, timeout=timeout, echo=echo)


def down(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean shutdown.")] = 60.0,
) -> None:
    """Stop the server and sites `fedllm up` started from this workspace (jobs' processes included)."""
    from fedllm.runtime import native as runtime

    kits = federation_kits(config, workspace)
    runtime.down(kits, timeout=timeout, echo=echo)


def status(config: ConfigOpt = None, workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Which participants run from this workspace, and which sites are registered with the server."""
    from fedllm.runtime import native as runtime

    kits = federation_kits(config, workspace)
    state = runtime.federation_state(kits)
    console.print(f"project '{kits.config.project}', kits {display_path(kits.prod_dir)}")
    for p in state.participants:
        if p.pid is not None:
            process = styled("running", "green", f" (pid {p.pid})")
        elif p.here:
            process = styled("not running", "red")
        else:
            process = styled("not started here", "dim")
        if p.role == "server":
            reach = "reachable" if state.server_reachable else "not reachable"
            detail = styled(f"admin port {state.server_address} {reach}", "green" if state.server_reachable else "red")
        elif p.registered is None:
            detail = styled("registration unknown here", "dim")
        else:
            detail = styled("registered", "green") if p.registered else styled("not registered", "yellow")
        console.print(f"  {p.name:<20} {p.role:<7}", process, "  ", detail)
    if not any(p.pid for p in state.participants) and any(p.here for p in state.participants):
        console.print("nothing runs from this workspace; `fedllm up` starts it")


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command("provision")(provision_cmd)
    app.command()(up)
    app.command()(down)
    app.command()(status)
