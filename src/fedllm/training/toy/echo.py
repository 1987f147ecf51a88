"""A model of any size whose sites send the received weights straight back: the exchange path alone.

Used by `benchmarks/exchange.py` and `tests/exchange/` to measure and check what the
federation does with multi-GB weights, without training time in the way. The weights
(fedllm.flare.server_models.EchoModel) are LLM-shaped (a few large matrices), seeded, so every
party can rebuild the exact expected values and check what crossed the wire:
    fedllm job create <template with trainer fedllm.training.toy.echo> --mode fedavg

It keeps its own Client API loop instead of fedllm.training.core's: that loop casts what it
receives to float32 and evaluates and trains, while an echo must send back exactly what arrived,
in its own dtype, with nothing else in the round's time.
"""

from __future__ import annotations

import argparse
import time

import torch
from nvflare.apis.dxo import MetaKey

from fedllm.flare.server_models import DTYPES, TENSOR_MIB, iter_weights


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


def argument_parser() -> argparse.ArgumentParser:
    """The trainer's arguments (`fedllm job create` checks a job's against them)."""
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)

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
                meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1},
            )
        )
