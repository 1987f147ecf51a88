"""The two site filters of secure aggregation: remember the received global, send only the masked update.

Both sit on task `train` in the site's job process and work on the DXO, whatever the trainer exchanges (a
prompt encoder, LoRA adapters, full weights; fedllm's own loop, NVFlare's HF integration, torchrun or NeMo
trainers all return their result through the site's output filters), so no trainer changes.

- `SecAggRemember` (input): keeps a copy of the global weights the round's task brings, so the update can be
  measured against them (the trainers send their new weights, not the difference).
- `SecAggMask` (output): sends `mask(x − g, weight)` instead of the weights: the ring vector of
  fedllm.flare.secagg.protocol, each parameter under its own name and shape as uint32, the masked FedAvg weight
  in one more entry (`WEIGHT_SLOT`), as DataKind.WEIGHT_DIFF with a `fedllm_secagg` meta flag. The step count
  (FedAvg's weight, in the clear otherwise) is replaced by 1; the site's metrics stay, with `secagg_clamped`
  added. Without the round's keys it raises: the site then counts as dropped, and nothing leaves in the clear.

Order (fedllm.jobs.create): after any compression (refused with secure aggregation on the uplink), before
`WireViews`, which leaves numpy arrays alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.app_common.app_constant import AppConstants

from fedllm.flare.faults import site_crash_point
from fedllm.flare.filters import BYTES_ON_WIRE
from fedllm.flare.secagg.client import CLIENT_COMPONENT_ID, SecAggClient
from fedllm.flare.secagg.protocol import SecAggError
from fedllm.flare.secagg.vectors import (
    CLAMPED_METRIC,
    SECAGG_META,
    WEIGHT_CAPPED_METRIC,
    WEIGHT_SLOT,
    Layout,
    as_numpy,
)

KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]


def _client(fl_ctx) -> SecAggClient:
    component = fl_ctx.get_engine().get_component(CLIENT_COMPONENT_ID)
    if not isinstance(component, SecAggClient):
        raise SecAggError(
            f"secure aggregation: the job has no {CLIENT_COMPONENT_ID} component on this site; nothing is sent"
        )
    return component


def _round(shareable, client: SecAggClient) -> int:
    value = shareable.get_header(AppConstants.CURRENT_ROUND)
    if value is None:
        value = client.latest_round()
    if value is None:
        raise SecAggError(f"secure aggregation: {client.site} cannot tell which round this result is for")
    return int(value)


class SecAggRemember(DXOFilter):
    """Client input filter on `train`: keep a copy of the global weights the site received this round."""

    def __init__(self):
        super().__init__(supported_data_kinds=KINDS, data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo, shareable, fl_ctx):
        client = _client(fl_ctx)
        round_num = shareable.get_header(AppConstants.CURRENT_ROUND)
        if round_num is None:
            round_num = client.latest_round()  # the key exchange just before this task named it
        # A copy, not a reference: an in-process trainer may train the received tensors in place.
        copied = {name: np.array(as_numpy(value), copy=True) for name, value in dxo.data.items()}
        client.remember_global(-1 if round_num is None else int(round_num), copied)
        return None  # the task goes on unchanged


class SecAggMask(DXOFilter):
    """Client output filter on `train`: the masked update replaces the weights (see the module doc)."""

    def __init__(self):
        super().__init__(supported_data_kinds=KINDS, data_kinds_to_filter=KINDS)

    def process_dxo(self, dxo, shareable, fl_ctx):
        client = _client(fl_ctx)
        round_num = _round(shareable, client)
        site_crash_point("secagg-mask", client.site, round_num)  # a test hook, inert unless set
        session = client.session(round_num)  # raises without the round's keys: nothing goes out in the clear
        layout = Layout.of(dxo.data)
        update = layout.flatten(dxo.data, np.float64)
        if dxo.data_kind == DataKind.WEIGHTS:
            update -= _global_vector(client.received_global(round_num), layout, client.site)
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        weight = float(steps) if steps else 1.0
        capped = weight > session.params.max_weight
        if capped:
            self.log_warning(
                fl_ctx,
                f"secure aggregation, round {round_num}: this site's FedAvg weight {weight:g} is above the job's "
                f"max weight {session.params.max_weight:g} and counts as {session.params.max_weight:g}, so the "
                "aggregate weighs it less than plain FedAvg would. Fix: create the job with --secagg-max-weight "
                f"{weight:g} or more",
            )
        masked, clamped = session.mask(update, weight)
        data: dict[str, Any] = dict(layout.split(masked[:-1]))
        data[WEIGHT_SLOT] = masked[-1:]
        meta = dict(dxo.meta)
        meta[MetaKey.NUM_STEPS_CURRENT_ROUND] = 1  # FedAvg's weight is inside the masked vector, not in the clear
        meta[SECAGG_META] = {"round": round_num, "site": client.site, "elements": int(masked.size)}
        metrics = meta.get(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict):
            meta[MetaKey.INITIAL_METRICS] = {
                **metrics,
                CLAMPED_METRIC: float(clamped),
                WEIGHT_CAPPED_METRIC: float(capped),
                BYTES_ON_WIRE: float(masked.nbytes),
            }
        self.log_info(
            fl_ctx,
            f"secure aggregation, round {round_num}: {masked.size - 1:,} values masked "
            f"({clamped:,} clamped to the clip bound)",
        )
        return DXO(DataKind.WEIGHT_DIFF, data=data, meta=meta)


def _global_vector(received: dict[str, Any], layout: Layout, site: str) -> np.ndarray:
    missing = [name for name in layout.names if name not in received]
    if missing:
        raise SecAggError(
            f"secure aggregation: {site}'s result has {len(missing)} parameter(s) the received global model lacks "
            f"(e.g. {missing[0]}); an update cannot be formed, nothing is sent"
        )
    return layout.flatten(received, np.float64)
