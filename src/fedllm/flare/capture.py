"""A test hook in the server: save what the server's job process receives from each site, as it arrives.

`ResultCapture` is a server component every fedllm job carries (fedllm.jobs.create). It does nothing unless
`FEDLLM_CAPTURE_DIR` is set in the server's environment (a test sets it when it starts the server). Then, on
`BEFORE_TASK_RESULT_FILTER` (NVFlare's server runner fires it on a site's result before any input filter or
controller code sees it), each `train` result is written to `<dir>/<job id>/<round>/<site>.npz`: every array
of its DXO under its own name, and the DXO's meta as JSON under `__meta__`. It reads NVFlare's message, not
fedllm's variables: this is how tests/federation/test_secure_aggregation.py checks what a curious server sees.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.app_constant import AppConstants

from fedllm.fileio import atomic_path

CAPTURE_ENV = "FEDLLM_CAPTURE_DIR"
CAPTURE_COMPONENT_ID = "fedllm_result_capture"
META_ENTRY = "__meta__"
TASKS = ("train",)


def _as_numpy(value) -> np.ndarray:
    """An array as it arrived: lazy references (disk offload) loaded; bf16 widened (numpy has no bfloat16)."""
    if hasattr(value, "materialize"):
        value = value.materialize()
    if hasattr(value, "detach"):
        import torch

        tensor = value.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return np.asarray(value)


class ResultCapture(FLComponent):
    """Writes each site's raw `train` result to FEDLLM_CAPTURE_DIR (inert when it is unset)."""

    def handle_event(self, event_type: str, fl_ctx) -> None:
        root = os.environ.get(CAPTURE_ENV)
        if not root or event_type != EventType.BEFORE_TASK_RESULT_FILTER:
            return
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) not in TASKS:
            return
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else "unknown"
        try:
            dxo = from_shareable(result)
        except Exception as exc:  # an error reply carries no DXO: nothing was received to capture
            self.log_info(fl_ctx, f"capture: {site}'s result holds no DXO ({exc}); not captured")
            return
        round_num = result.get_header(AppConstants.CURRENT_ROUND)
        if round_num is None:
            round_num = result.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        arrays = {name: _as_numpy(value) for name, value in (dxo.data or {}).items()}
        meta = json.dumps({"data_kind": dxo.data_kind, **dxo.meta}, default=str)
        path = Path(root) / str(fl_ctx.get_job_id()) / str(round_num) / f"{site}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp, open(temp, "wb") as handle:
            np.savez(handle, **arrays, **{META_ENTRY: np.array(meta)})
        self.log_info(fl_ctx, f"capture: {site}'s round {round_num} result → {path}")
