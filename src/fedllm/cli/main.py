"""Entry point of the `fedllm` command."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fedllm.cli import cert, ckpt, containers, federation, job, workloads
from fedllm.cli.common import console, err_console
from fedllm.errors import FedllmError
from fedllm.output import styled

app = typer.Typer(
    name="fedllm",
    help="Federated fine-tuning of LLMs with NVIDIA FLARE: site config → kits → federation → jobs → results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"fedllm {version('fedllm')} (nvflare {version('nvflare')})")
        raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Federated fine-tuning of LLMs with NVIDIA FLARE: site config → kits → federation → jobs → results."""


federation.register(app)
cert.register(app)
app.add_typer(job.app, name="job")
app.add_typer(ckpt.app, name="ckpt")
containers.register(app)
workloads.register(app)


@app.command()
def demo(
    workspace: str = typer.Option(
        "workspace/demo", "-w", "--workspace", help="Where the demo keeps kits, data, results."
    ),
    rounds: int = typer.Option(5, min=1, help="FedAvg rounds."),
    dp: str | None = typer.Option(
        None,
        help="Train the FedAvg job with DP-SGD at this budget, e.g. --dp epsilon=8 (δ 1e-5, below 1/300 per site; "
        "as `fedllm job create --dp`).",
    ),
) -> None:
    """Federated p-tuning of a tiny GPT on 3 local sites vs each site alone: accuracies and a plot."""
    from pathlib import Path

    from fedllm.apps.demo import run_demo

    run_demo(Path(workspace), rounds=rounds, console=console, dp=dp)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; expected errors print in red (no traceback) and give 1."""
    try:
        app(args=argv, standalone_mode=True)  # usage errors: typer prints them and exits 2
    except FedllmError as exc:
        err_console.print(styled("error:", "bold red", f" {exc}"))
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def run() -> None:
    """Console-script entry: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
