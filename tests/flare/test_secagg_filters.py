"""The sites' side of secure aggregation in one process: SecAggClient's aux handlers and the two filters.

Each site has its real component, answering real Shareables through the handlers it registers at START_RUN;
the server's part is the protocol's ServerSession, driven the way SecAggFedAvg drives it. No NVFlare process
runs (tests/federation/test_secure_aggregation*.py does that).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.shareable import ReturnCode, Shareable
from nvflare.app_common.app_constant import AppConstants

from fedllm.flare.secagg.client import (
    CLIENT_COMPONENT_ID,
    ERROR,
    PAYLOAD,
    TOPIC_ADVERTISE,
    TOPIC_ROUTE,
    TOPIC_SHARE_KEYS,
    TOPIC_UNMASK,
    SecAggClient,
)
from fedllm.flare.secagg.filters import SecAggMask, SecAggRemember
from fedllm.flare.secagg.protocol import SecAggError, SecAggParams, ServerSession
from fedllm.flare.secagg.vectors import CLAMPED_METRIC, SECAGG_META, WEIGHT_CAPPED_METRIC, WEIGHT_SLOT, Layout

SITES = ["site-1", "site-2", "site-3"]
JOB = "job-1"


class SiteEngine:
    """What a site job's components ask their engine for: components, and where aux handlers go."""

    def __init__(self):
        self.components: dict = {}
        self.handlers: dict = {}

    def get_component(self, component_id: str):
        return self.components.get(component_id)

    def register_aux_message_handler(self, topic: str, message_handle_func) -> None:
        self.handlers[topic] = message_handle_func

    def fire_event(self, event_type: str, fl_ctx) -> None:
        pass


class Site:
    def __init__(self, name: str, threshold: int = 2):
        self.engine = SiteEngine()
        self.client = SecAggClient(threshold=threshold)
        self.engine.components[CLIENT_COMPONENT_ID] = self.client
        self.ctx = FLContextManager(engine=self.engine, identity_name=name, job_id=JOB).new_context()
        self.client.handle_event(EventType.START_RUN, self.ctx)

    def ask(self, topic: str, payload: dict) -> Shareable:
        request = Shareable()
        request[PAYLOAD] = payload
        return self.engine.handlers[topic](topic=topic, request=request, fl_ctx=self.ctx)


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"encoder.weight": torch.randn(4, 6, generator=gen), "encoder.bias": torch.randn(6, generator=gen)}


def _task(params: dict, round_num: int = 0) -> Shareable:
    shareable = DXO(DataKind.WEIGHTS, data=dict(params)).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_num)
    return shareable


def _result(params: dict, steps: int, round_num: int = 0) -> Shareable:
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps, MetaKey.INITIAL_METRICS: {"train_loss": 0.5}}
    shareable = DXO(DataKind.WEIGHTS, data=dict(params), meta=meta).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_num)
    return shareable


def _key_exchange(sites: dict[str, Site], round_num: int = 0) -> ServerSession:
    session = ServerSession(round_num, JOB, SecAggParams(threshold=2), SITES)
    replies = {n: s.ask(TOPIC_ADVERTISE, {"round": round_num, "sites": SITES})[PAYLOAD] for n, s in sites.items()}
    keys = session.collect_advertise(replies)
    shares = {n: s.ask(TOPIC_SHARE_KEYS, {"round": round_num, "public_keys": keys})[PAYLOAD] for n, s in sites.items()}
    routed = session.collect_shares(shares)
    for name, site in sites.items():
        ack = site.ask(TOPIC_ROUTE, {"round": round_num, "sealed": routed[name], "u2": session.u2})
        assert ack.get_return_code() == ReturnCode.OK
    return session


def test_without_the_rounds_keys_nothing_is_sent() -> None:
    site = Site("site-1")
    SecAggRemember().process(_task(_global()), site.ctx)
    trained = {k: v + 0.1 for k, v in _global().items()}
    with pytest.raises(SecAggError, match="holds no keys for round 0"):
        SecAggMask().process(_result(trained, steps=10), site.ctx)


