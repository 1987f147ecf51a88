"""Turn a job template into an NVFlare job folder with NVFlare's FedAvg recipe (Job API).

Modes (the seeds' create_configs.py, made explicit):
  fedavg  — R rounds × E local epochs on N sites, weights averaged by the server;
  local   — 1 round × E epochs on each of N sites: every site trains alone (the baseline);
  central — 1 round × E epochs on one site holding the combined data (the upper bound).
All modes validate on the same validation set so their curves compare directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.checkpoint.model_spec import read_model_spec
from fedllm.errors import FedllmError
from fedllm.jobs.compression import apply_compression
from fedllm.jobs.exchange import apply_exchange_settings, apply_tensor_items, recipe_kwargs, wire_compression
from fedllm.jobs.template import JobTemplate, Mode


class JobSpecError(FedllmError):
    """A job cannot be created as asked; the message names the option and the fix."""


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
) -> JobSpec:
    """Apply the mode's rules to the template defaults and the caller's options.

    `site_overrides` sets trainer arguments for single sites, e.g. {"site-3": {"devices": 2, "model": ...}}
    for a site that trains a TP-2 copy of the model on its GPU pair (its torchrun starts that many processes).
    """
    d = template.defaults
    if mode == "fedavg":
        n, r, e = num_clients or d.num_clients, rounds or d.rounds, local_epochs or d.local_epochs
    else:
        if rounds not in (None, 1):
            raise JobSpecError(
                f"--rounds {rounds} does not apply to --mode {mode}: it trains 1 round × --local-epochs; "
                "drop --rounds or use --mode fedavg"
            )
        # Same number of passes over the data as the template's FedAvg run (R rounds × 1 epoch).
        n = 1 if mode == "central" else (num_clients or d.num_clients)
        r, e = 1, local_epochs or d.rounds * d.local_epochs
        if mode == "central" and num_clients not in (None, 1):
            raise JobSpecError("--mode central trains on one site (the combined data); drop --num-clients")
    dev = devices or d.devices
    if dev > 1 and template.launch != "torchrun":
        raise JobSpecError(
            f"--devices {dev}: template {template.name} trains in the site's job process on one device, so the "
            "other devices would sit idle; use --devices 1, or a template that runs one process per device "
            "(launch: torchrun: hf-sft, hf-lora, nemo-*)"
        )

    args: dict[str, Any] = {**template.train_args, **(extra_args or {}), "epochs": e, "devices": dev}
    if model:
        args["model"] = model
    if validation:
        args["val"] = validation
    if "rounds" in template.train_args:
        args["rounds"] = r
    site_args: dict[str, dict[str, Any]] = {}
    data = list(data or [])
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
    if template.launch == "torchrun":
        _check_local_checkpoint(args, dev)
        for overrides in site_args.values():
            if "devices" in overrides or "model" in overrides:
                _check_local_checkpoint({**args, **overrides}, int(overrides.get("devices", dev)))
    job_name = name or f"{template.name}-{mode}-{n}sites"
    return JobSpec(template, mode, job_name, n, r, e, dev, args, site_args, compression)


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


def cli_args(args: dict[str, Any]) -> str:
    """Render trainer arguments as NVFlare's script_args (which it splits on whitespace)."""
    parts: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
            continue
        text = str(value)
        if not text or any(c.isspace() for c in text) or text[0] in "'\"":
            raise JobSpecError(
                f"argument {flag} {text!r} is empty, quoted or contains whitespace; NVFlare passes script "
                "arguments split on whitespace, so use paths and values without spaces"
            )
        parts += [flag, text]
    return " ".join(parts)


REQUIRED_MODEL = "set-by---model"  # a template's placeholder: `fedllm job create --model` must be given


def _initial_args(spec: JobSpec) -> dict[str, Any]:
    """The server model's arguments; a `model` argument follows --model (LoRA/SFT build it from the same model)."""
    args = dict(spec.template.initial_model.args)
    if "model" in args and "model" in spec.train_args:
        args["model"] = spec.train_args["model"]
    if REQUIRED_MODEL in (args.get("model"), spec.train_args.get("model")):
        raise JobSpecError(f"template {spec.template.name} needs the base model: pass --model PATH_OR_ID")
    # NeMo templates name the checkpoint inside other arguments, e.g. "{model}".
    model = str(spec.train_args.get("model", ""))
    return {k: v.replace("{model}", model) if isinstance(v, str) else v for k, v in args.items()}


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


def create_job(spec: JobSpec, out_dir: Path) -> Path:
    """Export `spec` as an NVFlare job folder under `out_dir`; returns the job's directory."""
    from nvflare.recipe.utils import add_experiment_tracking, add_final_global_evaluation, set_per_site_config

    from fedllm.jobs.recipe import FedllmFedAvgRecipe

    out_dir = out_dir.resolve()
    job_dir = out_dir / spec.name
    with tempfile.TemporaryDirectory(prefix="fedllm-job-") as tmp, _working_dir(Path(tmp)):
        # The recipe records the script path as given: relative, so sites find it in the job's custom dir.
        Path(ENTRY_NAME).write_text(ENTRY_SCRIPT.format(module=spec.template.trainer))
        initial = spec.template.initial_model
        torchrun = spec.template.launch == "torchrun"
        recipe = FedllmFedAvgRecipe(
            name=spec.name,
            model={"class_path": initial.class_path, "args": _initial_args(spec)} if initial else None,
            min_clients=spec.num_clients,
            num_rounds=spec.rounds,
            train_script=ENTRY_NAME,
            train_args=cli_args(spec.train_args),
            key_metric=spec.template.key_metric,
            # Losses are better when lower; NVFlare's model selector assumes higher is better unless told.
            key_metric_mode="min" if "loss" in spec.template.key_metric else "max",
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
        # Sites stream their job logs to the server, so `fedllm job submit` can show a failing site's error.
        recipe.enable_log_streaming("log.txt")
        staging = Path(tmp) / "export"
        recipe.export(str(staging))
        # NVFlare's Job API copies the source of components from packages it finds outside site-packages
        # (an editable install) into the job. fedllm is installed on every participant: drop the copies,
        # so a job carries only its entry script and runs the reviewed install.
        for copied in (staging / spec.name).glob("*/custom/fedllm"):
            shutil.rmtree(copied)
        out_dir.mkdir(parents=True, exist_ok=True)
        _adopt_owner(staging / spec.name, out_dir)
        if job_dir.exists():
            shutil.rmtree(job_dir)
        shutil.move(str(staging / spec.name), job_dir)
    return job_dir


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
