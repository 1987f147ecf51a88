"""Command-line arguments shared by the NeMo site trainers, and the checks that run before NeMo loads.

The checks (checkpoint exists, TP = the site's GPUs = torchrun's processes, NeMo version) run before
NeMo loads the model, so a misconfigured site fails in seconds with a message naming the file, field
and fix, instead of after minutes of model loading. They run once the Client API session is up (in
the task builder), so NVFlare reports the failure to the server and the job ends at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

import torch

from fedllm.checkpoint.model_spec import ModelSpec, read_model_spec
from fedllm.checkpoint.verify import check_integrity
from fedllm.data.io import DataError
from fedllm.training.core import TrainOutcome, resolve_path, run_site
from fedllm.training.distributed import run_distributed_site, site_name, world
from fedllm.training.nemo import cpu_layer
from fedllm.training.nemo.compat import apply_nemo_fixes, require_nemo_nlp
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
    model = resolve_path(args.model, site)
    spec = read_model_spec(model)
    spec.check_fits_site(args.devices)
    rank, world_size = world()
    check_integrity(model, tp_rank=rank)  # NeMo's torch.load checks no CRC: the shard this process restores
    if world_size != args.devices:
        raise NemoLaunchError(
            f"{world_size} trainer process(es) run for --devices {args.devices}. Fix: the job must launch the "
            f"trainer with `torchrun --nproc_per_node {args.devices}` (fedllm job create does for NeMo templates)"
        )
    start_nemo()
    return spec


def start_nemo(log=print) -> dict[str, str]:
    """Import NeMo's Megatron-GPT models and repair them: the fixes this NeMo needs, and without a GPU the CPU layer.

    Every process of a site calls it before it builds a model (torchrun ranks included); the site log
    says what was applied, so a run on a GPU shows that the CPU layer stayed off.
    """
    require_nemo_nlp()
    importlib.import_module("nemo.collections.nlp.models.language_modeling.megatron_gpt_prompt_learning_model")
    importlib.import_module("nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model")
    fixes = apply_nemo_fixes()
    cpu = cpu_layer.activate()
    if world()[0] == 0:
        log(f"[fedllm] NeMo fixes applied: {', '.join(sorted(fixes)) or 'none needed'}")
        log(f"[fedllm] CPU layer: {'on (no CUDA device): ' + ', '.join(sorted(cpu)) if cpu else 'off'}")
    return {**fixes, **cpu}


def machine_trainer_settings(
    devices: int, precision: str | int, max_steps: int = -1, max_epochs: int = 1
) -> TrainerSettings:
    """On a GPU the given precision; on a CPU fp32 (CPU autocast of Megatron's kernels is not what GPUs run)."""
    gpu = torch.cuda.is_available()
    return TrainerSettings(
        devices=devices,
        accelerator="gpu" if gpu else "cpu",
        precision=precision if gpu else 32,
        max_epochs=max_epochs,
        max_steps=max_steps,
    )


def trainer_settings(args: argparse.Namespace, max_steps: int = -1) -> TrainerSettings:
    # A step budget (p-tuning, SFT) decides when a round ends; the epoch count is then unbounded.
    return machine_trainer_settings(
        args.devices, args.precision, max_steps, max_epochs=-1 if max_steps > 0 else args.epochs
    )


def optim_settings(args: argparse.Namespace) -> OptimSettings:
    return OptimSettings(lr=args.lr)


def shared_settings(args: argparse.Namespace, site: str, info: ModelSpec) -> dict[str, Any]:
    """What every NeMo workload's settings take straight from base_parser's arguments and the checkpoint."""
    return {
        "train_files": files(args.train, site),
        "validation_files": files(args.val, site),
        "tensor_parallel": info.tensor_parallel,
        "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size,
        "max_seq_length": args.max_seq_length,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "optim": optim_settings(args),
    }


def output_dir() -> Path:
    """The job workspace of this site (NVFlare runs the trainer there); results travel with the job."""
    return Path.cwd()


def count_records(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            total += sum(1 for line in fh if line.strip())
    return total


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
    """Optimizer steps of one pass over the records (Megatron's samplers drop the last partial batch)."""
    if num_records < global_batch_size:
        raise DataError(
            f"{num_records} training records are fewer than one global batch ({global_batch_size}). Fix: lower "
            "the global batch size in the job (fedllm job create ... -a global_batch_size=N) or add data"
        )
    return num_records // global_batch_size


def build_trainer(cfg: Any, tensor_parallel: int, builder: str = "MegatronTrainerBuilder") -> Any:
    """NeMo's own Megatron trainer for `cfg` (gloo on CPU, NCCL on GPUs).

    With tensor parallelism it also fills NeMo's AppState with this process's model-parallel rank, as
    NeMo's own scripts do before they restore a model-parallel .nemo, so each rank loads its own shard.
    """
    from nemo.collections.nlp.parts import megatron_trainer_builder

    trainer = getattr(megatron_trainer_builder, builder)(cfg).create_trainer()
    if tensor_parallel > 1:
        from nemo.collections.nlp.modules.common.megatron.megatron_init import fake_initialize_model_parallel
        from nemo.utils import AppState

        app = AppState()
        app.model_parallel_size = app.tensor_model_parallel_size = tensor_parallel
        app.pipeline_model_parallel_size = 1
        (
            app.tensor_model_parallel_rank,
            app.pipeline_model_parallel_rank,
            app.expert_model_parallel_rank,
            app.model_parallel_size,
            app.data_parallel_size,
            app.pipeline_model_parallel_split_rank,
            app.virtual_pipeline_model_parallel_rank,
        ) = fake_initialize_model_parallel(
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            tensor_model_parallel_size_=tensor_parallel,
            pipeline_model_parallel_size_=1,
        )
    return trainer


def fit_round(trainer: Any, model: Any, state: Any) -> TrainOutcome:
    """One round of Lightning's fit, from where the last round stopped to the end `state` (RoundState) set."""
    start = trainer.global_step
    if trainer.max_steps < state.round_end:  # no begin_round (a trainer driven without run_site): one round's budget
        trainer.fit_loop.epoch_loop.max_steps = state.round_end
    trainer.fit(model)
    loss = trainer.callback_metrics.get("reduced_train_loss", torch.tensor(float("nan")))
    return TrainOutcome(steps=trainer.global_step - start, train_loss=float(loss), metrics=state.round_metrics())


def validation_metrics(trainer: Any, model: Any, last_steps: int) -> dict[str, float]:
    """val_loss from NeMo's validation, plus this round's steps and the GPU memory peak (for the GPU proof)."""
    results = trainer.validate(model, verbose=False)
    metrics = {"val_loss": float(results[0]["val_loss"])} if results else {}
    metrics["train_steps"] = float(last_steps)
    metrics["ranks"] = float(world()[1])  # processes the site's model spans (its tensor parallelism)
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
