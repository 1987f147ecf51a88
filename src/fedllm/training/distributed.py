"""One site, several GPUs: run the shared training loop on rank 0 and mirror it on the other ranks.

A TP=2 site runs its trainer under `torchrun --nproc_per_node 2` (NVFlare Client API, external
process, launched once). Only rank 0 talks to NVFlare (the Client API makes other ranks passive),
but Megatron's tensor-parallel collectives need every rank to load, train and evaluate in lockstep.
`LeaderTask` wraps the backend's task on rank 0: before each step of the shared loop
(fedllm.training.core.run_site) it broadcasts the command to the other ranks, which run `follow()`.

State crossing ranks:
- p-tuning: the prompt encoder is replicated on every TP rank ("mlp" encoder), so the global state
  is broadcast to all ranks and rank 0's copy is what the site sends;
- SFT: every rank holds its own tensor-parallel shard, so `shard_of(state, rank)` picks each rank's
  part of the global state and rank 0 gathers the ranks' shards before sending.
- trainer state (a `TrainerStateTask`'s optimizer, schedule, data position): every rank restores its own
  part from the snapshot folder rank 0 names, and writes it there after the round; rank 0 marks the
  snapshot complete only after every rank has written (`StatefulLeaderTask`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fedllm.training.core import SiteTask, TrainerStateTask, TrainOutcome
from fedllm.training.lineage import RoundContext

# The per-rank view of a global state: (global state, rank) -> what that rank loads.
ShardFn = Callable[[Mapping[str, Any], int], Mapping[str, Any]]
# Combines what every rank returns from exchanged_state() into what the site sends.
MergeFn = Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's once initialised, torchrun's env before."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def site_name() -> str:
    """The site's name on ranks that have no Client API session (the kit's environment sets it)."""
    return os.environ.get("FEDLLM_SITE_NAME", "site")


def broadcast_from_rank0(obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (`obj` itself where there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def replicated(state: Mapping[str, Any], rank: int) -> Mapping[str, Any]:
    return state


def from_rank0(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return states[0]


class LeaderTask:
    """Rank 0's SiteTask: tells the other ranks what to do, then does it itself."""

    def __init__(self, task: SiteTask, shard: ShardFn = replicated, merge: MergeFn = from_rank0, gather: bool = False):
        self.task, self.shard, self.merge, self.gather = task, shard, merge, gather
        self.world_size = world()[1]

    def load_exchanged_state(self, state: Mapping[str, Any]) -> None:
        if self.world_size > 1:
            broadcast_from_rank0(("load", None))
            # Each rank gets only its part (a TP shard for SFT); scatter keeps rank 0's memory to one copy.
            parts = [self.shard(state, r) for r in range(self.world_size)]
            box: list[Any] = [None]
            dist.scatter_object_list(box, parts, src=0)
            state = box[0]
        self.task.load_exchanged_state(state)

    def train(self, epochs: int, seed: int) -> TrainOutcome:
        if self.world_size > 1:
            broadcast_from_rank0(("train", (epochs, seed)))
        return self.task.train(epochs, seed)

    def evaluate(self) -> dict[str, float]:
        if self.world_size > 1:
            broadcast_from_rank0(("evaluate", None))
        return self.task.evaluate()

    def exchanged_state(self) -> dict[str, torch.Tensor]:
        if self.world_size > 1 and self.gather:
            broadcast_from_rank0(("exchanged_state", None))
            gathered: list[Any] = [None] * self.world_size
            dist.gather_object(self.task.exchanged_state(), gathered, dst=0)
            return self.merge(gathered)
        return self.task.exchanged_state()

    def stop(self) -> None:
        if self.world_size > 1:
            broadcast_from_rank0(("stop", None))


class StatefulLeaderTask(LeaderTask):
    """LeaderTask of a TrainerStateTask: the other ranks restore and save their part of the state with rank 0."""

    task: TrainerStateTask

    def begin_round(self, context: RoundContext, snapshot: Path | None) -> None:
        if self.world_size > 1:
            broadcast_from_rank0(("begin_round", (context, snapshot)))
        self.task.begin_round(context, snapshot)

    def save_round_state(self, folder: Path) -> None:
        if self.world_size > 1:
            broadcast_from_rank0(("save_round_state", (folder,)))
        self.task.save_round_state(folder)
        if self.world_size > 1:
            dist.barrier()  # every rank's part is written before rank 0 marks the snapshot complete


def leader_task(task: SiteTask, shard: ShardFn, merge: MergeFn, gather: bool) -> LeaderTask:
    cls = StatefulLeaderTask if isinstance(task, TrainerStateTask) else LeaderTask
    return cls(task, shard, merge, gather)


def follow(task: SiteTask) -> None:
    """Ranks > 0: execute rank 0's commands until it says stop."""
    rank = dist.get_rank()
    while True:
        command, args = broadcast_from_rank0()
        if command == "stop":
            return
        if command == "load":
            box: list[Any] = [None]
            dist.scatter_object_list(box, None, src=0)
            task.load_exchanged_state(box[0])
        elif command == "train":
            task.train(*args)
        elif command == "evaluate":
            task.evaluate()
        elif command == "exchanged_state":
            dist.gather_object(task.exchanged_state(), None, dst=0)
        elif command == "begin_round" and isinstance(task, TrainerStateTask):
            task.begin_round(*args)
        elif command == "save_round_state" and isinstance(task, TrainerStateTask):
            task.save_round_state(*args)
            dist.barrier()
        else:  # pragma: no cover - a protocol error is a bug
            raise RuntimeError(f"rank {rank}: unknown command {command!r} from rank 0")


def run_distributed_site(
    build_task: Callable[[str], SiteTask],
    run_site: Callable[..., None],
    *,
    site: str,
    shard: ShardFn = replicated,
    merge: MergeFn = from_rank0,
    gather: bool = False,
    **loop_args: Any,
) -> None:
    """Rank 0 runs the shared loop (`run_site`) around a LeaderTask; other ranks follow it."""
    rank, world_size = world()
    if world_size == 1:
        run_site(build_task, **loop_args)
        return
    if rank != 0:
        # Every rank builds its model at the same time: Megatron's initialisation is collective.
        follow(build_task(site))
        return
    leader: LeaderTask | None = None

    def build(site_name: str) -> LeaderTask:
        nonlocal leader
        leader = leader_task(build_task(site_name), shard, merge, gather)
        return leader

    try:
        run_site(build, **loop_args)
    finally:
        if leader is not None:
            leader.stop()
