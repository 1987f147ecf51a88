"""One secure-aggregation round between N simulated sites and the server, in one process (no NVFlare).

The messages go exactly as the server would relay them; ``drop`` says at which stage a site stops
answering, so tests can take sites away before advertising, before sharing keys, before masking (its
vector never arrives) or before revealing (its vector is in the sum, it does not answer the unmask).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedllm.flare.secagg import SecAggParams, ServerSession, SiteSession

STAGES = ("advertise", "share_keys", "mask", "reveal")


@dataclass
class Round:
    server: ServerSession
    sites: dict[str, SiteSession]
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    clamped: dict[str, int] = field(default_factory=dict)
    values: np.ndarray | None = None
    weight_sum: float | None = None


def exact_weighted_sum(
    updates: dict[str, np.ndarray], weights: dict[str, float], params: SecAggParams, sites: list[str]
) -> tuple[np.ndarray, float]:
    """Σ w_k·clamp(update_k) and Σ w_k in float64 over ``sites``: what secure aggregation must return."""
    total = np.zeros(len(next(iter(updates.values()))), dtype=np.float64)
    weight_sum = 0.0
    for site in sites:
        w = min(1.0, weights[site] / params.max_weight)
        total += w * np.clip(updates[site].astype(np.float64), -params.clip, params.clip)
        weight_sum += w
    return total, weight_sum


def run_round(
    updates: dict[str, np.ndarray],
    weights: dict[str, float],
    params: SecAggParams,
    *,
    drop: dict[str, str] | None = None,
    round_num: int = 0,
    job_id: str = "job-1",
) -> Round:
    """Run every stage; a site in ``drop`` stops answering at that stage (one of STAGES)."""
    drop = drop or {}
    assert set(drop.values()) <= set(STAGES), drop
    names = sorted(updates)
    server = ServerSession(round_num, job_id, params, names)
    sites = {name: SiteSession(name, round_num, job_id, params) for name in names}
    result = Round(server, sites)

    def answers(name: str, stage: str) -> bool:
        return name not in drop or STAGES.index(drop[name]) > STAGES.index(stage)

    replies = {name: sites[name].advertise(names) for name in names if answers(name, "advertise")}
    keys = server.collect_advertise(replies)
    shares = {name: sites[name].share_keys(keys) for name in keys if answers(name, "share_keys")}
    routed = server.collect_shares(shares)
    for name in server.u2:
        sites[name].receive_shares(routed[name], server.u2)
    for name in server.u2:
        if answers(name, "mask"):
            result.masked[name], result.clamped[name] = sites[name].mask(updates[name], weights[name])
            server.add_masked(name, result.masked[name])
    u3, dropped = server.unmask_request()
    reveals = {name: sites[name].reveal(u3, dropped) for name in u3 if answers(name, "reveal")}
    result.values, result.weight_sum = server.finish(reveals)
    return result
