"""model_config.yaml values read with their types checked, so a bad value is an error naming the field.

A `.nemo`'s config is user data (hand-edited, or damaged on disk): `int("sixteen")` would be a traceback
and `tensor_model_parallel_size: 0 or 1` a silent TP 1. Every reader of the fields fedllm uses goes
through these helpers (fedllm.checkpoint.model_spec gathers them into a ModelSpec).
"""

from __future__ import annotations

import math
from typing import Any

from fedllm.checkpoint.errors import CheckpointError

CONFIG_NAME = "model_config.yaml"


def _bad(source: str, key: str, value: Any, want: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(
        f"{source}: {CONFIG_NAME} field {key} is {shown}; it must be {want}. Fix: correct {key} in the "
        f"checkpoint's {CONFIG_NAME} (the value NeMo saved with the model), or re-download / re-save the checkpoint"
    )


def positive_int(cfg: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    """A count or size: an integer ≥ 1. Absent or null gives `default`; with no default it is required."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(
                f"{source}: {CONFIG_NAME} has no '{key}'; a Megatron-GPT config needs it "
                "(is this a NeMo Megatron-GPT checkpoint?)"
            )
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(source, key, value, "a positive integer")
    return value


def optional_positive_int(cfg: dict[str, Any], key: str, source: str) -> int | None:
    """Like positive_int, but absent or null stays None (the caller derives the value)."""
    return None if cfg.get(key) is None else positive_int(cfg, key, source)


def positive_float(cfg: dict[str, Any], key: str, source: str, default: float) -> float:
    """A finite number > 0 (epsilons, rotary bases); absent or null gives `default`."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise _bad(source, key, value, "a positive number")
    return float(value)


def fraction(cfg: dict[str, Any], key: str, source: str, default: float) -> float:
    """A number in (0, 1] (rotary_percentage); absent or null gives `default`."""
    value = positive_float(cfg, key, source, default)
    if value > 1:
        raise _bad(source, key, cfg.get(key), "a number in (0, 1]")
    return value


def flag(cfg: dict[str, Any], key: str, source: str, default: bool) -> bool:
    """A YAML boolean; the string "false" is not True (what bool("false") would say)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(source, key, value, "true or false")
    return value


def name(cfg: dict[str, Any], key: str, source: str, default: str) -> str:
    """A setting spelled as text (activation, position_embedding_type); absent, null or empty gives `default`."""
    value = cfg.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise _bad(source, key, value, "a name (text)")
    return value


def section(cfg: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """A nested mapping (tokenizer); absent or null gives {}."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(source, key, value, "a mapping")
    return value
