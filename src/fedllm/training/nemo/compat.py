"""Which NeMo fedllm's Megatron-GPT backend runs on, and a clear error when the installed one cannot.

The seeds' workloads use NeMo 1's `nemo.collections.nlp` (MegatronGPTPromptLearningModel for
p-tuning, MegatronGPTSFTModel for SFT). nemo_toolkit wheels ship that collection from 1.23 up to
2.4; from 2.5 on it is gone (NeMo 2's `nemo.collections.llm` has LoRA/DoRA but no p-tuning) and
3.0 is speech-only. Hence the range below, which is also the `nemo` extra in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

from fedllm.training.nemo.errors import NemoUnavailableError

NEMO_DISTRIBUTION = "nemo_toolkit"
MIN_VERSION = (1, 23)
MAX_VERSION_EXCLUSIVE = (2, 5)
SUPPORTED_RANGE = ">=1.23,<2.5"
# The NeMo container the site image builds on (containers issue) ships a version in this range.
FIX = (
    f"run the site in the fedllm NeMo image, or `pip install 'fedllm[nemo]'` (nemo_toolkit{SUPPORTED_RANGE}, "
    "plus apex/transformer-engine/megatron-core as in NVIDIA's NeMo container)"
)


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.0.0rc1' or '1.23.0'."""
    m = re.match(r"^(\d+)\.(\d+)", text)
    if not m:
        raise NemoUnavailableError(f"cannot read the NeMo version '{text}'. Fix: {FIX}")
    return int(m.group(1)), int(m.group(2))


def is_supported(version: str) -> bool:
    return MIN_VERSION <= parse_version(version) < MAX_VERSION_EXCLUSIVE


def installed_nemo_version() -> str | None:
    try:
        return importlib.metadata.version(NEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_nemo_nlp(version: str | None = None, *, nlp_present: bool | None = None) -> str:
    """Return the installed NeMo version, or raise NemoUnavailableError saying what to install.

    `version` / `nlp_present` default to what is installed (tests pass them to check the messages).
    Nothing heavy is imported: the nlp collection is located, not loaded.
    """
    version = installed_nemo_version() if version is None else version
    if version is None:
        raise NemoUnavailableError(f"NeMo ({NEMO_DISTRIBUTION}) is not installed in this Python. Fix: {FIX}")
    if not is_supported(version):
        raise NemoUnavailableError(
            f"{NEMO_DISTRIBUTION} {version} is installed, but fedllm's Megatron-GPT p-tuning/SFT needs "
            f"{SUPPORTED_RANGE}: from 2.5 on the wheels no longer ship nemo.collections.nlp "
            f"(MegatronGPTPromptLearningModel, MegatronGPTSFTModel). Fix: {FIX}"
        )
    if nlp_present is None:
        try:
            nlp_present = importlib.util.find_spec("nemo.collections.nlp") is not None
        except ModuleNotFoundError:
            nlp_present = False
    if not nlp_present:
        raise NemoUnavailableError(
            f"{NEMO_DISTRIBUTION} {version} is installed without nemo.collections.nlp (the Megatron-GPT "
            f"prompt-learning and SFT models). Fix: {FIX}"
        )
    return version
