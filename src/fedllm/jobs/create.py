"""Turn a job template into an NVFlare job folder with NVFlare's FedAvg recipe (Job API).

Modes (the seeds' create_configs.py, made explicit):
  fedavg  — R rounds × E local epochs on N sites, weights averaged by the server;
  local   — 1 round × E epochs on each of N sites: every site trains alone (the baseline);
  central — 1 round × E epochs on one site holding the combined data (the upper bound).
All modes validate on the same validation set so their curves compare directly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.checkpoint.model_spec import read_model_spec
from fedllm.fileio import atomic_directory
from fedllm.jobs.compression import QUANTIZATIONS, apply_compression, check_compression
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.exchange import apply_exchange_settings, apply_tensor_items, recipe_kwargs, wire_compression
from fedllm.jobs.plan import JobPlan, plan_job
from fedllm.jobs.privacy import DP_KEY, resolve_dp
from fedllm.jobs.server_model import check_server_model, initial_args
from fedllm.jobs.sites import Federation, unchecked_quantization_note
from fedllm.jobs.template import JobTemplate, Mode
from fedllm.jobs.trainer_args import (
    TrainerArguments,
    TrainerUnavailable,
    cli_args,
    coerce_switch_words,
    trainer_arguments,
)
from fedllm.training.dp import BudgetPlan

__all__ = ["JobSpec", "JobSpecError", "cli_args", "create_job", "resolve_spec"]

MODES = ("local", "central", "fedavg")
# NVFlare's job-name grammar (nvflare.fuel.utils.validation_utils.JOB_NAME_PATTERN): the job's folder name
# and what the admin console's `submit_job NAME` takes.
JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The options of `fedllm job create` that set a trainer argument.
OPTION_KEYS = {"model": "--model", "train": "--data", "val": "--validation"}
# Trainer arguments job create derives from the mode and its options: never set by -a (they would be overridden).
DERIVED_KEYS = {"epochs": "--local-epochs", "devices": "--devices", "rounds": "--rounds", DP_KEY: "--dp"}
MAX_JOB_NAME = 128  # a folder name, with room for the staging folder's prefix and suffix


@dataclass(frozen=True)
class JobSpec:
    """Everything needed to render one job, resolved from a template and CLI options."""

    template: JobTemplate
    mode: Mode
    name: str
    num_clients: int
    rounds: int
    local_epochs: int
    devices: int
    train_args: dict[str, Any]
    # Per-site overrides of train_args (e.g. each site's own training file), keyed by site name.
    site_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Message compression filters (fedllm.jobs.compression): none, fp16, bf16, blockwise8, float4, normfloat4.
    compression: str = "none"
    # The server's initial model's arguments, resolved from the template and the job's trainer arguments.
    initial_args: dict[str, Any] = field(default_factory=dict)
    # What could not be checked where the job was created, said rather than left silent.
    notes: tuple[str, ...] = ()
    # Each site's processes, batch, precision, quantization and rank (fedllm.jobs.plan), as printed.
    plan: JobPlan | None = None
    # --dp: the sites' DP-SGD settings and ε after each round (fedllm.jobs.privacy), as printed.
    dp: BudgetPlan | None = None


def resolve_spec(
    template: JobTemplate,
    mode: Mode,
    *,
    num_clients: int | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    devices: int | None = None,
    model: str | None = None,
    data: list[str] | None = None,
    validation: str | None = None,
    sites: list[str] | None = None,
    name: str | None = None,
    extra_args: dict[str, Any] | None = None,
    compression: str = "none",
    site_overrides: dict[str, dict[str, Any]] | None = None,
    federation: Federation | None = None,
    fit: str = "batch",
    dp: str | None = None,
) -> JobSpec:
    """Apply the mode's rules to the template defaults and the caller's options, and check the result.

    `federation` (the site config) sizes and checks the job: all its sites train by default, and
    --num-clients and --compress must fit them. Without one the template's number of sites is used and
    the job's notes say what went unchecked. The trainer's arguments are checked against its own parser.
    `site_overrides` sets trainer arguments for single sites, e.g. {"site-3": {"devices": 2, "model": ...}}
    for a site that trains a TP-2 copy of the model on its GPU pair (its torchrun starts that many processes).
    `dp` (`--dp epsilon=E,...`) trains every site with DP-SGD and plans the privacy budget (fedllm.jobs.privacy).
    """
    if mode not in MODES:
        raise JobSpecError(f"--mode {mode!r} is not a mode; use local, central or fedavg")
    check_compression(compression)
    notes: list[str] = []
    d = template.defaults
    if federation is not None:
        sites = sites or federation.site_names
    # Every site of the federation trains unless told otherwise; the template's count where none is known.
    everyone = len(federation.site_names) if federation is not None else d.num_clients
    if mode == "fedavg":
        n, r, e = num_clients or everyone, rounds or d.rounds, local_epochs or d.local_epochs
    else:
        if rounds not in (None, 1):
            raise JobSpecError(
                f"--rounds {rounds} does not apply to --mode {mode}: it trains 1 round × --local-epochs; "
                "drop --rounds or use --mode fedavg"
            )
        # Same number of passes over the data as the template's FedAvg run (R rounds × 1 epoch).
        n = 1 if mode == "central" else (num_clients or everyone)
        r, e = 1, local_epochs or d.rounds * d.local_epochs
        if mode == "central" and num_clients not in (None, 1):
            raise JobSpecError("--mode central trains on one site (the combined data); drop --num-clients")
    if federation is not None:
        federation.check_site_count(n)
    dev = devices or d.devices
    if dev > 1 and template.launch != "torchrun":
        raise JobSpecError(
            f"--devices {dev}: template {template.name} trains in the site's job process on one device, so the "
            "other devices would sit idle; use --devices 1, or a template that runs one process per device "
            "(launch: torchrun: hf-sft, hf-lora, nemo-*)"
        )
    job_name = _job_name(template, name or f"{template.name}-{mode}-{n}sites", given=name is not None)

    trainer = _trainer(template, notes)
    data = list(data or [])
    if trainer is not None:
        given = {"model": model, "val": validation, "train": data}
        for key, option in OPTION_KEYS.items():
            if given[key] and not trainer.takes(key):
                raise JobSpecError(
                    f"{option}: template {template.name}'s trainer {trainer.module} takes no {key} argument, so "
                    f"{option} would stop every site. Fix: drop {option} (`fedllm job args {template.name}` lists "
                    "what it takes)"
                )
    _check_extra_args(extra_args or {}, {"model": model, "val": validation, "train": data})
    args: dict[str, Any] = {**template.train_args, **(extra_args or {}), "epochs": e, "devices": dev}
    if model:
        args["model"] = model
    if validation:
        args["val"] = validation
    if "rounds" in template.train_args:
        args["rounds"] = r
    site_args: dict[str, dict[str, Any]] = {}
    if len(data) == 1:
        args["train"] = data[0]
    elif len(data) > 1:
        if len(data) != n:
            raise JobSpecError(f"--data lists {len(data)} files for {n} sites; give one file, or one per site")
        if not sites or len(sites) < n:
            raise JobSpecError("per-site --data needs the site names: pass -c <site config> with enough sites")
        site_args = {site: {"train": path} for site, path in zip(sites[:n], data, strict=True)}
    if site_overrides:
        named = sites or sorted(site_overrides)
        if len(named) < n or not set(site_overrides) <= set(named):
            raise JobSpecError(
                f"per-site arguments for {sorted(site_overrides)} need every site's name: pass -c <site config> "
                f"whose sites include them ({n} site(s) train)"
            )
        site_args = {site: {**site_args.get(site, {}), **site_overrides.get(site, {})} for site in named[:n]}
    if args.get("model") == REQUIRED_MODEL:
        raise JobSpecError(f"template {template.name} needs the base model: pass --model PATH_OR_ID")

    context = f"template {template.name}"
    parsed: argparse.Namespace | None = None
    if trainer is not None:
        args, parsed = trainer.check(args, context)
        for site, overrides in site_args.items():
            _, own = trainer.check({**args, **overrides}, f"{context}, {site}'s arguments")
            site_args[site] = {key: getattr(own, key) for key in overrides}
    else:
        args = coerce_switch_words(args)
        site_args = {site: coerce_switch_words(overrides) for site, overrides in site_args.items()}
    if template.launch != "torchrun":
        for site, overrides in site_args.items():
            if int(overrides.get("devices", 1)) > 1:
                raise JobSpecError(
                    f"{site}: devices={overrides['devices']}, but template {template.name} trains in the site's job "
                    "process on one device. Fix: drop it, or use a template that runs one process per device "
                    "(launch: torchrun)"
                )
    plan = plan_job(
        template, trainer, vars(parsed) if parsed is not None else args, site_args, federation, devices, fit
    )
    site_args = plan.site_args or site_args
    budget = None
    if dp is not None:
        budget = resolve_dp(dp, template, trainer, rounds=r, local_epochs=e, devices=dev, site_args=site_args,
                            extra_args=extra_args or {})  # fmt: skip
        args[DP_KEY] = budget.settings.to_arg()

    if federation is not None:
        federation.check_compression(compression, list(site_args) or federation.site_names)
    else:
        _note_unchecked_sites(notes, n, compression)
    if (quantization := unchecked_quantization_note(compression)) is not None:
        notes.append(quantization)
    if template.launch == "torchrun":
        _check_local_checkpoint(args, dev)
        for overrides in site_args.values():
            if "devices" in overrides or "model" in overrides:
                _check_local_checkpoint({**args, **overrides}, int(overrides.get("devices", dev)))
    check_server_model(template, notes)
    initial = initial_args(template, args, parsed, notes)
    return JobSpec(
        template, mode, job_name, n, r, e, dev, args, site_args, compression, initial, tuple(notes), plan, budget
    )


def _check_extra_args(extra_args: dict[str, Any], options: dict[str, Any]) -> None:
    """-a never sets what job create derives itself, nor what one of its options also sets."""
    for key, option in DERIVED_KEYS.items():
        if key in extra_args:
            raise JobSpecError(f"-a {key}=...: job create sets {key} from the mode and {option}. Fix: use {option}")
    for key, option in OPTION_KEYS.items():
        if key in extra_args and options[key]:
            raise JobSpecError(f"-a {key}=... and {option} both set {key}. Fix: give one of them")


def _job_name(template: JobTemplate, job_name: str, given: bool) -> str:
    if len(job_name) > MAX_JOB_NAME:
        what = "--name" if given else f"the job name from template name {template.name[:40]!r}..."
        raise JobSpecError(f"{what}: a job name is at most {MAX_JOB_NAME} characters. Fix: --name a shorter one")
    if JOB_NAME_RE.fullmatch(job_name):
        return job_name
    suggestion = re.sub(r"[^A-Za-z0-9._-]+", "-", job_name).strip("-._") or "my-job"
    rule = (
        "a job name is the job's folder and what the admin console's `submit_job NAME` takes: letters, digits, "
        "'.', '_' and '-', starting with a letter or digit"
    )
    if given:
        raise JobSpecError(f"--name {job_name!r}: {rule}. Fix: e.g. --name {suggestion}")
    raise JobSpecError(
        f"template name {template.name!r} makes the job name {job_name!r}; {rule}. "
        f"Fix: pass --name, e.g. --name {suggestion}, or rename the template"
    )


def _trainer(template: JobTemplate, notes: list[str]) -> TrainerArguments | None:
    """The template's trainer parser; None (and a note) where it cannot be loaded here."""
    try:
        return dataclasses.replace(trainer_arguments(template.trainer), template=template.name)
    except TrainerUnavailable as exc:
        notes.append(
            f"{exc}: the job's trainer arguments were not checked (a wrong one stops every site when the job "
            "starts); create the job where the trainer is installed to have them checked"
        )
        return None


