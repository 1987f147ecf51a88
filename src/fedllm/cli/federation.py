"""Commands that define and run a federation: validate, provision, up, down, status."""

from __future__ import annotations

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


def provision_cmd(config: ConfigOpt = None, workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Render NVFlare's project.yml from the site config and provision mTLS startup kits.

    The workspace remembers the config, so the commands that follow (up, status, job submit, down) find
    this federation without `-c`.
    """
    cfg, path = load_config(config)
    kits = provision(cfg, workspace, source=display_path(path), config_file=path)
    done("provisioned", f" {len(cfg.sites)} sites, {len(cfg.admins)} admin(s) → {display_path(kits.prod_dir)}")
    for kit in (kits.server(), *(kits.site(s) for s in cfg.site_names), kits.admin()):
        console.print(f"  {display_path(kit)}")


def up(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    native: Annotated[bool, typer.Option("--native", help="Run server and sites as local processes.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every site to register.")] = 120.0,
) -> None:
    """Start the provisioned federation and wait until every site is registered."""
    if not native:
        raise typer.BadParameter(
            "containers are started with `docker compose up` (see README); pass --native for local processes",
            param_hint="--native",
        )
    from fedllm.runtime import native as runtime

    kits = federation_kits(config, workspace)
    runtime.up(kits, timeout=timeout, echo=echo)


def down(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean shutdown.")] = 60.0,
) -> None:
    """Stop a native federation through the admin API (processes are reaped afterwards)."""
    from fedllm.runtime import native as runtime

    kits = federation_kits(config, workspace)
    runtime.down(kits, timeout=timeout, echo=echo)


def status(config: ConfigOpt = None, workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Show which participants run natively and which sites the server sees."""
    from fedllm.runtime import native as runtime
    from fedllm.runtime.admin import admin_session, connected_sites

    kits = federation_kits(config, workspace)
    for name, alive in runtime.status(kits).items():
        console.print(f"  {name:<20}", styled("running", "green") if alive else styled("stopped", "red"))
    with admin_session(kits, timeout=10.0) as session:
        present = connected_sites(session)
    for site in kits.config.site_names:
        console.print(
            f"  {site:<20}", styled("registered", "green") if site in present else styled("not registered", "yellow")
        )


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command("provision")(provision_cmd)
    app.command()(up)
    app.command()(down)
    app.command()(status)
