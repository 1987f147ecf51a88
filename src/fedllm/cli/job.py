"""`fedllm job create`, `fedllm job args` and `fedllm job submit`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedllm.cli.common import (
    DEFAULT_WORKSPACE,
    ConfigOpt,
    WorkspaceOpt,
    absolute,
    console,
    done,
    echo,
    err_console,
    federation_kits,
    load_config,
    site_config_path,
)
from fedllm.config.problems import display_path
from fedllm.jobs.template import available_templates
from fedllm.output import styled

if TYPE_CHECKING:
    from fedllm.jobs.sites import Federation

app = typer.Typer(help="Create NVFlare job folders from templates and submit them.", no_args_is_help=True)


@app.command(
    epilog="Trainer arguments (-a KEY=VALUE) are each template's own: `fedllm job args TEMPLATE` lists them "
    "with their types, choices, template values and defaults. They are checked against the trainer's parser "
    "here, and the job against the site config's sites, before anything is written."
)
def create(
    template: Annotated[
        str, typer.Argument(help=f"Template name in jobs/ ({', '.join(available_templates())}) or a YAML path.")
    ],
    mode: Annotated[str, typer.Option(help="local | central | fedavg")] = "fedavg",
    out: Annotated[Path, typer.Option(callback=absolute, help="Directory that receives the job folder.")] = Path(
        "runs/jobs"
    ),
    num_clients: Annotated[
        int | None,
        typer.Option(
            min=1, help="Sites that train (default: every site in the site config; without one, the template's)."
        ),
    ] = None,
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
        typer.Option(
            "--arg",
            "-a",
            help="Trainer argument KEY=VALUE over the template's, e.g. -a lr=0.0001, -a packing=true "
            "(`fedllm job args TEMPLATE` lists them).",
        ),
    ] = None,
    site: Annotated[
        list[str] | None,
        typer.Option(
            "--site",
            help="One site's own setting NAME:KEY=VALUE (repeatable): devices, micro_batch, quantize, lora_r, model, "
            "or any trainer argument, e.g. --site site-2:micro_batch=2.",
        ),
    ] = None,
    lora_ranks: Annotated[
        str | None,
        typer.Option(
            help="Each site's own LoRA rank, e.g. site-1:16,site-2:8,site-3:4 (hf-lora; HetLoRA zero-padding: the "
            "server averages at the largest rank, each site trains its first components). Unlisted sites: the largest."
        ),
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            help="Memory fit where a site states gpu_memory_gib and the model is readable here: batch (halve the "
            "micro-batch until the estimate fits), auto (also gradient checkpointing, then a 4-bit LoRA base), "
            "off (show the estimate only)."
        ),
    ] = "batch",
    secure_agg: Annotated[
        bool,
        typer.Option(
            "--secure-agg",
            help="Secure aggregation: the server learns only the sum of the sites' updates, never one site's; a "
            "round goes on while the threshold of sites stays (needs 3+ sites, no --compress).",
        ),
    ] = False,
    secagg_threshold: Annotated[
        int | None,
        typer.Option(help="With --secure-agg: sites whose shares unmask a round, 2..N (default ⌊N/2⌋+1)."),
    ] = None,
    secagg_min_sites: Annotated[
        int | None,
        typer.Option(
            help="With --secure-agg: sites that must be connected for the job to start (default the threshold)."
        ),
    ] = None,
    secagg_clip: Annotated[
        float | None,
        typer.Option(help="With --secure-agg: each site clamps its update to ±CLIP per value (default 1.0)."),
    ] = None,
    secagg_max_weight: Annotated[
        float | None,
        typer.Option(
            help="With --secure-agg: the largest FedAvg weight (a site's steps, or examples on the HF Trainer path) "
            "counted as is; a larger one counts as this, and the site says so (default 1000)."
        ),
    ] = None,
    dp: Annotated[
        str | None,
        typer.Option(
            help="Record-level DP-SGD at every site with a privacy budget: epsilon=E[,delta=D][,noise=SIGMA]"
            "[,clip=C][,sample_rate=Q] (defaults: delta 1e-5, clip 1.0, sample_rate 0.05; noise calibrated so the "
            "whole job spends at most E). Prints ε after each round; the job stops at the last round within E.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing job folder of the same name (everything in it goes).")
    ] = False,
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Render a job folder for local-only, centralized or FedAvg training; print each site's plan and how to submit it.

    Each site trains on the GPUs its site config lists (one process per GPU for torchrun templates) with
    the job's effective batch, reached through gradient accumulation where its micro-batch or process
    count differs.
    """
    from fedllm.jobs.create import MODES, create_job, resolve_spec
    from fedllm.jobs.template import load_template
    from fedllm.jobs.trainer_args import parse_assignments

    if mode not in MODES:
        raise typer.BadParameter(f"'{mode}' is not a mode; use local, central or fedavg", param_hint="--mode")
    federation = _federation(config, workspace)
    loaded = load_template(template)
    extra_args = parse_assignments(arg or [])
    site_overrides = _site_overrides(loaded, site or [], federation)
    secure = _secure_agg(secure_agg, secagg_threshold, secagg_min_sites, secagg_clip, secagg_max_weight)
    _apply_lora_ranks(loaded, lora_ranks, extra_args, site_overrides, federation)
    spec = resolve_spec(
        loaded,
        mode,  # type: ignore[arg-type]
        num_clients=num_clients,
        rounds=rounds,
        local_epochs=local_epochs,
        devices=devices,
        model=model,
        data=data,
        validation=validation,
        name=name,
        compression=compress,
        extra_args=extra_args,
        site_overrides=site_overrides,
        federation=federation,
        fit=fit,
        secure_agg=secure,
        dp=dp,
    )
    if spec.plan is not None:
        _print_plan(spec.plan)
    if spec.secure_agg is not None:
        console.print(f"  {spec.secure_agg.describe()}")
    if spec.dp is not None:
        from fedllm.jobs.privacy import plan_rows

        for line in plan_rows(spec.dp):
            console.print(f"  {line}")
    job_dir = create_job(spec, out, overwrite=overwrite)
    done(
        "created",
        f" {display_path(job_dir)}: {spec.mode}, {spec.num_clients} site(s), "
        f"{spec.rounds} round(s) × {spec.local_epochs} epoch(s)",
    )
    for note in spec.notes:
        err_console.print(styled("note:", "yellow", f" {note}"))
    _print_submit_hints(job_dir, federation.config.project if federation else "", config, workspace)


