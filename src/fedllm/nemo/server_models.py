"""Server-side global models of the NeMo jobs (classes under `fedllm.` pass NVFlare's allow-list).

p-tuning: `PromptEncoderWeights` (fedllm.nemo.prompt_encoder) — the server never loads the LLM.
SFT: `NemoCheckpointWeights` — the full Megatron-GPT weights read from the base `.nemo` with torch
alone (no NeMo on the server), keyed exactly as sites send them: the checkpoint's own state-dict keys
at TP=1, `mp_rank_XX/<key>` per tensor-parallel shard otherwise (the archive's own layout).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedllm.nemo.checkpoint import read_model_config
from fedllm.nemo.errors import NemoCheckpointError
from fedllm.nemo.prompt_encoder import PromptEncoderWeights

__all__ = ["NemoCheckpointWeights", "PromptEncoderWeights", "shard_key", "split_shard_key"]

WEIGHTS_NAME = "model_weights.ckpt"
_RANK_DIR = re.compile(r"^mp_rank_(\d+)$")


def shard_key(rank: int, key: str, tensor_parallel: int) -> str:
    """Exchange key of one tensor of TP rank `rank` (plain key at TP=1)."""
    return key if tensor_parallel == 1 else f"mp_rank_{rank:02d}/{key}"


def split_shard_key(key: str) -> tuple[int, str]:
    head, sep, rest = key.partition("/")
    m = _RANK_DIR.match(head) if sep else None
    return (int(m.group(1)), rest) if m else (0, key)


def _weights_members(tar: tarfile.TarFile) -> dict[int, tarfile.TarInfo]:
    found: dict[int, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        parts = member.name.lstrip("./").split("/")
        if parts[-1] != WEIGHTS_NAME:
            continue
        if len(parts) == 1:
            found[0] = member
        elif len(parts) == 2 and (m := _RANK_DIR.match(parts[0])):
            found[int(m.group(1))] = member
    return found


def load_nemo_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """All weights of a (TP-sharded, PP=1) `.nemo` archive as exchange keys → CPU tensors."""
    path = Path(path)
    info = read_model_config(path)
    if info.pipeline_parallel != 1:
        raise NemoCheckpointError(
            f"{path}: model_config.yaml field pipeline_model_parallel_size is {info.pipeline_parallel}. "
            "Fix: convert the checkpoint to pipeline_model_parallel_size 1"
        )
    if path.is_dir():
        raise NemoCheckpointError(f"{path} is a directory. Fix: give the server the packed .nemo archive")
    out: dict[str, torch.Tensor] = {}
    with tarfile.open(path, "r:*") as tar:
        members = _weights_members(tar)
        if sorted(members) != list(range(info.tensor_parallel)):
            raise NemoCheckpointError(
                f"{path}: expected {WEIGHTS_NAME} for tensor-parallel ranks 0..{info.tensor_parallel - 1} "
                f"(model_config.yaml tensor_model_parallel_size), found ranks {sorted(members)} — a distributed "
                "(model_weights/) checkpoint or a broken archive. Fix: save the checkpoint in NeMo's legacy "
                "per-rank layout (dist_ckpt off) for SFT jobs"
            )
        for rank, member in sorted(members.items()):
            handle = tar.extractfile(member)
            assert handle is not None
            state = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[shard_key(rank, key, info.tensor_parallel)] = value
    return out


class NemoCheckpointWeights(nn.Module):
    """The SFT job's global model on the server: the base checkpoint's tensors, keyed as sites send them.

    Its state dict is the checkpoint's, not parameters of submodules (Megatron keys contain dots),
    so state_dict/load_state_dict are overridden; NVFlare's persistor only uses those two.
    """

    def __init__(self, checkpoint: str):
        super().__init__()
        self.checkpoint = checkpoint
        self._weights = load_nemo_weights(checkpoint)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._weights)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        missing = sorted(set(self._weights) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._weights))
        if strict and (missing or unexpected):
            raise NemoCheckpointError(
                f"weights do not match {self.checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                "Fix: sites and server must use the same base checkpoint"
            )
        self._weights.update({k: torch.as_tensor(v) for k, v in state_dict.items() if k in self._weights})
        return nn.modules.module._IncompatibleKeys(missing, unexpected)
