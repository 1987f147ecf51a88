"""Commands that define and run a federation: validate, provision, up, down, status."""

from __future__ import annotations

from typing import Annotated

import typer

from fedllm.cli.common import DEFAULT_CONFIG, DEFAULT_WORKSPACE, ConfigOpt, WorkspaceOpt, console, echo
from fedllm.config import load_site_config
from fedllm.config.problems import display_path
from fedllm.provision import latest_kits, provision


def validate(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Check a site config and report every problem at once (file, line, field, fix)."""
    cfg = load_site_config(config)
    sites = ", ".join(f"{s.name} (GPUs {','.join(map(str, s.gpus)) or 'none'})" for s in cfg.sites)
    console.print(f"[green]OK[/] {display_path(config)}: project '{cfg.project}', server '{cfg.server.name}', {sites}")


def provision_cmd(config: ConfigOpt = DEFAULT_CONFIG, workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Render NVFlare's project.yml from the site config and provision mTLS startup kits."""
    cfg = load_site_config(config)
    kits = provision(cfg, workspace, source=display_path(config))
    console.print(
        f"[green]provisioned[/] {len(cfg.sites)} sites, {len(cfg.admins)} admin(s) → {display_path(kits.prod_dir)}"
    )
    for path in (kits.server(), *(kits.site(s) for s in cfg.site_names), kits.admin()):
        console.print(f"  {display_path(path)}")


def up(
    config: ConfigOpt = DEFAULT_CONFIG,
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

    kits = latest_kits(workspace, load_site_config(config))
    runtime.up(kits, timeout=timeout, echo=echo)


def down(
    config: ConfigOpt = DEFAULT_CONFIG,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean shutdown.")] = 60.0,
) -> None:
    """Stop a native federation through the admin API (processes are reaped afterwards)."""
    from fedllm.runtime import native as runtime

    kits = latest_kits(workspace, load_site_config(config))
    runtime.down(kits, timeout=timeout, echo=echo)


def status(config: ConfigOpt = DEFAULT_CONFIG, workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Show which participants run natively and which sites the server sees."""
    from fedllm.runtime import native as runtime
    from fedllm.runtime.admin import admin_session, connected_sites

    kits = latest_kits(workspace, load_site_config(config))
    for name, alive in runtime.status(kits).items():
        console.print(f"  {name:<20} {'[green]running[/]' if alive else '[red]stopped[/]'}")
    with admin_session(kits, timeout=10.0) as session:
        present = connected_sites(session)
    for site in kits.config.site_names:
        console.print(f"  {site:<20} {'[green]registered[/]' if site in present else '[yellow]not registered[/]'}")


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command("provision")(provision_cmd)
    app.command()(up)
    app.command()(down)
    app.command()(status)
