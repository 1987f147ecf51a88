"""Command-line arguments shared by the NeMo site trainers, and the checks that run before NeMo loads.

The checks (checkpoint exists, TP = the site's GPUs = torchrun's processes, NeMo version) run before
NeMo loads the model, so a misconfigured site fails in seconds with a message naming the file, field
and fix, instead of after minutes of model loading. They run once the Client API session is up (in
the task builder), so NVFlare reports the failure to the server and the job ends at once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from fedllm.checkpoint.model_spec import ModelSpec, read_model_spec
from fedllm.data.io import DataError
from fedllm.training.core import resolve_path, run_site
from fedllm.training.distributed import run_distributed_site, world
from fedllm.training.nemo.compat import require_nemo_nlp
from fedllm.training.nemo.config import OptimSettings, TrainerSettings
from fedllm.training.nemo.errors import NemoLaunchError


def base_parser(description: str, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="the base Megatron-GPT .nemo on this site ({data_dir}, {site})")
    p.add_argument("--train", required=True, help="training JSONL, or several joined with ','")
    p.add_argument("--val", required=True, help="validation JSONL (the same for every site)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per FL round")
    p.add_argument("--devices", type=int, default=1, help="GPUs (= torchrun processes = tensor parallel) per site")
    p.add_argument("--rounds", type=int, default=1, help="FL rounds of the job (SFT sizes its data by steps)")
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--precision", default="bf16-mixed", help="bf16-mixed (Ampere+) or 16-mixed")
    p.add_argument("--max-seq-length", type=int, default=1024)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tb-dir", default=None, help="TensorBoard dir (default: tb/<site> in the job workspace)")
    return p


def site_name() -> str:
    """The site's name on ranks that have no Client API session (the kit's environment sets it)."""
    return os.environ.get("FEDLLM_SITE_NAME", "site")


def files(arg: str, site: str) -> list[str]:
    paths = [resolve_path(p, site) for p in arg.split(",") if p]
    for path in paths:
        if not path.is_file():
            raise DataError(
                f"data file {path} not found (site data dir: {os.environ.get('FEDLLM_DATA_DIR', 'unset')}). "
                "Fix: write the site's data there (fedllm data tools) or pass --data/--validation to `fedllm job create`"
            )
    return [str(p) for p in paths]


def preflight(args: argparse.Namespace, site: str) -> ModelSpec:
    """Fail fast and clearly: checkpoint, TP vs GPUs vs processes, NeMo version."""
    spec, distributed = read_model_spec(resolve_path(args.model, site))
    spec.check_fits_site(args.devices, distributed=distributed)
    _, world_size = world()
    if world_size != args.devices:
        raise NemoLaunchError(
            f"{world_size} trainer process(es) run for --devices {args.devices}. Fix: the job must launch the "
            f"trainer with `torchrun --nproc_per_node {args.devices}` (fedllm job create does for NeMo templates)"
        )
    require_nemo_nlp()
    return spec


def trainer_settings(args: argparse.Namespace, max_steps: int = -1) -> TrainerSettings:
    return TrainerSettings(devices=args.devices, precision=args.precision, max_epochs=args.epochs, max_steps=max_steps)


def optim_settings(args: argparse.Namespace) -> OptimSettings:
    return OptimSettings(lr=args.lr)


def output_dir() -> Path:
    """The job workspace of this site (NVFlare runs the trainer there); results travel with the job."""
    return Path.cwd()


def validation_metrics(trainer: Any, model: Any, last_steps: int) -> dict[str, float]:
    """val_loss from NeMo's validation, plus this round's steps and the GPU memory peak (for the GPU proof)."""
    results = trainer.validate(model, verbose=False)
    metrics = {"val_loss": float(results[0]["val_loss"])} if results else {}
    metrics["train_steps"] = float(last_steps)
    if torch.cuda.is_available():
        metrics["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def run_nemo_site(task_class, args: argparse.Namespace, **exchange) -> None:
    """Run a NeMo trainer's rounds on every rank of this site (rank 0 talks to NVFlare).

    `task_class(args, site, model_spec)` is built after the checkpoint preflight; `exchange` are
    run_distributed_site's options for how the exchanged state is split across ranks.
    """
    run_distributed_site(
        lambda site: task_class(args, site, preflight(args, site)),
        run_site,
        site=site_name(),
        epochs=args.epochs,
        seed=args.seed,
        tb_dir=args.tb_dir,
        **exchange,
    )
