"""The NeMo configs fedllm's sites train with, built from a job's arguments (one place, plain dicts).

NeMo's Megatron scripts take a Hydra YAML (`trainer:` + `model:`); its wheels do not ship those
YAMLs, so fedllm builds the config itself from the seeds' settings. Every key set here is one the
pinned NeMo model classes read (checked by tests/training/nemo/test_config.py against NeMo's source),
and CI trains with these configs for real (on CPU, tests/training/nemo/), so a typo, a key NeMo dropped
or a value it refuses fails in CI, not on a GPU.

p-tuning (the seeds' prompt learning): MegatronGPTPromptLearningModel keeps the GPT frozen
(`language_model_path`) and trains a prompt encoder that emits 10 virtual tokens in front of each
sentence; the loss covers only the answer ("sentiment:{label}").
SFT: MegatronGPTSFTModel fine-tunes all weights on JSONL records {"input": ..., "output": ...}; its
config is the checkpoint's model_config.yaml with these keys merged over it (NeMo's merge_cfg_with).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

# The seeds' task: Financial PhraseBank sentiment, one virtual prompt of 10 tokens.
PTUNING_TASK = "sentiment"
PTUNING_TEMPLATE = "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
VIRTUAL_TOKENS = 10
# NeMo's default prompt encoder is "tpmlp" (sharded across TP ranks). fedllm uses "mlp", as the seeds
# do: the encoder is then replicated on every TP rank, rank 0 holds all of it, and the server can keep
# the global copy as a plain module (fedllm.flare.server_models.PromptEncoderWeights).
PROMPT_ENCODER_TYPE = "mlp"
PROMPT_ENCODER_LAYERS = 2
SFT_TEMPLATE = "{input} {output}"


@dataclass(frozen=True)
class TrainerSettings:
    """What the Lightning trainer of one site process needs."""

    devices: int = 1
    # "gpu" on a GPU site; "cpu" where torch sees no CUDA device (CI, with fedllm.training.nemo.cpu_layer).
    accelerator: str = "gpu"
    # bf16 needs Ampere or later (the seeds ran on A100); "16-mixed" for older GPUs; 32 on CPU.
    precision: str | int = "bf16-mixed"
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: float = 1.0
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10


def optimizer_name() -> str:
    """apex's fused Adam where apex is installed (NVIDIA's containers), NeMo's plain Adam otherwise (same rule)."""
    return "fused_adam" if importlib.util.find_spec("apex") is not None else "adam"


@dataclass(frozen=True)
class OptimSettings:
    name: str = field(default_factory=optimizer_name)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass(frozen=True)
class PtuningSettings:
    language_model_path: str
    train_files: list[str]
    validation_files: list[str]
    nemo_path: str
    tensor_parallel: int = 1
    global_batch_size: int = 8
    micro_batch_size: int = 4
    # The seeds' p-tuning encoder: 2-layer MLP, hidden 2048, 10 virtual tokens.
    encoder_hidden: int = 2048
    virtual_tokens: int = VIRTUAL_TOKENS
    max_seq_length: int = 1024
    num_workers: int = 2
    seed: int = 1234
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)


@dataclass(frozen=True)
class SftSettings:
    train_files: list[str]
    validation_files: list[str]
    tensor_parallel: int = 1
    global_batch_size: int = 8
    micro_batch_size: int = 1
    max_seq_length: int = 2048
    num_workers: int = 2
    seed: int = 1234
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-6))


def trainer_config(t: TrainerSettings) -> dict[str, Any]:
    """pytorch-lightning Trainer kwargs (NeMo's MegatronTrainerBuilder passes them through)."""
    return {
        "devices": t.devices,
        "num_nodes": 1,
        "accelerator": t.accelerator,
        # Sites log per round (fedllm.training.core); a per-step bar only floods the site's log.
        "enable_progress_bar": False,
        "precision": t.precision,
        # fedllm logs metrics itself (TensorBoard per site, metrics to the server) and exchanges weights
        # through NVFlare, so Lightning writes neither logs nor checkpoints.
        "logger": False,
        "enable_checkpointing": False,
        "use_distributed_sampler": False,  # Megatron builds its own data-parallel samplers
        "max_epochs": t.max_epochs,
        "max_steps": t.max_steps,
        "log_every_n_steps": t.log_every_n_steps,
        "num_sanity_val_steps": 0,  # fedllm validates the global model itself, before each round
        "val_check_interval": t.val_check_interval,
        "accumulate_grad_batches": 1,  # Megatron accumulates via global/micro batch size
        "gradient_clip_val": t.gradient_clip_val,
    }


def optim_config(o: OptimSettings) -> dict[str, Any]:
    return {
        "name": o.name,
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        "betas": list(o.betas),
        "sched": {"name": "CosineAnnealing", "warmup_steps": o.warmup_steps, "min_lr": o.min_lr},
    }