def _secure_agg(
    enabled: bool, threshold: int | None, min_sites: int | None, clip: float | None, max_weight: float | None
):
    """--secure-agg and its settings; a setting without the switch is a usage error (it would do nothing)."""
    from fedllm.jobs.secure_agg import SecureAggregation

    given = {
        "--secagg-threshold": threshold,
        "--secagg-min-sites": min_sites,
        "--secagg-clip": clip,
        "--secagg-max-weight": max_weight,
    }
    if not enabled:
        for option, value in given.items():
            if value is not None:
                raise typer.BadParameter(
                    f"{option} applies to secure aggregation only: add --secure-agg", param_hint=option
                )
        return None
    chosen = {k: v for k, v in {"clip": clip, "max_weight": max_weight}.items() if v is not None}
    return SecureAggregation(threshold=threshold, min_sites=min_sites, **chosen)


def _site_overrides(template, items: list[str], federation: Federation | None) -> dict[str, dict[str, str]]:
    """--site NAME:KEY=VALUE as per-site trainer arguments, for sites the site config names."""
    from fedllm.jobs.errors import JobSpecError
    from fedllm.jobs.plan import BatchKeys, parse_site_assignments
    from fedllm.jobs.trainer_args import TrainerUnavailable, trainer_arguments

    if not items:
        return {}
    try:
        keys = BatchKeys.of(trainer_arguments(template.trainer))
    except TrainerUnavailable:
        keys = None
    overrides = parse_site_assignments(items, keys)
    if federation is None:
        raise JobSpecError("--site needs the site config that names the sites: pass -c SITE_CONFIG")
    unknown = sorted(set(overrides) - set(federation.site_names))
    if unknown:
        raise JobSpecError(
            f"--site {unknown[0]}:...: the site config {federation.source} has no site {unknown[0]}; its sites are "
            f"{', '.join(federation.site_names)}"
        )
    return overrides