def _note_unchecked_sites(notes: list[str], n: int, compression: str) -> None:
    needs = f"{n} site(s)" + (f" with GPUs (--compress {compression})" if compression in QUANTIZATIONS else "")
    notes.append(
        f"no site config: the job waits for {needs}, which was not checked against the federation's sites; "
        "pass -c SITE_CONFIG (or create the job where the federation was provisioned) to have it checked"
    )


def _torchrun(devices: int) -> str:
    # --standalone picks a free rendezvous port, so sites sharing a host do not collide.
    return f"torchrun --standalone --nproc_per_node={devices}"


def _site_config(spec: JobSpec, overrides: dict[str, Any], torchrun: bool) -> dict[str, Any]:
    """NVFlare's per-site recipe config: the site's trainer arguments, and its own process count."""
    config: dict[str, Any] = {"train_args": cli_args({**spec.train_args, **overrides})}
    if torchrun and "devices" in overrides:
        config["command"] = _torchrun(int(overrides["devices"]))
    return config


def _check_local_checkpoint(args: dict[str, Any], devices: int) -> None:
    """A NeMo job's TP must equal --devices: check now when the .nemo is readable here (sites check again)."""
    model = str(args.get("model", ""))
    if model.endswith(".nemo") and "{" not in model and Path(model).exists():
        read_model_spec(model).check_fits_site(devices)


