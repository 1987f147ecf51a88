"""A site's transformers Trainer driven by NVFlare's Hugging Face integration (`nvflare.client.hf`).

Every rank of the site runs the same few lines (torchrun starts one process per GPU, or per CPU
"device" with gloo):

    flare.init(rank) → build the Trainer → flare.patch(trainer, local_steps=…, restore_state=True, stream_metrics=True)
    while flare.is_running():
        trainer.evaluate(metric_key_prefix="global_val")   # the global model the site received
        trainer.train()                                       # one round (a continuation's first: resumed)

NVFlare's patch receives the global weights on rank 0 and broadcasts them to the other ranks, loads
them into the model (PEFT adapter only for LoRA), runs the round's optimizer steps under DDP
(each rank on its own shard of the data), sends rank 0's weights (DDP keeps the ranks identical),
answers the server's evaluation task (the final global model) and streams the Trainer's logs to
the server's TensorBoard. Between rounds it resumes the optimizer and LR schedule
(fedllm.training.hf.trainer_options says what that means); fedllm keeps the checkpoints it resumes
from per job lineage, so a continuation job after a restart resumes them too (`run_federated`).

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
from fedllm.training.hf.trainer_options import warmup_steps
from fedllm.training.lineage import LineageState, RoundContext, state_root


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
    callback = TensorBoardCallback(tb_writer=SummaryWriter(str(log_dir)))
    # The callback closes its writer at the end of each train() (a round) and opens a new one at the next
    # log, in its logging_dir: by default <output_dir>/runs/<time> (the lineage's trainer state, not here).
    callback.logging_dir = str(log_dir)
    return callback


BuildTrainer = Callable[[argparse.Namespace, list, list, Path, list], Any]


def received_round(flare, job_id: str) -> tuple[bool, RoundContext] | None:
    """Rank 0: (is it a train task, where it stands in its lineage) of the task the site holds now; None: job over.

    The Client API keeps a received task until it is answered (is_running() has fetched it): NVFlare's
    patch, called next, receives this same task.
    """
    model = flare.receive()
    if model is None:
        return None
    return bool(flare.is_train()), RoundContext.of_task(model, job_id)


def round_snapshots(state: LineageState, rank: int):
    """A TrainerCallback marking the Trainer's end-of-round checkpoint as its round's snapshot (fedllm.training.lineage).

    NVFlare's patch saves checkpoint-<step> at the end of every round (restore_state=True); every rank has
    written its part (RNG state) when the barrier passes, then rank 0 fsyncs the folder and writes the marker.
    """
    from transformers import TrainerCallback

    class RoundSnapshots(TrainerCallback):
        context: RoundContext | None = None  # the round being trained

        def on_save(self, args, train_state, control, **kwargs):
            if dist.is_initialized():
                dist.barrier()
            if rank == 0 and self.context is not None:
                state.mark(Path(args.output_dir) / f"checkpoint-{train_state.global_step}", self.context.round)
            return control

    return RoundSnapshots()


def run_federated(
    args: argparse.Namespace,
    read_data: Callable[[str], tuple[list, list]],
    build_trainer: BuildTrainer,
    log: Callable[[str], None] = print,
    lora_rank: int | None = None,
) -> None:
    """The site's job: one patched Trainer for all rounds, on every rank, its state kept per job lineage.

    The Trainer's checkpoints (NVFlare's end-of-round checkpoint: weights, AdamW moments, scheduler,
    RNG, trainer state) go to <site workspace>/fedllm-state/<lineage>/ (or --output-dir/<lineage>/),
    not to the job's folder, so that a continuation job finds them: its first round resumes from the
    checkpoint of the round before, where the uninterrupted run resumes in memory from the same file.

    `lora_rank` (LoRA only: the site's own rank) lets the site train below the global adapter's rank
    (fedllm.training.hf.hetlora): rank 0's Client API truncates what it receives and zero-pads what it sends.
    """
    import nvflare.client.hf as flare

    from fedllm.training.hf.hetlora import RankAdaptingClientAPI
    from fedllm.training.hf.sft import steps_per_round

    rank, world_size = init_ranks()
    context = flare.init(rank=rank)
    site, job_id = broadcast_from_rank0((flare.get_site_name(), flare.get_job_id() or "") if rank == 0 else None)
    if lora_rank is not None:
        # Every Client API call, NVFlare's patch's included, goes through the context's api.
        context.api = RankAdaptingClientAPI(context.api, lora_rank, site, log)
    first = broadcast_from_rank0(received_round(flare, job_id) if rank == 0 else None)
    if first is None:
        return  # the job ended before it sent this site a task
    lineage = first[1]
    root = Path(args.output_dir) if args.output_dir else state_root(job_folder(site, job_id))
    state = LineageState(root, lineage.lineage)
    train, val = read_data(site)
    trainer = build_trainer(args, train, val, state.folder, [])
    private = hasattr(trainer, "dp_settle_round")  # record-level DP (fedllm.training.hf.dp_trainer)
    if private:
        from fedllm.training.hf.dp_trainer import DPReportingClientAPI

        context.api = DPReportingClientAPI(context.api, trainer, lambda m: log(f"[{site}] {m}"))
    steps = steps_per_round(trainer, args.epochs)
    # The schedule spans the lineage's rounds (NVFlare's patch sets max_steps = steps × total_rounds).
    trainer.args.warmup_steps = warmup_steps(args.warmup_ratio, steps * lineage.total_rounds)
    trainer.add_callback(round_end_evaluation(steps))
    snapshots = round_snapshots(state, rank)
    trainer.add_callback(snapshots)
    if rank == 0:
        trainer.add_callback(site_tensorboard(tensorboard_dir(args.tb_dir, site, job_id)))
    if private:
        log(
            f"[{site}] DP-SGD: {steps} Poisson steps per round (sample rate {trainer.dp.sample_rate:g}: expected batch "
            f"{trainer.dp_expected_batch} of {len(trainer.train_dataset)} examples; --batch-size {args.batch_size} and "
            f"--grad-accum {args.grad_accum} do not apply), noise σ={trainer.dp.noise_multiplier:g}, clip "
            f"{trainer.dp.max_grad_norm:g}; ε spent so far {trainer.dp_budget.ledger.epsilon(trainer.dp.delta):.4g}"
        )
    else:
        batches = len(trainer.get_train_dataloader())
        log(
            f"[{site}] rank {rank}/{world_size}: {batches} batches of {args.batch_size} per epoch "
            f"(this rank's shard of {len(trainer.train_dataset)} examples), {steps} optimizer steps per round"
        )
    flare.patch(trainer, restore_state=True, local_steps=steps, stream_metrics=True)
    trained: RoundContext | None = None  # the last round this process trained
    while flare.is_running():
        task = broadcast_from_rank0(received_round(flare, job_id) if rank == 0 else None)
        training = task is not None and task[0]
        resume = None
        if training:
            context = task[1]
            if trained is None and context.round > 0:  # a continuation: the state at the end of the round before
                resume = broadcast_from_rank0(
                    _continuation_checkpoint(state, context, site, log) if rank == 0 else None
                )
            elif rank == 0:
                state.begin_round(context.round)
            snapshots.context = context
            if private:
                trainer.dp_round = context.round
        trainer.evaluate(metric_key_prefix="global_val")
        trainer.train(**({"resume_from_checkpoint": str(resume)} if resume is not None else {}))
        if training:
            trained = task[1]
            if rank == 0 and trained.is_last:
                state.after_last_round(trained.round)
        elif task is not None and trained is not None and trained.is_last and rank == 0:
            # The final global model's evaluation: sent once every server checkpoint is on disk, no round is redone.
            state.finish()
    if dist.is_initialized():
        dist.barrier()


def _continuation_checkpoint(state: LineageState, context: RoundContext, site: str, log: Callable[[str], None]):
    state.begin_round(context.round)
    snapshot = state.snapshot(context.round - 1)
    if snapshot is None:
        log(
            f"[{site}] no trainer state of round {context.round - 1} in {state.folder}: round {context.round} "
            "starts a fresh optimizer and LR schedule (the uninterrupted run would not)"
        )
    else:
        log(f"[{site}] round {context.round} goes on from the trainer state in {snapshot}")
    return snapshot
