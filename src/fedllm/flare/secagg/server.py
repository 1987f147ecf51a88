"""The server's side of secure aggregation: FedAvg that only ever holds the sum of the sites' updates.

`SecAggFedAvg` is `LeanFedAvg` (one global model in RAM, resumable) with one `ServerSession`
(fedllm.flare.secagg.protocol) per round:

1. before the round's `train` task, stages 0–2 of Bonawitz et al. 2017 over NVFlare aux messages (pushed to the
   sites, relayed by the server: sites never connect to each other): advertise keys, share keys, route the
   sealed shares to their recipients (design §1.3);
2. the `train` task goes to the sites that took part, and the round needs only `threshold` results
   (`min_responses=t`): a site that drops out after the round starts does not stop it;
3. each masked result is added into the ring as it arrives (`_aggregate_one_result`, no float copy of it);
4. then stage 3: the sites that sent ask the survivors for the shares that remove the masks, and the
   aggregate `g + Σ w_k·Δ_k / Σ w_k` becomes the round's global model, logged with its fixed-point error bound.

The per-site metrics still arrive in the clear and are averaged unweighted: the weights in NVFlare's round
log would otherwise tell each site's step count. Below the threshold at any stage the round fails with a
message that names the stage, the sites that answered, those missing, and t.

Its settings come from the server component `SecAggConfig` (id `SERVER_COMPONENT_ID`); fedllm.jobs.recipe
re-types the FedAvg that NVFlare's recipe builds, as for LeanFedAvg (no __init__ here either).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.shareable import ReturnCode, Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import filter_aggregatable_metrics
from nvflare.app_common.app_constant import AppConstants

from fedllm.flare.faults import crash_point
from fedllm.flare.fedavg import LeanFedAvg
from fedllm.flare.secagg.client import (
    ERROR,
    PAYLOAD,
    TOPIC_ADVERTISE,
    TOPIC_ROUTE,
    TOPIC_SHARE_KEYS,
    TOPIC_UNMASK,
)
from fedllm.flare.secagg.protocol import SecAggError, SecAggParams, ServerSession
from fedllm.flare.secagg.vectors import SECAGG_META, WEIGHT_SLOT, Layout, as_numpy

SERVER_COMPONENT_ID = "fedllm_secagg"
RETRY_S = 0.5  # between asks of a site whose job process is not up yet


class SecAggConfig(FLComponent):
    """The job's secure-aggregation settings, read by `SecAggFedAvg` (a server component: plain arguments)."""

    def __init__(
        self,
        threshold: int,
        min_sites: int,
        clip: float = 1.0,
        max_weight: float | None = None,
        stage_timeout_s: float = 60.0,
        wait_after_min_s: int = 60,
        train_timeout_s: int = 0,
    ):
        super().__init__()
        self.threshold = int(threshold)
        self.min_sites = int(min_sites)
        self.clip = float(clip)
        self.max_weight = max_weight
        self.stage_timeout_s = float(stage_timeout_s)
        self.wait_after_min_s = int(wait_after_min_s)
        self.train_timeout_s = int(train_timeout_s)

    def params(self) -> SecAggParams:
        extra = {} if self.max_weight is None else {"max_weight": float(self.max_weight)}
        return SecAggParams(threshold=self.threshold, clip=self.clip, **extra)