def test_a_round_through_the_handlers_and_filters_gives_the_weighted_mean_update() -> None:
    sites = {name: Site(name) for name in SITES}
    session = _key_exchange(sites)
    g = _global()
    steps = {"site-1": 10, "site-2": 30, "site-3": 20}
    trained = {name: {k: v + 0.01 * (i + 1) * torch.ones_like(v) for k, v in g.items()} for i, name in enumerate(SITES)}
    sent = {}
    for name, site in sites.items():
        SecAggRemember().process(_task(g), site.ctx)
        trained[name]["encoder.weight"][0, 0] = g["encoder.weight"][0, 0] + 5.0  # beyond the clip: clamped to 1
        sent[name] = from_shareable(SecAggMask().process(_result(trained[name], steps[name]), site.ctx))

    for name, dxo in sent.items():
        assert dxo.data_kind == DataKind.WEIGHT_DIFF
        assert all(v.dtype == np.uint32 for v in dxo.data.values()) and WEIGHT_SLOT in dxo.data
        assert dxo.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 1, "the step count does not travel in the clear"
        assert dxo.meta[SECAGG_META]["site"] == name
        assert dxo.meta[MetaKey.INITIAL_METRICS] == {
            "train_loss": 0.5,
            CLAMPED_METRIC: 1.0,
            WEIGHT_CAPPED_METRIC: 0.0,
            "bytes_on_wire": 124.0,
        }
        layout = Layout.of(dxo.data)
        session.add_masked(name, np.concatenate([layout.flatten(dxo.data, np.uint32), dxo.data[WEIGHT_SLOT]]))

    u3, dropped = session.unmask_request()
    reveals = {n: sites[n].ask(TOPIC_UNMASK, {"round": 0, "u3": u3, "dropped": dropped})[PAYLOAD] for n in u3}
    total, weight_sum = session.finish(reveals)
    layout = Layout.of(g)
    updates = {n: np.clip(layout.flatten(trained[n], np.float64) - layout.flatten(g, np.float64), -1, 1) for n in SITES}
    expected = sum(steps[n] * updates[n] for n in SITES) / sum(steps.values())
    bound = session.error_bound(weight_sum)
    assert np.abs(total / weight_sum - expected).max() <= bound
    assert weight_sum == pytest.approx(sum(steps.values()) / 1000, abs=1e-6)


def test_a_weight_above_the_max_weight_is_counted_as_it_and_said() -> None:
    """Nothing silently wrong: a site whose FedAvg weight exceeds max_weight reports it (metric and log)."""
    sites = {name: Site(name) for name in SITES}
    _key_exchange(sites)
    g = _global()
    metrics = {}
    for name, site in sites.items():
        SecAggRemember().process(_task(g), site.ctx)
        trained = {k: v + 0.01 for k, v in g.items()}
        sent = from_shareable(SecAggMask().process(_result(trained, 2000 if name == "site-1" else 10), site.ctx))
        metrics[name] = sent.meta[MetaKey.INITIAL_METRICS][WEIGHT_CAPPED_METRIC]
    assert metrics == {"site-1": 1.0, "site-2": 0.0, "site-3": 0.0}


def test_a_site_answers_each_stage_once_and_never_unmasks_twice() -> None:
    sites = {name: Site(name) for name in SITES}
    session = _key_exchange(sites)
    for name, site in sites.items():
        SecAggRemember().process(_task(_global()), site.ctx)
        dxo = from_shareable(SecAggMask().process(_result(_global(), 5), site.ctx))
        session.add_masked(
            name, np.concatenate([Layout.of(dxo.data).flatten(dxo.data, np.uint32), dxo.data[WEIGHT_SLOT]])
        )
    u3, dropped = session.unmask_request()
    first = sites["site-1"].ask(TOPIC_UNMASK, {"round": 0, "u3": u3, "dropped": dropped})
    again = sites["site-1"].ask(TOPIC_UNMASK, {"round": 0, "u3": u3, "dropped": dropped})
    assert first.get_return_code() == ReturnCode.OK
    assert again.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "holds no keys" in again[ERROR]
    # A server listing a site both as surviving and as dropped gets nothing.
    other = sites["site-2"].ask(TOPIC_UNMASK, {"round": 0, "u3": u3, "dropped": ["site-1"]})
    assert other.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and PAYLOAD not in other
