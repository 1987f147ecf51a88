"""Megatron-GPT `.nemo` checkpoints: read, inspect, verify, reshard across tensor-parallel sizes, download,
export to Hugging Face — in plain PyTorch, streaming, without NeMo."""

from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.errors import CheckpointError, DistributedCheckpointError
from fedllm.checkpoint.reshard import ConvertResult, convert
from fedllm.checkpoint.verify import CheckpointSummary, compare_merged, summarize

__all__ = [
    "CheckpointError",
    "CheckpointSummary",
    "ConvertResult",
    "DistributedCheckpointError",
    "NemoArchive",
    "compare_merged",
    "convert",
    "summarize",
]
