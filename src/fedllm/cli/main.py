"""Entry point of the `fedllm` command."""

from __future__ import annotations

import sys

import click
import typer

from fedllm.cli import federation, job
from fedllm.cli.common import err_console
from fedllm.errors import FedllmError

app = typer.Typer(
    name="fedllm",
    help="Federated fine-tuning of LLMs with NVIDIA FLARE: site config → kits → federation → jobs → results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
federation.register(app)
app.add_typer(job.app, name="job")


@app.command()
def demo(
    workspace: str = typer.Option(
        "workspace/demo", "-w", "--workspace", help="Where the demo keeps kits, data, results."
    ),
    rounds: int = typer.Option(5, min=1, help="FedAvg rounds."),
) -> None:
    """Provision 3 local sites, run a small FedAvg job that really trains, print its metrics, stop."""
    from pathlib import Path

    from fedllm.demo import run_demo

    run_demo(Path(workspace), rounds=rounds)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; expected errors print in red on one block and exit 1 (no traceback)."""
    try:
        app(args=argv, standalone_mode=False)
    except FedllmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    return 0


def run() -> None:
    """Console-script entry: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
