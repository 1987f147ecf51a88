"""A tiny GPT-2 built and pretrained locally (cached under $FEDLLM_CACHE, as the demo does)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_gpt() -> Path:
    from fedllm.training.hf.tiny_gpt import build_tiny_gpt

    return build_tiny_gpt(log=lambda _m: None)
