"""NeMo sources for the CPU tests: the pinned range's two ends, downloaded from PyPI as wheels.

Only their Python source is parsed (tests.support.nemo_source); nothing is imported, so no CUDA,
apex or megatron-core is needed. The wheels are cached under ~/.cache/fedllm (≈10 MB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.nemo_source import unpacked_wheel

CACHE = Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")) / "wheels"


@dataclass(frozen=True)
class NemoRelease:
    """A NeMo release at an end of the supported range and the Lightning it runs on."""

    version: str
    root: Path  # unpacked nemo_toolkit
    lightning_root: Path
    trainer_file: str  # Lightning's Trainer module, relative to lightning_root


# The ends of the range fedllm.training.nemo.compat accepts (>=2.2,<2.5.1; the tests run NeMo 2.4.1 itself).
# Both require lightning<=2.4.0 (their METADATA).
RELEASES = {
    "2.2.1": ("lightning", "2.4.0", "lightning/pytorch/trainer/trainer.py"),
    "2.5.0": ("lightning", "2.4.0", "lightning/pytorch/trainer/trainer.py"),
}


@pytest.fixture(scope="session", params=sorted(RELEASES))
def nemo_release(request: pytest.FixtureRequest) -> NemoRelease:
    version = request.param
    lightning, lightning_version, trainer_file = RELEASES[version]
    root = unpacked_wheel("nemo_toolkit", version, CACHE, members=["nemo/core/", "nemo/collections/nlp/"])
    lroot = unpacked_wheel(lightning, lightning_version, CACHE, members=[trainer_file.split("/")[0] + "/"])
    return NemoRelease(version, root, lroot, trainer_file)