def _apply_lora_ranks(
    template, text: str | None, extra_args: dict, site_overrides: dict[str, dict], federation: Federation | None
) -> None:
    """--lora-ranks and --site NAME:lora_r=R as HetLoRA's per-site ranks with one LoRA scaling (in place)."""
    from fedllm.jobs.errors import JobSpecError
    from fedllm.jobs.lora_ranks import lora_rank_overrides, parse_lora_ranks

    ranks = parse_lora_ranks(text) if text is not None else {}
    for name, overrides in site_overrides.items():
        if "lora_r" not in overrides:
            continue
        given = str(overrides.pop("lora_r"))
        if name in ranks:
            raise JobSpecError(f"--site {name}:lora_r={given} and --lora-ranks both set {name}'s rank. Fix: give one")
        if not given.isdigit() or int(given) < 1:
            raise JobSpecError(f"--site {name}:lora_r={given}: a LoRA rank is a whole number ≥ 1, e.g. {name}:lora_r=8")
        ranks[name] = int(given)
    if not ranks:
        return
    if federation is not None and (unknown := sorted(set(ranks) - set(federation.site_names))):
        raise JobSpecError(
            f"--lora-ranks: the site config {federation.source} has no site {unknown[0]}; its sites are "
            f"{', '.join(federation.site_names)}"
        )
    job, sites = lora_rank_overrides(ranks, {**template.train_args, **extra_args})
    extra_args.update(job)
    for name, changes in sites.items():
        site_overrides.setdefault(name, {}).update(changes)


def _print_plan(plan) -> None:
    """Each site's share of the job, as a table (fedllm.jobs.plan)."""
    _print_aligned(plan.table())
    for site in plan.sites:
        if site.note:
            console.print(f"  {site.site}: {site.note}")
    if plan.effective_batch is not None:
        console.print(f"  every site steps its optimizer once per {plan.effective_batch} examples (the job's batch)")


def _federation(config: Path | None, workspace: Path) -> Federation | None:
    """The site config's sites a job is created for; None where no config is given or found (said in a note)."""
    from fedllm.jobs.sites import Federation

    if config is None and not site_config_path(config, workspace).is_file():
        return None
    cfg, path = load_config(config, workspace)
    return Federation(cfg, display_path(path))


@app.command("args")
def args_command(
    template: Annotated[str, typer.Argument(help="Template name in jobs/ or a YAML path.")],
) -> None:
    """List a template's trainer arguments: what `job create -a KEY=VALUE` may set, with values and defaults."""
    from fedllm.jobs.create import DERIVED_KEYS, OPTION_KEYS, REQUIRED_MODEL
    from fedllm.jobs.template import load_template
    from fedllm.jobs.trainer_args import TrainerUnavailable, trainer_arguments

    loaded = load_template(template)
    try:
        trainer = trainer_arguments(loaded.trainer)
    except TrainerUnavailable as exc:
        from fedllm.jobs.errors import JobSpecError

        raise JobSpecError(f"{exc}: its arguments cannot be listed here") from None
    set_by = {key: f"job create {option}" for key, option in {**OPTION_KEYS, **DERIVED_KEYS}.items()}
    console.print(
        f"{loaded.name}: trainer {trainer.module}. Set with `fedllm job create {loaded.name} -a KEY=VALUE` "
        "(a switch: KEY=true or KEY=false)."
    )
    rows = [("KEY", "TAKES", "VALUE", "ABOUT")]
    for a in trainer.describe():
        if loaded.train_args.get(a.key) == REQUIRED_MODEL:
            value = "(required)"
        elif a.key in loaded.train_args:
            value = f"{_shown(loaded.train_args[a.key])} (template)"
        else:
            value = "(required)" if a.required else f"{_shown(a.default)} (default)"
        about = a.help + (f" [{set_by[a.key]}]" if a.key in set_by else "")
        rows.append((a.key, a.kind, value, about))
    _print_aligned(rows)


def _print_aligned(rows: list[tuple[str, ...]]) -> None:
    """Rows of cells as indented columns, every column but the last padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        console.print("  " + "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]))


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value in ("", None) else str(value)


def _print_submit_hints(job_dir: Path, project: str, config: Path | None, workspace: Path) -> None:
    """The two ways to submit the job: the admin console's `submit_job` (if it sees the folder) and `job submit`."""
    import os

    from fedllm.jobs.create import submit_hints
    from fedllm.provision.compose import HOST_JOBS_ENV, JOBS_ENV, console_jobs_dir

    if os.environ.get(JOBS_ENV):
        project = ""
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
