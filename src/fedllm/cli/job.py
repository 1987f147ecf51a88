"""`fedllm job create` and `fedllm job submit`."""

from __future__ import annotations

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
    site_config_path,
)
from fedllm.config.problems import display_path
from fedllm.jobs.template import available_templates
from fedllm.output import styled

app = typer.Typer(help="Create NVFlare job folders from templates and submit them.", no_args_is_help=True)


@app.command()
def create(
    template: Annotated[
        str, typer.Argument(help=f"Template name in jobs/ ({', '.join(available_templates())}) or a YAML path.")
    ],
    mode: Annotated[str, typer.Option(help="local | central | fedavg")] = "fedavg",
    out: Annotated[Path, typer.Option(help="Directory that receives the job folder.")] = Path("runs/jobs"),
    num_clients: Annotated[int | None, typer.Option(min=1, help="Sites that train (default: the template's).")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="FL rounds (fedavg only).")] = None,
    local_epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per round on each site.")] = None,
    devices: Annotated[int | None, typer.Option(min=1, help="GPUs each site trains on.")] = None,
    model: Annotated[str | None, typer.Option(help="Model path or id passed to the trainer.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Training file: once for all sites, or once per site.")] = None,
    validation: Annotated[str | None, typer.Option(help="Validation file, shared by every site.")] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: <template>-<mode>-<N>sites).")] = None,
    compress: Annotated[
        str, typer.Option(help="Message compression: none, fp16, bf16, blockwise8, float4, normfloat4.")
    ] = "none",
    arg: Annotated[
        list[str] | None,
        typer.Option("--arg", "-a", help="Trainer argument KEY=VALUE over the template's (e.g. -a quantize=4bit)."),
    ] = None,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Render a job folder for local-only, centralized or FedAvg training; print how to submit it."""
    from fedllm.jobs.create import create_job, resolve_spec
    from fedllm.jobs.template import load_template

    if mode not in ("local", "central", "fedavg"):
        raise typer.BadParameter(f"'{mode}' is not a mode; use local, central or fedavg", param_hint="--mode")
    sites = load_config(config, workspace)[0].site_names if data and len(data) > 1 else None
    extra_args = {}
    for item in arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{item}' is not KEY=VALUE (e.g. -a lr=0.0001)", param_hint="--arg")
        import yaml

        extra_args[key.replace("-", "_")] = yaml.safe_load(value) if value else ""
    spec = resolve_spec(
        load_template(template),
        mode,  # type: ignore[arg-type]
        num_clients=num_clients,
        rounds=rounds,
        local_epochs=local_epochs,
        devices=devices,
        model=model,
        data=data,
        validation=validation,
        sites=sites,
        name=name,
        compression=compress,
        extra_args=extra_args,
    )
    job_dir = create_job(spec, out)
    done(
        "created",
        f" {display_path(job_dir)}: {spec.mode}, {spec.num_clients} site(s), "
        f"{spec.rounds} round(s) × {spec.local_epochs} epoch(s), {spec.devices} device(s) per site",
    )
    _print_submit_hints(job_dir, config, workspace)


def _print_submit_hints(job_dir: Path, config: Path | None, workspace: Path) -> None:
    """The two ways to submit the job: the admin console's `submit_job` (if it sees the folder) and `job submit`."""
    import contextlib
    import os

    from fedllm.errors import FedllmError
    from fedllm.jobs.create import submit_hints
    from fedllm.provision.compose import HOST_JOBS_ENV, JOBS_ENV, console_jobs_dir

    project = ""
    if not os.environ.get(JOBS_ENV) and site_config_path(config, workspace).is_file():
        with contextlib.suppress(FedllmError):  # the hint needs only the project; `fedllm validate` reports the rest
            project = load_config(config, workspace)[0].project
    jobs_dir = console_jobs_dir(workspace, project) if project or os.environ.get(JOBS_ENV) else None
    lines = submit_hints(job_dir, jobs_dir)
    if not os.environ.get(HOST_JOBS_ENV):  # on the host, `job submit` must find this federation's kits
        lines[-1] += _federation_options(config, workspace)
    for line in lines:
        console.print(f"  {line}")


def _federation_options(config: Path | None, workspace: Path) -> str:
    """The -c/-w that `job submit` needs to find the federation this command used (none when the defaults do)."""
    from fedllm.provision import provisioned_config

    options = ""
    if config is not None and config != provisioned_config(workspace):
        options += f" -c {display_path(config)}"
    if workspace != DEFAULT_WORKSPACE.absolute():
        options += f" -w {display_path(workspace)}"
    return options


@app.command()
def submit(
    job_dir: Annotated[Path, typer.Argument(help="An NVFlare job folder (from `fedllm job create`).")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends.")] = True,
    download: Annotated[Path | None, typer.Option(help="Download the result (and site logs) here.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the job before aborting it.")] = 3600.0,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    admin_kit: Annotated[
        Path | None,
        typer.Option(
            envvar="FEDLLM_ADMIN_KIT",
            help="An admin startup kit folder to submit with, instead of the config's kits (the admin container sets it).",
        ),
    ] = None,
) -> None:
    """Submit with the admin kit; exit non-zero with the failing site's error if the job fails."""
    from fedllm.jobs.submit import submit_job
    from fedllm.results.metrics import read_round_metrics
    from fedllm.runtime.admin import AdminKit

    if admin_kit is not None:
        import os

        kits = AdminKit.open(admin_kit, os.environ.get("FEDLLM_ADMIN_USER"))
    else:
        kits = federation_kits(config, workspace)
    result = submit_job(kits, job_dir, wait=wait, download=download, timeout=timeout, echo=echo)
    if not wait:
        return
    console.print(styled(result.status, "green"), f"job {result.job_id} in {result.duration_s:.1f}s")
    if result.result_dir:
        for rnd in read_round_metrics(result.result_dir):
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(rnd["aggregated"].items()))
            console.print(f"  round {rnd['round']}: {metrics}")
        console.print(f"result: {display_path(result.result_dir)}")