def ptuning_config(s: PtuningSettings) -> dict[str, Any]:
    """Config for MegatronGPTPromptLearningModel(cfg.model, trainer) with NeMo's trainer from cfg.trainer."""
    if s.global_batch_size % (s.micro_batch_size) != 0:
        raise ValueError(f"global_batch_size {s.global_batch_size} must be a multiple of micro_batch_size")
    return {
        "trainer": trainer_config(s.trainer),
        "model": {
            "seed": s.seed,
            "nemo_path": s.nemo_path,  # NeMo saves the p-tuned prompt here at the end of each fit()
            "virtual_prompt_style": "p-tuning",
            "tensor_model_parallel_size": s.tensor_parallel,
            "pipeline_model_parallel_size": 1,
            "global_batch_size": s.global_batch_size,
            "micro_batch_size": s.micro_batch_size,
            "validation_global_batch_size": s.global_batch_size,
            "validation_micro_batch_size": s.micro_batch_size,
            "validation_drop_last": False,
            "report_validation_metric": False,
            "language_model_path": s.language_model_path,
            "existing_tasks": [],
            "new_tasks": [PTUNING_TASK],
            "sequence_parallel": False,
            "gradient_as_bucket_view": True,  # NeMo's trainer builder requires it (DDP strategy)
            "task_templates": [
                {
                    "taskname": PTUNING_TASK,
                    "prompt_template": PTUNING_TEMPLATE,
                    "total_virtual_tokens": s.virtual_tokens,
                    "virtual_token_splits": [s.virtual_tokens],
                    "truncate_field": None,
                    # Loss on "sentiment:{label}"'s answer only, not on the sentence (NeMo's default is False).
                    "answer_only_loss": True,
                    "answer_field": "label",
                }
            ],
            "p_tuning": {
                "encoder_type": PROMPT_ENCODER_TYPE,
                "dropout": 0.0,
                "num_layers": PROMPT_ENCODER_LAYERS,
                "encoder_hidden": s.encoder_hidden,
                "init_std": 0.023,
            },
            "data": {
                "train_ds": list(s.train_files),
                "validation_ds": list(s.validation_files),
                "add_eos": True,
                "max_seq_length": s.max_seq_length,
                "min_seq_length": 1,
                "num_workers": s.num_workers,
                "load_cache": False,
            },
            "optim": optim_config(s.optim),
        },
    }


def _sft_dataset(files: list[str], s: SftSettings, train: bool) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "file_names": list(files),
        "global_batch_size": s.global_batch_size,
        "micro_batch_size": s.micro_batch_size,
        "num_workers": s.num_workers,
        "memmap_workers": 2,
        "pin_memory": True,
        "max_seq_length": s.max_seq_length,
        "min_seq_length": 1,
        "drop_last": train,
        # The seeds' records are {"input": instruction + context, "output": response}: the template names
        # both fields, label_key marks the answer (loss only on it, see answer_only_loss).
        "label_key": "output",
        "add_eos": True,
        "add_sep": False,
        "add_bos": False,
        "truncation_field": "input",
        "prompt_template": SFT_TEMPLATE,
        "index_mapping_dir": None,
    }
    if train:
        # One probability per file; NeMo blends the files in these proportions (equal here).
        ds["concat_sampling_probabilities"] = [1.0 / len(files)] * len(files)
    else:
        ds["metric"] = {"name": "loss", "average": None, "num_classes": None}
    return ds


def sft_config(s: SftSettings) -> dict[str, Any]:
    """Overrides merged over the checkpoint's model_config.yaml for MegatronGPTSFTModel.

    NeMo's SFT dataset is sized by trainer.max_steps (it must be > 0), so the trainer converts
    epochs into steps first (fedllm.training.nemo.site.steps_per_epoch).
    """
    if s.trainer.max_steps <= 0:
        raise ValueError(
            "SFT needs trainer.max_steps > 0 (NeMo sizes the SFT dataset by steps); count them with steps_per_epoch()"
        )
    return {
        "trainer": trainer_config(s.trainer),
        "model": {
            "seed": s.seed,
            "tensor_model_parallel_size": s.tensor_parallel,
            "pipeline_model_parallel_size": 1,
            "global_batch_size": s.global_batch_size,
            "micro_batch_size": s.micro_batch_size,
            "sequence_parallel": False,
            "gradient_as_bucket_view": True,  # NeMo's trainer builder requires it (DDP strategy)
            "megatron_amp_O2": False,
            "answer_only_loss": True,
            "data": {
                "chat": False,
                "train_ds": _sft_dataset(s.train_files, s, train=True),
                "validation_ds": _sft_dataset(s.validation_files, s, train=False),
            },
            "optim": optim_config(s.optim),
        },
    }
