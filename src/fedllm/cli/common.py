"""Options and output shared by every fedllm command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# soft_wrap: long paths stay on one line when output goes to a pipe or a CI log.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_CONFIG = Path("site_configs/default.yaml")
DEFAULT_WORKSPACE = Path("workspace")

ConfigOpt = Annotated[
    Path,
    typer.Option("-c", "--config", envvar="FEDLLM_CONFIG", help="Site config YAML (the federation's definition)."),
]
WorkspaceOpt = Annotated[
    Path,
    typer.Option("-w", "--workspace", envvar="FEDLLM_WORKSPACE", help="Where kits live: WORKSPACE/<project>/prod_NN/."),
]


def echo(message: str) -> None:
    console.print(message)
