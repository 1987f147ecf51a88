"""A model of any size whose sites send the received weights straight back: the exchange path alone.

Used by `benchmarks/exchange.py` and `tests/exchange/` to measure and check what the
federation does with multi-GB weights, without training time in the way. The weights are
LLM-shaped (a few large matrices), seeded, so every party can rebuild the exact expected
values and check what crossed the wire:
    fedllm job create <template with trainer fedllm.training.echo> --mode fedavg
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from torch import nn

# One transformer block's worth of fp32 weights at hidden 4096 is ~800 MiB; 64 MiB tensors keep
# per-tensor overhead visible without making the state dict unrealistically fine-grained.
TENSOR_MIB = 64
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_sizes(size_mib: float, tensor_mib: float = TENSOR_MIB, dtype: str = "float32") -> list[int]:
    """Element counts of the tensors that add up to `size_mib` MiB."""
    itemsize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    total = int(size_mib * 2**20) // itemsize
    per = max(1, int(tensor_mib * 2**20) // itemsize)
    return [min(per, total - start) for start in range(0, total, per)]


def iter_weights(size_mib: float, dtype: str = "float32", seed: int = 0, tensor_mib: float = TENSOR_MIB):
    """(name, tensor) of the seeded model, one tensor at a time (checks need not hold a second copy)."""
    gen = torch.Generator().manual_seed(seed)
    for i, n in enumerate(tensor_sizes(size_mib, tensor_mib, dtype)):
        # 2-D like a weight matrix; uniform values exercise every mantissa bit.
        cols = 1024 if n % 1024 == 0 else 1
        yield f"w{i:04d}", torch.empty(n // cols, cols).uniform_(-1, 1, generator=gen).to(DTYPES[dtype])


class EchoModel(nn.Module):
    """Parameters `w0000`, `w0001`, … of `size_mib` MiB in total, filled from `seed`."""

    def __init__(self, size_mib: float = 1024, dtype: str = "float32", seed: int = 0, tensor_mib: float = TENSOR_MIB):
        super().__init__()
        for name, t in iter_weights(size_mib, dtype, seed, tensor_mib):
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never trained
        return x


def state_digest(state: dict) -> str:
    """sha256 over names and raw bytes: equal digests ⇔ bit-identical state dicts."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = torch.as_tensor(state[name]).contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_weights(
    received: dict, size_mib: float, dtype: str, seed: int, tolerance: float, tensor_mib: float = TENSOR_MIB
) -> float:
    """Max |Δ| between `received` and the seeded model; raises if names, shapes, dtypes or values are off.

    With tolerance 0 the bytes must be identical (NaN-safe, sign-of-zero-safe: compared as raw bytes).
    """
    names = set()
    worst = 0.0
    for name, want in iter_weights(size_mib, dtype, seed, tensor_mib):
        names.add(name)
        if name not in received:
            raise ValueError(f"weight {name} is missing")
        got = torch.as_tensor(received[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"{name}: got {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}")
        if tolerance == 0:
            if not torch.equal(got.contiguous().view(torch.uint8), want.view(torch.uint8)):
                raise ValueError(f"{name}: bytes differ")
        else:
            worst = max(worst, (got.float() - want.float()).abs().max().item())
    if extra := set(received) - names:
        raise ValueError(f"unexpected weights {sorted(extra)[:5]}")
    if worst > tolerance:
        raise ValueError(f"max |Δ| {worst} exceeds tolerance {tolerance}")
    return worst


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-mib", type=float, default=TENSOR_MIB, help="size of each weight tensor")
    # Check every round that the weights arrived equal to the seeded model (bit-exact, or within
    # `--tolerance` when the wire carries a narrower dtype). Fails the site loudly when they differ.
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--tolerance", type=float, default=0.0)
    # Accepted for template compatibility (fedllm's create passes them to every trainer).
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)

    import nvflare.client as flare

    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        t0 = time.monotonic()
        incoming = flare.receive()
        if incoming is None:
            break
        received = time.monotonic()
        params = incoming.params
        nbytes = sum(torch.as_tensor(v).nbytes for v in params.values())
        if args.verify:
            # Round r's weights are the server's aggregate of round r-1's echoes: checking them every
            # round checks both directions of the exchange.
            try:
                diff = check_weights(params, args.size_mib, args.dtype, args.seed, args.tolerance, args.tensor_mib)
            except ValueError as exc:
                raise RuntimeError(f"[{site}] round {incoming.current_round}: weights differ: {exc}") from exc
            print(f"[{site}] round {incoming.current_round}: weights verified (max |Δ| {diff:.3g})")
        print(
            f"[{site}] round {incoming.current_round}: received {nbytes / 1e9:.3f} GB in {received - t0:.2f}s; echoing",
            flush=True,
        )
        flare.send(
            flare.FLModel(
                params=params,
                metrics={"echo_bytes": float(nbytes), "val_accuracy": 1.0},
                meta={"NUM_STEPS_CURRENT_ROUND": 1},
            )
        )
