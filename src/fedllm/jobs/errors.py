"""The error of job creation: what was asked cannot make a job that runs; the message names the option and fix."""

from __future__ import annotations

from fedllm.errors import FedllmError


class JobSpecError(FedllmError):
    """A job cannot be created as asked; the message names the option and the fix."""
