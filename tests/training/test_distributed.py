"""Rank 0 drives the shared loop, other ranks mirror it: two real processes over torch.distributed (gloo, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedllm.training.core import TrainOutcome, run_round
from fedllm.training.distributed import run_distributed_site


class ShardTask:
    """Each rank owns one weight ('w<rank>'), as a TP shard; every step is a collective, as in Megatron."""

    def __init__(self, rank: int, log: list):
        self.rank, self.log = rank, log
        self.weight = torch.zeros(2)

    def load_exchanged_state(self, state):
        self.log.append(("load", sorted(state)))
        self.weight = torch.as_tensor(state[f"w{self.rank}"]).clone()

    def train(self, epochs, seed):
        total = self.weight.clone()
        dist.all_reduce(total)  # would deadlock if a rank skipped the step
        self.weight += epochs + self.rank
        self.log.append(("train", epochs, seed))
        return TrainOutcome(steps=epochs, train_loss=float(total.sum()))

    def evaluate(self):
        dist.barrier()
        return {"val_loss": float(self.weight.sum())}

    def exchanged_state(self):
        return {f"w{self.rank}": self.weight.clone()}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    log: list = []
    sent: list = []

    def fake_free_loop(build, *, epochs: int, seed: int) -> None:
        """The shared loop's round logic (core.run_round) for 2 rounds, with the server's state in hand."""
        task = build("site-1")
        state = {"w0": torch.ones(2), "w1": 2 * torch.ones(2)}
        for rnd in range(2):
            state, metrics, steps = run_round(task, state, epochs, seed * 1000 + rnd)
            sent.append((sorted(state), metrics["val_loss"], steps))

    run_distributed_site(
        lambda site: ShardTask(rank, log),
        fake_free_loop,
        site="site-1",
        shard=lambda state, r: {f"w{r}": state[f"w{r}"]},
        merge=lambda states: {k: v for s in states for k, v in s.items()},
        gather=True,
        epochs=3,
        seed=7,
    )
    torch.save({"log": log, "sent": sent}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_followers_load_their_shard_train_in_lockstep_and_rank0_sends_all_shards(tmp_path):
    from tests.support.sites import free_ports

    mp.spawn(_worker, args=(2, free_ports(1)[0], str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # Each rank loaded only its own shard, then trained with the same epochs and seeds.
    assert r0["log"][0] == ("load", ["w0"]) and r1["log"][0] == ("load", ["w1"])
    assert [e for e in r0["log"] if e[0] == "train"] == [e for e in r1["log"] if e[0] == "train"]
    assert [e for e in r1["log"] if e[0] == "train"] == [("train", 3, 7000), ("train", 3, 7001)]
    # Rank 0 sent both shards each round; round 2 started from round 1's result (1+3+0, 2+3+1 per element).
    assert [s[0] for s in r0["sent"]] == [["w0", "w1"], ["w0", "w1"]]
    assert r0["sent"][1][1] == float(2 * (1 + 3 + 3))
    assert r1["sent"] == []
