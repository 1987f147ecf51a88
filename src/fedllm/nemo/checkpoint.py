"""Read what a `.nemo` checkpoint says about itself (model_config.yaml) without importing NeMo.

A `.nemo` file is a tar archive (plain or gzip) holding `model_config.yaml`, the weights
(`model_weights.ckpt` at TP=PP=1, `mp_rank_XX/model_weights.ckpt` per tensor-parallel rank, or a
`model_weights/` distributed checkpoint) and tokenizer files; NeMo also restores from the archive
extracted into a directory, so both are accepted. The tensor-parallel degree a site must run with
comes from here: Megatron shards the weights per TP rank, so a TP=2 checkpoint needs exactly two
processes (GPUs) per site.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedllm.nemo.errors import NemoCheckpointError

CONFIG_NAME = "model_config.yaml"


@dataclass(frozen=True)
class NemoModelInfo:
    """The fields of model_config.yaml that decide how a site runs the model."""

    path: Path
    config: dict[str, Any]

    @property
    def tensor_parallel(self) -> int:
        return int(self.config.get("tensor_model_parallel_size", 1))

    @property
    def pipeline_parallel(self) -> int:
        return int(self.config.get("pipeline_model_parallel_size", 1))

    @property
    def model_parallel(self) -> int:
        """Processes (GPUs) one copy of the model spans."""
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def hidden_size(self) -> int:
        if "hidden_size" not in self.config:
            raise NemoCheckpointError(
                f"{self.path}: {CONFIG_NAME} has no field hidden_size, so this is not a Megatron-GPT checkpoint. "
                "Fix: use a Megatron-GPT .nemo (e.g. nvidia/nemo-megatron-gpt-*)"
            )
        return int(self.config["hidden_size"])


def _member_name(names: list[str]) -> str | None:
    for name in names:
        if name.lstrip("./") == CONFIG_NAME:
            return name
    return None


def read_model_config(path: Path | str) -> NemoModelInfo:
    """Parse model_config.yaml of a .nemo archive or an extracted .nemo directory."""
    path = Path(path)
    if not path.exists():
        raise NemoCheckpointError(
            f"checkpoint {path} does not exist on this machine. Fix: put the .nemo file there (sites read it from "
            "their own disk or data mount) or pass its path with `fedllm job create ... --model <path>`"
        )
    try:
        if path.is_dir():
            text = (path / CONFIG_NAME).read_text()
        else:
            with tarfile.open(path, "r:*") as tar:
                member = _member_name(tar.getnames())
                if member is None:
                    raise NemoCheckpointError(
                        f"{path} has no {CONFIG_NAME}, so it is not a NeMo checkpoint. Fix: pass a .nemo file "
                        "saved by NeMo (model.save_to) or converted with NeMo's conversion scripts"
                    )
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file member
                text = handle.read().decode()
    except (tarfile.TarError, FileNotFoundError, IsADirectoryError) as exc:
        raise NemoCheckpointError(
            f"{path} is not a readable .nemo archive ({exc}). Fix: re-download or re-save the checkpoint"
        ) from exc
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise NemoCheckpointError(f"{path}: {CONFIG_NAME} is not a mapping. Fix: re-save the checkpoint with NeMo")
    return NemoModelInfo(path=path, config=config)


def check_fits_site(info: NemoModelInfo, devices: int) -> None:
    """Raise unless one model copy spans exactly the site's `devices` GPUs (one process per GPU)."""
    if info.pipeline_parallel != 1:
        raise NemoCheckpointError(
            f"{info.path}: {CONFIG_NAME} field pipeline_model_parallel_size is {info.pipeline_parallel}; fedllm's "
            "NeMo jobs use tensor parallelism only. Fix: convert the checkpoint to pipeline_model_parallel_size 1 "
            "(NeMo's megatron_change_num_partitions.py --target_pipeline_model_parallel_size 1)"
        )
    if info.tensor_parallel != devices:
        raise NemoCheckpointError(
            f"{info.path}: {CONFIG_NAME} field tensor_model_parallel_size is {info.tensor_parallel}, but the site "
            f"trains on {devices} GPU(s) (one process per GPU, each holding one tensor-parallel shard). Fix: "
            f"create the job with --devices {info.tensor_parallel} and give each site {info.tensor_parallel} GPUs "
            f"(sites[].gpus in the site config), or convert the checkpoint to tensor_model_parallel_size {devices} "
            "(NeMo's megatron_change_num_partitions.py --target_tensor_model_parallel_size)"
        )
