"""Errors of the NeMo backend: each names the file or package, the field and the fix."""

from __future__ import annotations

from fedllm.errors import FedllmError


class NemoUnavailableError(FedllmError):
    """The installed NeMo cannot run fedllm's Megatron-GPT workloads (missing, wrong version, no nlp collection)."""


class NemoCheckpointError(FedllmError):
    """A `.nemo` checkpoint is missing, unreadable or does not fit the site (e.g. TP ≠ the site's GPUs)."""


class NemoStateError(FedllmError):
    """Weights received from the server do not match the local model (keys or shapes)."""