REQUIRED_MODEL = "set-by---model"  # a template's placeholder: `fedllm job create --model` must be given
ENTRY_NAME = "fedllm_site_entry.py"
ENTRY_SCRIPT = '''"""Site entry of a fedllm job (generated): run the template's trainer through the Client API.

The trainer code comes from the fedllm installed on the site (its image or venv), not from
the job folder, so every site runs the same reviewed code.
"""

from fedllm.flare.tensor_wire import register
from {module} import main

register()  # weights may come straight from the server as raw tensor slices (fedllm.flare.tensor_wire)
main()
'''


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """contextlib.chdir for Python 3.10 (the NeMo containers' Python)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def create_job(spec: JobSpec, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Export `spec` as an NVFlare job folder under `out_dir`; returns the job's directory.

    The folder appears whole or not at all (staged beside it, then renamed). An existing job folder
    of that name is replaced only with `overwrite`: what it holds is gone then.
    """
    from nvflare.recipe.utils import add_experiment_tracking, add_final_global_evaluation, set_per_site_config

    from fedllm.jobs.recipe import FedllmFedAvgRecipe

    out_dir = Path(out_dir).absolute()
    job_dir = out_dir / spec.name
    _check_target(out_dir, job_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="fedllm-job-") as tmp, _working_dir(Path(tmp)):
        # The recipe records the script path as given: relative, so sites find it in the job's custom dir.
        Path(ENTRY_NAME).write_text(ENTRY_SCRIPT.format(module=spec.template.trainer))
        initial = spec.template.initial_model
        torchrun = spec.template.launch == "torchrun"
        recipe = FedllmFedAvgRecipe(
            name=spec.name,
            model={"class_path": initial.class_path, "args": spec.initial_args} if initial else None,
            min_clients=spec.num_clients,
            num_rounds=spec.rounds,
            train_script=ENTRY_NAME,
            train_args=cli_args(spec.train_args),
            key_metric=spec.template.key_metric,
            # NVFlare's model selector takes higher as better unless told; each template's metric says which.
            key_metric_mode=spec.template.key_metric_direction,
            # torchrun: one trainer process per GPU of the site, started once for the whole job.
            launch_external_process=torchrun,
            command=_torchrun(spec.devices) if torchrun else "python3 -u",
            **recipe_kwargs(spec.template.exchange),
        )
        # NVFlare takes per-site config only right after construction, before any config or filter.
        if spec.site_args:
            set_per_site_config(recipe, {site: _site_config(spec, a, torchrun) for site, a in spec.site_args.items()})
        apply_exchange_settings(recipe, spec.template.exchange)
        # --compress wins over the template's exchange.wire_dtype; both use the same filters.
        compression = spec.compression if spec.compression != "none" else wire_compression(spec.template.exchange)
        apply_compression(recipe, compression)
        apply_tensor_items(recipe, spec.template.exchange)  # after compression: it must be the last filter out
        # Live metrics in one place: every site's scalars (nvflare.client.tracking) land in the server's
        # TensorBoard, workspace/tb_events/<site>/, and come back with the job's result.
        add_experiment_tracking(recipe, "tensorboard")
        if spec.template.final_evaluation and spec.mode != "local" and initial is not None:
            add_final_global_evaluation(recipe)
        if spec.dp is not None and spec.dp.settings.epsilon is not None:
            _add_dp_budget(recipe, spec.dp)
        # Sites stream their job logs to the server, so `fedllm job submit` can show a failing site's error.
        recipe.enable_log_streaming("log.txt")
        staging = Path(tmp) / "export"
        recipe.export(str(staging))
        # NVFlare's Job API copies the source of components from packages it finds outside site-packages
        # (an editable install) into the job. fedllm is installed on every participant: drop the copies,
        # so a job carries only its entry script and runs the reviewed install.
        for copied in (staging / spec.name).glob("*/custom/fedllm"):
            shutil.rmtree(copied)
        _place(staging / spec.name, out_dir, job_dir, overwrite)
    return job_dir


