"""Heterogeneous LoRA ranks in one FedAvg job, the site's half of HetLoRA (Cho et al., 2024): truncate, train, zero-pad.

The server holds the global adapter at the job's largest rank r_max and sends it to every site unchanged.
A site of rank r_k keeps the first r_k rank components of what it receives (lora_A's first r_k rows,
lora_B's first r_k columns), trains an adapter of its own rank, and sends it back zero-padded to the
shapes it received. FedAvg's weighted mean of the padded adapters is then HetLoRA's zero-padding
aggregation, component by component,

    A_global[i] = Σ_{k: r_k > i} n_k A_k[i] / Σ_k n_k        (lora_B's columns alike)

and a site's next truncation is "the aggregate at its rank". With every rank equal, truncating and
padding change nothing, so the job is plain FedAvg bit for bit. The server needs no change.

The site learns r_max from the shapes it receives: no trainer argument names it. NVFlare's Hugging
Face integration loads the received adapter with a strict shape check and sends PEFT's adapter state
as it is, with no hook in between, so the site wraps the Client API it talks to (`RankAdaptingClientAPI`):
what `receive` returns is truncated, what `send` gets is padded; NVFlare's own calls go through it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedllm.errors import FedllmError

# PEFT's LoRA state-dict keys: lora_A (and lora_embedding_A) hold the rank components as rows,
# lora_B (and lora_embedding_B) as columns: ΔW = scale · B @ A.
_RANK_DIM = ((re.compile(r"(^|\.)lora_(embedding_)?A(\.|$)"), 0), (re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)"), 1))


class LoraRankError(FedllmError):
    """A site's LoRA rank does not fit the adapter it received; the message names the site, both ranks and the fix."""


def rank_dim(key: str) -> int | None:
    """The dimension of a LoRA state-dict tensor that runs over the rank components (None: not a LoRA factor)."""
    for pattern, dim in _RANK_DIM:
        if pattern.search(key):
            return dim
    return None


def adapter_rank(params: Mapping[str, Any]) -> int | None:
    """The rank of a LoRA adapter state (the largest over its factors); None when it holds no LoRA factor."""
    ranks = [tuple(value.shape)[dim] for key, value in params.items() if (dim := rank_dim(key)) is not None]
    return max(ranks) if ranks else None


def _take(value: Any, dim: int, rank: int) -> Any:
    index = (slice(None),) * dim + (slice(0, rank),)
    if isinstance(value, torch.Tensor):
        return value[index].clone()  # its own storage: a view would carry (and pickle) the whole tensor
    return np.array(value[index], copy=True)


def _pad(value: Any, shape: tuple[int, ...]) -> Any:
    region = tuple(slice(0, n) for n in value.shape)
    if isinstance(value, torch.Tensor):
        padded = torch.zeros(shape, dtype=value.dtype)
        padded[region] = value.detach().cpu()
        return padded
    padded = np.zeros(shape, dtype=np.asarray(value).dtype)
    padded[region] = value
    return padded


def truncate_adapter(params: Mapping[str, Any], rank: int, site: str = "this site") -> dict[str, Any]:
    """`params` with every LoRA factor cut to its first `rank` components; other tensors as they are.

    A factor with fewer than `rank` components cannot be cut to this site's rank: LoraRankError.
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        dim = rank_dim(key)
        if dim is None or tuple(value.shape)[dim] == rank:
            out[key] = value
            continue
        received = tuple(value.shape)[dim]
        if received < rank:
            raise LoraRankError(
                f"{site}: the global LoRA adapter has rank {received} ({key}), smaller than this site's lora_r "
                f"{rank}. Fix: create the job with --lora-ranks, which gives the server the largest of the sites' "
                f"ranks, or set this site's lora_r to at most {received}"
            )
        out[key] = _take(value, dim, rank)
    return out


def pad_adapter(params: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """`params` with every LoRA factor zero-padded to its shape in `shapes` (what the site received)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        shape = shapes.get(key)
        if rank_dim(key) is None or shape is None or tuple(value.shape) == tuple(shape):
            out[key] = value
            continue
        out[key] = _pad(value, tuple(shape))
    return out


class RankAdaptingClientAPI:
    """NVFlare's Client API of a site whose LoRA rank is below the global adapter's: truncate in, zero-pad out.

    Every call but `receive` and `send` goes to the wrapped API unchanged. The Client API returns the
    same received FLModel until the task is answered (fedllm.training.hf.federated receives it before
    NVFlare's patch does); this wrapper returns the same truncated copy for it, and leaves the original
    untouched (NVFlare's DIFF transfer subtracts the received global from the padded result).
    """

    def __init__(self, api: Any, rank: int, site: str, log: Callable[[str], None] = print):
        self._api = api
        self.rank = rank
        self.site = site
        self._log = log
        self._received: Any = None  # the FLModel the wrapped API returned last
        self._adapted: Any = None  # what this wrapper returned for it
        self._shapes: dict[str, tuple[int, ...]] = {}  # the received LoRA factors' shapes: what goes back
        self._told: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def receive(self, *args: Any, **kwargs: Any) -> Any:
        model = self._api.receive(*args, **kwargs)
        if model is None or model is self._received:
            return self._adapted if model is not None else None
        adapted = model
        if model.params:
            shapes = {k: tuple(v.shape) for k, v in model.params.items() if rank_dim(k) is not None}
            if shapes:
                adapted = copy.copy(model)  # shallow: metrics, meta and rounds shared; params a new dict
                adapted.params = truncate_adapter(model.params, self.rank, self.site)
                self._shapes = shapes
                self._tell(adapter_rank(model.params))
        self._received, self._adapted = model, adapted
        return adapted

    def send(self, model: Any, clear_cache: bool = True) -> Any:
        if model.params and self._shapes:
            model = copy.copy(model)
            model.params = pad_adapter(model.params, self._shapes)
        outcome = self._api.send(model, clear_cache)
        if clear_cache:  # the task is answered: the next receive is a new one
            self._received = self._adapted = None
        return outcome

    def _tell(self, global_rank: int | None) -> None:
        if global_rank is not None and global_rank != self.rank and global_rank != self._told:
            self._told = global_rank
            self._log(
                f"[{self.site}] LoRA rank {self.rank} of the global adapter's {global_rank} (HetLoRA): this site "
                f"trains the first {self.rank} rank components and sends them back zero-padded to rank {global_rank}"
            )
