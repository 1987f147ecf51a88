"""Comparing state dicts in tests: bit-exact digests and the largest difference."""

from __future__ import annotations

import hashlib

import torch


def state_digest(state: dict) -> str:
    """sha256 over names and raw bytes: equal digests ⇔ bit-identical state dicts."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = torch.as_tensor(state[name]).contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def max_abs_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise ValueError(f"state dicts differ in names: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for name in a:
        ta, tb = torch.as_tensor(a[name]).float(), torch.as_tensor(b[name]).float()
        if ta.shape != tb.shape:
            raise ValueError(f"{name}: shape {tuple(ta.shape)} != {tuple(tb.shape)}")
        worst = max(worst, (ta - tb).abs().max().item() if ta.numel() else 0.0)
    return worst