def _add_dp_budget(recipe, plan: BudgetPlan) -> None:
    """The server's copy of the budget plan: it runs no round past the last one within ε (fedllm.flare.dp_budget)."""
    from fedllm.flare.dp_budget import COMPONENT_ID, DPBudget

    s = plan.settings
    assert s.epsilon is not None
    budget = DPBudget(plan.stop_round, s.epsilon, s.delta, list(plan.epsilons), s.noise_multiplier, s.sample_rate,
                      plan.steps_per_round)  # fmt: skip
    recipe._job.to_server(budget, id=COMPONENT_ID)  # NVFlare's recipes add server components through their job


def _check_target(out_dir: Path, job_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target that is not a folder or a job folder that is there already."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise JobSpecError(
            f"--out {out_dir}: {existing} is a file, not a folder. Fix: --out a folder (made if missing)"
        )
    if job_dir.exists() or job_dir.is_symlink():
        if not job_dir.is_dir() or job_dir.is_symlink():
            raise JobSpecError(f"{job_dir} is there and is not a job folder. Fix: --name another name, or move it")
        if not overwrite:
            raise JobSpecError(
                f"job folder {job_dir} exists. Fix: --overwrite to replace it (everything in it goes), "
                "or --name another name"
            )


def _place(exported: Path, out_dir: Path, job_dir: Path, overwrite: bool) -> None:
    """Put the exported job at `job_dir` in one rename, owned like the folder it goes into."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_directory(job_dir, replace=overwrite) as staging:
            shutil.copytree(exported, staging, dirs_exist_ok=True)
            staging.chmod(0o777 & ~_umask())  # a staging folder is private; a job folder is not
            _adopt_owner(staging, out_dir)
    except OSError as exc:
        raise JobSpecError(
            f"cannot write the job into {out_dir}: {exc.strerror or exc}. Fix: --out a folder you can write"
        ) from None
    placed = job_dir / "meta.json"
    if not placed.is_file() or placed.read_bytes() != (exported / "meta.json").read_bytes():
        raise JobSpecError(f"job folder {job_dir} was created by another command meanwhile; it was left as it is")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _adopt_owner(tree: Path, folder: Path) -> None:
    """As root, give a new job the owner of the folder it goes into.

    The shared jobs folder belongs to the containers' user (provisioning hands it over); NVFlare's
    console signs a job folder in place before uploading it, so that user must own the job as well.
    """
    owner = folder.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    for path in [tree, *tree.rglob("*")]:
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def console_submit_name(job_dir: Path, jobs_dir: Path | None) -> str | None:
    """What to type after `submit_job` in the admin console for `job_dir`; None if the console cannot see it."""
    if jobs_dir is None:
        return None
    try:
        return str(job_dir.resolve().relative_to(jobs_dir.resolve()))
    except ValueError:
        return None


def submit_hints(job_dir: Path, jobs_dir: Path | None) -> list[str]:
    """How to submit `job_dir`: in the admin console (when its jobs folder holds the job) and with `job submit`.

    `jobs_dir` is the console's jobs folder as seen here (the host folder, or /fedllm/jobs in the admin
    container, where FEDLLM_HOST_JOBS_DIR names the host folder).
    """
    from fedllm.config.problems import display_path
    from fedllm.provision.compose import HOST_JOBS_ENV, RESULTS_MOUNT

    name = console_submit_name(job_dir, jobs_dir)
    host = os.environ.get(HOST_JOBS_ENV)
    lines = []
    if name is not None:
        lines.append(f"admin console (docker compose run --rm admin):  submit_job {name}")
        if host:
            lines.append(f"on the host: {host}/{name}")
    elif jobs_dir is not None:
        lines.append(
            f"admin console: cannot see it (submit_job reads {display_path(jobs_dir)} only); "
            f"to submit it there, create it with --out {display_path(jobs_dir)}"
        )
    lines.append(f"fedllm job submit {display_path(job_dir)} --download {RESULTS_MOUNT if host else 'runs/results'}")
    return lines
