"""Options and output shared by every fedllm command.

Paths are made absolute where they enter (the options' callbacks): kits, scripts and logs are then
found whatever folder a process runs in (NVFlare's start scripts run inside their kit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.output import make_console, styled

console = make_console()
err_console = make_console(stderr=True)

DEFAULT_CONFIG = Path("site_configs/default.yaml")
DEFAULT_WORKSPACE = Path("workspace")


def absolute(path: Path | None) -> Path | None:
    """The path made absolute against the current folder (symlinks kept; None stays None)."""
    return None if path is None else path.absolute()


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "-c",
        "--config",
        envvar="FEDLLM_CONFIG",
        callback=absolute,
        show_default=False,
        help="Site config YAML (the federation's definition). "
        "Default: the config last provisioned into the workspace, else site_configs/default.yaml.",
    ),
]
WorkspaceOpt = Annotated[
    Path,
    typer.Option(
        "-w",
        "--workspace",
        envvar="FEDLLM_WORKSPACE",
        callback=absolute,
        help="Where kits live: WORKSPACE/<project>/prod_NN/.",
    ),
]


def site_config_path(config: Path | None, workspace: Path | None = None) -> Path:
    """The site config a command works on: `-c`, else the one last provisioned into `workspace`, else the default."""
    if config is not None:
        return config
    if workspace is not None:
        from fedllm.provision import provisioned_config

        recorded = provisioned_config(workspace)
        if recorded is not None:
            return recorded
    return DEFAULT_CONFIG.absolute()


def echo(message: str) -> None:
    """A library's progress line, printed verbatim."""
    console.print(message)


def done(head: str, rest: str = "") -> None:
    """fedllm's own word in green ("wrote", "provisioned"), then the details verbatim."""
    console.print(styled(head, "green", rest))


def load_config(config: Path | None, workspace: Path | None = None):
    """The validated site config a command works on (see `site_config_path`), and its file."""
    from fedllm.config import load_site_config

    path = site_config_path(config, workspace)
    return load_site_config(path), path


def federation_kits(config: Path | None, workspace: Path):
    """The newest kits of the federation a command works on; errors name the config that was looked for."""
    from fedllm.config.problems import display_path
    from fedllm.provision import latest_kits

    cfg, path = load_config(config, workspace)
    return latest_kits(workspace, cfg, source=display_path(path))
