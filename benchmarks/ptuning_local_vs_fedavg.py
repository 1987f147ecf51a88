"""P-tuning a tiny GPT on label-skewed sites: local-only vs FedAvg, in one process (no federation).

Measures what the demo shows through the real federation, fast enough to tune settings:
    .venv/bin/python benchmarks/ptuning_local_vs_fedavg.py --rounds 8 --alpha 0.5
Prints the majority-class rate, each site's local-only accuracy, FedAvg's accuracy per round, and times.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from fedllm.data.split import dirichlet_split
from fedllm.data.synthetic import sentiment_records, skewed_site_records
from fedllm.flare.server_models import PeftPromptEncoderWeights
from fedllm.training.core import run_round
from fedllm.training.hf.ptuning import PTuningTask
from fedllm.training.hf.tiny_gpt import TinyGptSpec, build_tiny_gpt


def fedavg(states: list[dict], weights: list[int]) -> dict:
    total = sum(weights)
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--train", type=int, default=900)
    p.add_argument("--val", type=int, default=150)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.0, help="Dirichlet label skew (0: the demo's skew instead)")
    p.add_argument("--majority", type=float, default=0.7, help="demo skew: share of each site's own label")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per FedAvg round")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=TinyGptSpec.steps)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = str(build_tiny_gpt(TinyGptSpec(steps=args.pretrain_steps)))
    val = sentiment_records(args.val, seed=args.seed + 1)
    if args.alpha:
        parts = dirichlet_split(sentiment_records(args.train, seed=args.seed), args.sites, args.alpha, args.seed, 20)
    else:
        parts = skewed_site_records(args.sites, args.train // args.sites, args.majority, args.seed)
    majority = Counter(r["label"] for r in val).most_common(1)[0][1] / len(val)
    print(f"majority-class rate {majority:.3f}; site labels: {[dict(Counter(r['label'] for r in s)) for s in parts]}")
    tasks = [PTuningTask(model, part, val, lr=args.lr) for part in parts]
    init = PeftPromptEncoderWeights(tasks[0].model.get_input_embeddings().embedding_dim).state_dict()

    t0 = time.monotonic()
    local = [run_round(task, init, args.rounds * args.epochs, args.seed)[1]["val_accuracy"] for task in tasks]
    t_local = time.monotonic() - t0
    t0 = time.monotonic()
    state = init
    for rnd in range(args.rounds):
        results = [run_round(task, state, args.epochs, args.seed * 1000 + rnd) for task in tasks]
        state = fedavg([r[0] for r in results], [r[2] for r in results])
        print(f"round {rnd}: site accuracies {[round(r[1]['val_accuracy'], 3) for r in results]}")
    final = run_round(tasks[0], state, 0, 0)[1]["global_val_accuracy"]
    t_fed = time.monotonic() - t0
    print(f"local-only: {[round(a, 3) for a in local]} mean {sum(local) / len(local):.3f} ({t_local:.1f}s)")
    print(f"FedAvg global model: {final:.3f} ({t_fed:.1f}s)")


if __name__ == "__main__":
    main()
