"""Megatron-GPT supervised fine-tuning on a site with NeMo (the seeds' 1.3B / 5B SFT), FedAvg on all weights.

NeMo's MegatronGPTSFTModel trains every weight on JSONL records {"input", "output"} (loss on the
output). Each round the site trains `--epochs` over its data and sends its full weights (float32,
keyed as the .nemo stores them: `mp_rank_XX/<key>` per tensor-parallel shard when TP > 1); NVFlare
streams messages of that size. The server's global model is fedllm.flare.server_models.
NemoCheckpointWeights (the same base checkpoint, read with torch alone).

NeMo sizes the SFT dataset by optimizer steps, so the trainer converts epochs into steps from the
number of records and sizes the data for all `--rounds` at once; each round stops after its steps, and
the next starts at the sample where it stopped (NeMo's loader would start at sample 0 on every fit()).
Adam's moments and the LR schedule go on across rounds and into a continuation job
(fedllm.training.nemo.trainer_state).

    torchrun --nproc_per_node 1 fedllm_site_entry.py --model /data/gpt1.3b.nemo \\
        --train {data_dir}/training.jsonl --val {data_dir}/validation.jsonl --epochs 1 --rounds 5 --devices 1
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.flare.server_models import shard_key, split_shard_key
from fedllm.training.core import TrainOutcome, resolve_path
from fedllm.training.distributed import world
from fedllm.training.lineage import RoundContext
from fedllm.training.nemo.config import SftSettings, sft_config
from fedllm.training.nemo.errors import NemoLaunchError
from fedllm.training.nemo.site import (
    base_parser,
    build_trainer,
    count_records,
    fit_round,
    run_nemo_site,
    shared_settings,
    steps_per_epoch,
    trainer_settings,
    validation_metrics,
)
from fedllm.training.nemo.trainer_state import begin_round, round_state
from fedllm.training.nemo.weights import load_weights, model_weights


def shard_for_rank(state: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The part of the global state TP rank `rank` holds (keys without the mp_rank_XX/ prefix)."""
    return {inner: v for key, v in state.items() for r, inner in [split_shard_key(key)] if r == rank}


def merge_shards(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v for s in states for k, v in s.items()}


class NemoSftTask:
    """A SiteTask around NeMo's MegatronGPTSFTModel restored from the base .nemo (NeMo imported here, on the site)."""

    def __init__(self, args: argparse.Namespace, site: str, info: ModelSpec):
        from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
        from omegaconf import OmegaConf

        shared = shared_settings(args, site, info)
        records = count_records(shared["train_files"])
        self.steps_per_round = args.epochs * steps_per_epoch(records, args.global_batch_size)
        self.rank = world()[0]
        self.tensor_parallel = info.tensor_parallel
        settings = SftSettings(
            **shared,
            # The dataset is sized for the whole job; each round stops after steps_per_round (below).
            trainer=trainer_settings(args, max_steps=self.steps_per_round * args.rounds),
        )
        cfg = OmegaConf.create(sft_config(settings))
        self.trainer = build_trainer(cfg, info.tensor_parallel, builder="MegatronLMPPTrainerBuilder")
        path = str(resolve_path(args.model, site))
        model_cfg = MegatronGPTSFTModel.merge_cfg_with(path, cfg)
        self.model = MegatronGPTSFTModel.restore_from(path, model_cfg, trainer=self.trainer)
        self.rounds = args.rounds
        samples_per_round = self.steps_per_round * args.global_batch_size

        def place_data(module: Any, round_: int, epoch: int) -> None:
            # Megatron's batch sampler reads consumed_samples when a fit() starts drawing from it.
            module._train_dl.batch_sampler.consumed_samples = round_ * samples_per_round

        self.state = round_state(self.steps_per_round, place_data)
        self.trainer.callbacks.append(self.state)
        self.round = 0
        self.last_steps = 0

    def begin_round(self, context: RoundContext, snapshot: Path | None) -> None:
        if context.total_rounds != self.rounds:
            raise NemoLaunchError(
                f"--rounds {self.rounds} sized this site's SFT data, but the job runs {context.total_rounds} rounds. "
                "Fix: create the job with fedllm job create (it passes the job's rounds as --rounds)"
            )
        begin_round(self.trainer, self.state, context, snapshot, self.rank)
        self.round = context.round

    def save_round_state(self, folder: Path) -> None:
        self.state.save(folder, self.rank)

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None:
        load_weights(
            self.model,
            state,
            f"TP rank {self.rank}: the server's weights do not match the local model",
            "server and sites must use the same base .nemo checkpoint",
        )

    def exchanged_state(self) -> dict[str, torch.Tensor]:
        return {shard_key(self.rank, k, self.tensor_parallel): v for k, v in model_weights(self.model).items()}

    def train(self, epochs: int, seed: int) -> TrainOutcome:
        self.state.start_round(self.trainer, self.round, seed)
        outcome = fit_round(self.trainer, self.model, self.state)
        self.last_steps = outcome.steps
        return outcome

    def evaluate(self) -> dict[str, float]:
        return validation_metrics(self.trainer, self.model, self.last_steps)


def argument_parser() -> argparse.ArgumentParser:
    """The trainer's arguments (`fedllm job create` checks a job's against them, without NeMo)."""
    p = base_parser(__doc__.splitlines()[0], lr=5e-6)
    p.set_defaults(micro_batch_size=1, max_seq_length=2048)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_nemo_site(NemoSftTask, parse_args(argv), shard=shard_for_rank, merge=merge_shards, gather=True)
