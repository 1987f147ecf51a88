"""`fedllm preflight` and `fedllm container-entry`: the container side of a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import DEFAULT_WORKSPACE, ConfigOpt, WorkspaceOpt, console, done, federation_kits, load_config
from fedllm.errors import FedllmError


class PreflightFailed(FedllmError):
    """At least one preflight check failed; the lines above say which and what to do."""


def preflight(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    site: Annotated[
        list[str] | None,
        typer.Option("--site", help="Check only this site (repeatable); default: the sites on this host."),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Treat these names as this machine (default: localhost + hostname)."),
    ] = None,
) -> None:
    """Check this host before its sites start: data folders, driver, each GPU exists, none shared, free memory, bf16.

    The sites are those of -c, else of the config last provisioned into the workspace.
    """
    from fedllm.config.problems import display_path
    from fedllm.output import styled
    from fedllm.runtime.preflight import check_sites

    cfg, path = load_config(config, workspace)
    report = check_sites(cfg, site_names=site or None, hosts=set(host) if host else None)
    for finding in report.findings:
        head = styled("PASS", "green") if finding.ok else styled("FAIL", "red")
        console.print(head, f" {finding.subject}: {finding.message}")
    if not report.ok:
        failed = sum(not f.ok for f in report.findings)
        raise PreflightFailed(f"preflight failed ({failed} check(s)) for {display_path(path)}")
    done("preflight passed")


def container_entry(
    role: Annotated[str, typer.Argument(help="server | site | admin")],
    args: Annotated[
        list[str] | None, typer.Argument(help="admin only: a fedllm command to run with the admin kit")
    ] = None,
) -> None:
    """The image's entrypoint: stage the mounted kit, run preflight (sites), exec NVFlare (or the admin console)."""
    from fedllm.runtime.container import container_entry as entry

    entry(role, list(args or []))


k8s_app = typer.Typer(help="Kubernetes deployment through NVFlare's `nvflare deploy prepare`.", no_args_is_help=True)


@k8s_app.command("render")
def k8s_render(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    image: Annotated[
        str | None, typer.Option(help="Image the pods run (default: the site config's container.image).")
    ] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "fedllm",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <prod dir>/k8s).")] = None,
) -> None:
    """Render a Helm chart per participant from the newest kits, GPU requests from the site config."""
    from fedllm.runtime.k8s import render

    kits = federation_kits(config, workspace)
    render(kits, image or kits.config.container.image, namespace, out, echo=console.print)


def register(app: typer.Typer) -> None:
    app.command()(preflight)
    app.add_typer(k8s_app, name="k8s")
    app.command(
        "container-entry",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        hidden=True,
    )(container_entry)
