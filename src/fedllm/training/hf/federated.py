"""A site's transformers Trainer driven by NVFlare's Hugging Face integration (`nvflare.client.hf`).

Every rank of the site runs the same few lines (torchrun starts one process per GPU, or per CPU
"device" with gloo):

    flare.init(rank) → build the Trainer → flare.patch(trainer, local_steps=…, restore_state=True, stream_metrics=True)
    while flare.is_running():
        trainer.evaluate(metric_key_prefix="global_val")   # the global model the site received
        trainer.train()                                       # one round

NVFlare's patch receives the global weights on rank 0 and broadcasts them to the other ranks, loads
them into the model (PEFT adapter only for LoRA), runs the round's optimizer steps under DDP
(each rank on its own shard of the data), sends rank 0's weights (DDP keeps the ranks identical),
answers the server's evaluation task (the final global model) and streams the Trainer's logs to
the server's TensorBoard. Between rounds it resumes the optimizer and LR schedule
(fedllm.training.hf.trainer_options says what that means).

Where NVFlare's integration differs from fedllm's own loop (fedllm.training.core), which p-tuning and
the NeMo and toy trainers keep:
- FLModel.metrics carries the evaluation before training only, named global_val_* here: what
  NVFlare's model selector needs (the received model's). The evaluation after the round (val_*,
  from `RoundEndEvaluation`), the training loss, LR and gradient norm reach the server through
  NVFlare's experiment tracking instead, and `fedllm report` reads them from there.
- FedAvg's weight (NUM_STEPS_CURRENT_ROUND) is optimizer steps × per-device batch × accumulation ×
  ranks, i.e. examples seen, where fedllm's loop sends optimizer steps; with equal batch settings
  across sites both weigh a site by its data.
- No bytes_sent / round_seconds metrics; the Trainer's own runtime and samples/s are streamed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fedllm.training.core import job_folder, tensorboard_dir
from fedllm.training.distributed import broadcast_from_rank0, world


def init_ranks() -> tuple[int, int]:
    """(rank, world size); under torchrun the process group is set up first (gloo on CPU, nccl on GPUs).

    NVFlare's patch needs torch.distributed initialised before it is applied, and rank 0 has to
    tell the others where the job's folders are before any Trainer exists.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world()


def round_end_evaluation(steps: int):
    """A TrainerCallback that evaluates (val_*) at the last optimizer step of every round."""
    from transformers import TrainerCallback

    class RoundEndEvaluation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps == 0:
                control.should_evaluate = True
            return control

    return RoundEndEvaluation()


def site_tensorboard(log_dir: Path):
    """transformers' TensorBoard callback writing into the site's own job folder (rank 0 only)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    log_dir.mkdir(parents=True, exist_ok=True)
    return TensorBoardCallback(tb_writer=SummaryWriter(str(log_dir)))


BuildTrainer = Callable[[argparse.Namespace, list, list, Path, list], Any]


def run_federated(
    args: argparse.Namespace,
    read_data: Callable[[str], tuple[list, list]],
    build_trainer: BuildTrainer,
    log: Callable[[str], None] = print,
) -> None:
    """The site's job: one patched Trainer for all rounds, on every rank."""
    import nvflare.client.hf as flare

    from fedllm.training.hf.sft import steps_per_round

    rank, world_size = init_ranks()
    flare.init(rank=rank)
    site, job_id = broadcast_from_rank0((flare.get_site_name(), flare.get_job_id() or "") if rank == 0 else None)
    train, val = read_data(site)
    output_dir = Path(args.output_dir) if args.output_dir else job_folder(site, job_id) / "trainer"
    output_dir = Path(broadcast_from_rank0(str(output_dir)))
    trainer = build_trainer(args, train, val, output_dir, [])
    steps = steps_per_round(trainer, args.epochs)
    trainer.add_callback(round_end_evaluation(steps))
    if rank == 0:
        trainer.add_callback(site_tensorboard(tensorboard_dir(args.tb_dir, site, job_id)))
    batches = len(trainer.get_train_dataloader())
    log(
        f"[{site}] rank {rank}/{world_size}: {batches} batches of {args.batch_size} per epoch "
        f"(this rank's shard of {len(trainer.train_dataset)} examples), {steps} optimizer steps per round"
    )
    flare.patch(trainer, restore_state=True, local_steps=steps, stream_metrics=True)
    while flare.is_running():
        trainer.evaluate(metric_key_prefix="global_val")
        trainer.train()
    if dist.is_initialized():
        dist.barrier()
