"""Errors of the NeMo backend: each names the file or package, the field and the fix.

A `.nemo` that is missing, unreadable or does not fit the site raises fedllm.checkpoint's CheckpointError.
"""

from __future__ import annotations

from fedllm.errors import FedllmError


class NemoUnavailableError(FedllmError):
    """The installed NeMo cannot run fedllm's Megatron-GPT workloads (missing, wrong version, no nlp collection)."""


class NemoStateError(FedllmError):
    """Weights received from the server do not match the local model (keys or shapes)."""


class NemoLaunchError(FedllmError):
    """The site's trainer processes do not match what the model needs (e.g. torchrun ranks ≠ --devices)."""