class SecAggFedAvg(LeanFedAvg):
    """LeanFedAvg whose server learns only the sum of the sites' updates (see the module doc)."""

    def _secagg_config(self) -> SecAggConfig:
        config = self.engine.get_component(SERVER_COMPONENT_ID)
        if not isinstance(config, SecAggConfig):
            raise SecAggError(f"secure aggregation: the job has no {SERVER_COMPONENT_ID} server component")
        return config

    # ---- stages 0–2, then the train task -------------------------------------------------------

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        if task_name != self.task_name:
            return super().send_model(task_name, data, targets, min_responses, timeout, callback)
        config = self._secagg_config()
        sites = sorted(targets or [c.name for c in self.engine.get_clients()])
        session = ServerSession(self.current_round, str(self.fl_ctx.get_job_id()), config.params(), sites)
        self._secagg = session
        self._secagg_layout: Layout | None = None
        self._secagg_global = data.params
        round_num, wait = self.current_round, config.stage_timeout_s
        replies = self._ask(TOPIC_ADVERTISE, {s: {"round": round_num, "sites": sites} for s in sites}, wait, retry=True)
        public_keys = session.collect_advertise(replies)
        u1 = sorted(public_keys)
        replies = self._ask(TOPIC_SHARE_KEYS, {s: {"round": round_num, "public_keys": public_keys} for s in u1}, wait)
        routed = session.collect_shares(replies)
        u2 = list(session.u2)
        self._ask(TOPIC_ROUTE, {v: {"round": round_num, "sealed": routed.get(v, {}), "u2": u2} for v in u2}, wait)
        self.info(f"secure aggregation, round {round_num}: keys exchanged with {u2} (threshold t={config.threshold})")
        self.broadcast_model(
            data=data,
            task_name=task_name,
            targets=u2,
            min_responses=config.threshold,
            timeout=config.train_timeout_s,
            wait_time_after_min_received=config.wait_after_min_s,
            blocking=False,
            callback=callback,
        )

    def _ask(self, topic: str, requests: dict[str, dict], timeout: float, *, retry: bool = False) -> dict[str, Any]:
        """Send each site its own request on `topic` (at once); the payloads of the sites that answered OK.

        With `retry`, a site that could not take the request yet (its job process still starting: the server's
        workflow begins before the sites' components are up) is asked again until `timeout` has passed; a site
        that refused is not. One aux request to all sites where they get the same payload, otherwise one per
        site in parallel (NVFlare 2.9's `multicast_aux_requests` fails in the server job: its cell takes no
        abort_signal).
        """
        deadline = time.monotonic() + timeout
        answered: dict[str, Any] = {}
        pending = dict(requests)
        while True:
            replies = self._send_each(topic, pending, max(1.0, deadline - time.monotonic()))
            unready, why = {}, {}
            for site in pending:
                reply = replies.get(site)
                code = reply.get_return_code() if isinstance(reply, Shareable) else "no reply"
                if code == ReturnCode.OK and PAYLOAD in reply:
                    answered[site] = reply[PAYLOAD]
                    continue
                why[site] = (reply.get(ERROR) or code) if isinstance(reply, Shareable) else code
                if code != ReturnCode.EXECUTION_EXCEPTION:
                    unready[site] = pending[site]
            if not (retry and unready and time.monotonic() + RETRY_S < deadline):
                break
            pending = unready
            time.sleep(RETRY_S)
        for site, reason in why.items():
            if site not in answered:
                self.warning(
                    f"secure aggregation, round {self.current_round}, {topic}: {site} did not answer ({reason})"
                )
        return answered

    def _send_each(self, topic: str, requests: dict[str, dict], timeout: float) -> dict[str, Shareable]:
        payloads = list(requests.values())
        if all(p == payloads[0] for p in payloads[1:]):
            return self._send(topic, list(requests), payloads[0], timeout)
        with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="fedllm-secagg") as pool:
            futures = [pool.submit(self._send, topic, [s], p, timeout) for s, p in requests.items()]
            return {site: reply for f in futures for site, reply in f.result().items()}

    def _send(self, topic: str, targets: list[str], payload: dict, timeout: float) -> dict[str, Shareable]:
        request = Shareable()
        request[PAYLOAD] = payload
        with self.engine.new_context() as fl_ctx:
            return self.engine.send_aux_request(targets, topic, request, timeout, fl_ctx)

    # ---- the ring sum ---------------------------------------------------------------------------

    def _aggregate_one_result(self, result) -> bool:
        accepted = self._add_masked(result)
        crash_point("aggregation", self.current_round, job_process=True)  # a test hook, inert unless set
        return accepted

    def _add_masked(self, result: FLModel) -> bool:
        site = str(result.meta.get("client_name"))
        session = getattr(self, "_secagg", None)
        if session is None or SECAGG_META not in result.meta or not result.params:
            self.warning(f"secure aggregation: a result from {site} that is not a masked update; not aggregated")
            return False
        layout = Layout.of(result.params)
        if self._secagg_layout is None:
            self._secagg_layout = layout
        elif layout != self._secagg_layout:
            self.warning(f"secure aggregation: {site}'s masked update has other parameters than the first; dropped")
            return False
        vector = np.concatenate(
            [layout.flatten(result.params, np.uint32), as_numpy(result.params[WEIGHT_SLOT]).astype(np.uint32).ravel()]
        )
        session.add_masked(site, vector)
        self._add_metrics(site, result.metrics)
        self._received_count += 1
        self.info(f"secure aggregation: masked update {self._received_count} of up to {self._expected_count} added")
        return True

    def _add_metrics(self, site: str, metrics: dict | None) -> None:
        """Each site's metrics, averaged with weight 1: the step counts must not reach the round log."""
        self._site_metric_weights[site] = {"name": site, "weight": 1.0, "weight_key": "effective_fedavg_metric_weight"}
        if metrics is None:
            self._all_metrics = False
        if self._all_metrics and metrics:
            aggregatable = filter_aggregatable_metrics(metrics, warned_metric_keys=self._warned_metric_keys)
            if aggregatable:
                self._aggr_metrics_helper.add(
                    data=aggregatable, weight=1.0, contributor_name=site, contribution_round=self.current_round
                )

    # ---- stage 3 and the new global model -------------------------------------------------------

    def _get_aggregated_result(self) -> FLModel:
        session, self._secagg = self._secagg, None
        config = self._secagg_config()
        u3, dropped = session.unmask_request()
        round_num = self.current_round
        replies = self._ask(
            TOPIC_UNMASK, {s: {"round": round_num, "u3": u3, "dropped": dropped} for s in u3}, config.stage_timeout_s
        )
        total, weight_sum = session.finish(replies)
        mean = total / weight_sum
        params = dict(self._secagg_global)
        for name, delta in self._secagg_layout.split(mean).items():
            params[name] = _like(params[name], as_numpy(params[name]).astype(np.float64) + delta)
        self._secagg_global = None
        self.info(
            f"secure aggregation, round {round_num}: the sum of {len(u3)} masked updates ({u3}) unmasked with "
            f"{len(replies)} sites' shares; dropped after the key exchange: {dropped or 'none'}; threshold "
            f"t={config.threshold}; fixed-point error ≤ {session.error_bound(weight_sum):.3g} per value"
        )
        metrics = self._aggr_metrics_helper.get_result() if self._all_metrics else None
        return FLModel(
            params=params,
            params_type=ParamsType.FULL,
            metrics=metrics or None,
            current_round=round_num,
            meta={
                "nr_aggregated": self._received_count,
                "current_round": round_num,
                AppConstants.METRICS_AGGREGATION_INFO: self._make_metrics_aggregation_info(),
            },
        )


def _like(reference: Any, values: np.ndarray) -> Any:
    """`values` (float64) in the container and dtype of `reference` (a torch tensor or a numpy array)."""
    if hasattr(reference, "detach"):
        import torch

        tensor = torch.from_numpy(values)
        if not reference.is_floating_point():
            tensor = tensor.round()
        return tensor.to(reference.dtype)
    dtype = np.asarray(reference).dtype
    return (values if np.issubdtype(dtype, np.floating) else np.rint(values)).astype(dtype)
