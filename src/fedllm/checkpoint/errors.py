"""Checkpoint errors: each says which file, which field, and what to do."""

from __future__ import annotations

from fedllm.errors import FedllmError


class CheckpointError(FedllmError):
    """A checkpoint could not be read, converted or verified; the message names the file and the fix."""


class DistributedCheckpointError(CheckpointError):
    """The archive's torch-distributed checkpoint (model_weights/) is incomplete: its .metadata index is missing."""
