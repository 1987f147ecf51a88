"""Secure aggregation's state machines, N simulated sites in one process: the unmasked sum is the weighted sum
within the stated bound, one site's masked vector says nothing about its update, dropouts before and after
masking are survived, and below the threshold every stage fails naming the sites and t."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from fedllm.flare.secagg import SecAggError, SecAggParams, ServerSession, SiteSession, ThresholdError, crypto
from tests.support.secagg import exact_weighted_sum, run_round

SITES = [f"site-{i}" for i in range(1, 6)]
SIZE = 20_000


def _updates(seed: int = 0, sites: list[str] = SITES) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Small deltas, as a round's update is, with a few elements beyond the clip so clamping is exercised."""
    rng = np.random.default_rng(seed)
    updates = {site: (rng.normal(0, 0.05, SIZE)).astype(np.float32) for site in sites}
    updates[sites[0]][:7] = 3.0
    weights = {site: float(w) for site, w in zip(sites, rng.integers(10, 400, len(sites)), strict=True)}
    return updates, weights


def _assert_weighted_mean(result, updates, weights, params, survivors) -> None:
    exact, exact_weight = exact_weighted_sum(updates, weights, params, survivors)
    bound = result.server.error_bound(result.weight_sum)
    assert 0 < bound < 1e-6  # the bound is tight enough to mean something
    weight_step = 2.0 ** -(crypto.weight_bits(len(result.server.u0)) + 1)
    assert abs(result.weight_sum - exact_weight) <= len(survivors) * weight_step
    error = np.max(np.abs(result.values / result.weight_sum - exact / exact_weight))
    assert bound / 10 < error <= bound, (error, bound)  # holds, and is not loose by orders of magnitude


def test_unmasked_sum_is_the_weighted_sum_within_the_bound() -> None:
    params = SecAggParams(threshold=3)
    updates, weights = _updates()
    result = run_round(updates, weights, params)
    assert result.values.dtype == np.float64 and result.values.shape == (SIZE,)
    _assert_weighted_mean(result, updates, weights, params, SITES)
    assert result.clamped == {"site-1": 7, "site-2": 0, "site-3": 0, "site-4": 0, "site-5": 0}
    assert all(m.dtype == np.uint32 and m.shape == (SIZE + 1,) for m in result.masked.values())


def test_a_weight_above_max_weight_counts_as_max_weight() -> None:
    params = SecAggParams(threshold=2, max_weight=100.0)
    updates, _ = _updates(sites=SITES[:3])
    weights = {"site-1": 50.0, "site-2": 100.0, "site-3": 5000.0}
    result = run_round(updates, weights, params)
    assert result.weight_sum == pytest.approx(2.5, abs=1e-8)
    _assert_weighted_mean(result, updates, weights, params, SITES[:3])


def _centered(masked: np.ndarray) -> np.ndarray:
    return masked.view(np.int32).astype(np.float64)


def _top_byte_chi2(masked: np.ndarray) -> float:
    counts = np.bincount(masked >> 24, minlength=256)
    expected = masked.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


def test_one_masked_vector_alone_is_independent_of_the_update() -> None:
    """What the server holds from one site: uncorrelated with the update and with a resend of it, uniform bytes."""
    params = SecAggParams(threshold=3)
    updates, weights = _updates(seed=2)
    updates["site-2"] = np.linspace(-0.9, 0.9, SIZE, dtype=np.float32)  # a strongly structured update
    first = run_round(updates, weights, params, round_num=0).masked["site-2"]
    resend = run_round(updates, weights, params, round_num=1).masked["site-2"]
    limit = 5 / math.sqrt(SIZE)  # five standard deviations of Pearson's r between independent vectors
    assert abs(np.corrcoef(_centered(first[:-1]), updates["site-2"])[0, 1]) < limit
    assert abs(np.corrcoef(_centered(first), _centered(resend))[0, 1]) < limit
    # χ² of the top byte against uniform, 255 degrees of freedom: the p = 1e-6 critical value (Wilson–Hilferty).
    k, z = 255, 4.753
    critical = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    assert _top_byte_chi2(first) < critical
    # The plain encoding, by contrast, is far from uniform: the test can tell.
    assert _top_byte_chi2(crypto.encode(updates["site-2"] * 0.1, 28)) > critical


def test_a_site_dropped_before_masking_is_left_out_of_the_sum() -> None:
    params = SecAggParams(threshold=3)
    updates, weights = _updates(seed=3)
    result = run_round(updates, weights, params, drop={"site-4": "mask"})
    survivors = [s for s in SITES if s != "site-4"]
    _assert_weighted_mean(result, updates, weights, params, survivors)


def test_a_site_dropped_after_masking_stays_in_the_sum() -> None:
    """Its vector was added; it does not answer the unmask, the others' shares still remove its self mask."""
    params = SecAggParams(threshold=3)
    updates, weights = _updates(seed=4)
    result = run_round(updates, weights, params, drop={"site-2": "reveal"})
    _assert_weighted_mean(result, updates, weights, params, SITES)


def test_dropouts_at_every_stage_in_one_round() -> None:
    params = SecAggParams(threshold=3)
    sites = [f"site-{i}" for i in range(1, 8)]
    updates, weights = _updates(seed=5, sites=sites)
    drop = {"site-1": "advertise", "site-3": "share_keys", "site-5": "mask", "site-7": "reveal"}
    result = run_round(updates, weights, params, drop=drop)
    assert result.server.u2 == ["site-2", "site-4", "site-5", "site-6", "site-7"]
    _assert_weighted_mean(result, updates, weights, params, ["site-2", "site-4", "site-6", "site-7"])


@pytest.mark.parametrize(
    ("stage", "drop", "answered"),
    [
        ("advertise", {"site-1": "advertise", "site-2": "advertise", "site-3": "advertise"}, ["site-4", "site-5"]),
        ("share_keys", {"site-2": "share_keys", "site-4": "share_keys", "site-5": "advertise"}, ["site-1", "site-3"]),
        ("mask", {"site-1": "mask", "site-5": "mask", "site-3": "mask"}, ["site-2", "site-4"]),
        ("unmask", {"site-1": "reveal", "site-5": "reveal", "site-3": "reveal"}, ["site-2", "site-4"]),
    ],
)
def test_below_the_threshold_each_stage_fails_naming_the_sites_and_t(
    stage: str, drop: dict[str, str], answered: list[str]
) -> None:
    params = SecAggParams(threshold=3)
    updates, weights = _updates(seed=6)
    with pytest.raises(ThresholdError) as caught:
        run_round(updates, weights, params, drop=drop, round_num=4)
    error = caught.value
    missing = sorted(set(SITES) - set(answered))
    assert (error.stage, error.round_num, error.threshold) == (stage, 4, 3)
    assert (error.answered, error.missing) == (answered, missing)
    message = str(error)
    assert f"round 4, stage {stage}" in message and "t=3" in message
    assert all(site in message for site in SITES)


def _staged(params: SecAggParams, names: list[str] = SITES[:4], job_id: str = "job-1"):
    """Sessions through stage 2 (shares routed), plus the routed blobs, for tests of single steps."""
    server = ServerSession(0, job_id, params, names)
    sites = {name: SiteSession(name, 0, job_id, params) for name in names}
    keys = server.collect_advertise({name: sites[name].advertise(names) for name in names})
    routed = server.collect_shares({name: sites[name].share_keys(keys) for name in names})
    return server, sites, routed


def test_mask_refuses_before_the_shares_arrived_and_a_second_time() -> None:
    params = SecAggParams(threshold=3)
    server, sites, routed = _staged(params)
    update = np.zeros(10, dtype=np.float32)
    with pytest.raises(SecAggError, match="needs 'received'"):
        sites["site-1"].mask(update, 1.0)
    sites["site-1"].receive_shares(routed["site-1"], server.u2)
    sites["site-1"].mask(update, 1.0)
    with pytest.raises(SecAggError, match="needs 'received'"):
        sites["site-1"].mask(update, 1.0)


def test_mask_refuses_a_non_finite_update_rather_than_send_it() -> None:
    params = SecAggParams(threshold=3)
    server, sites, routed = _staged(params)
    sites["site-1"].receive_shares(routed["site-1"], server.u2)
    update = np.zeros(10, dtype=np.float32)
    update[3] = np.nan
    with pytest.raises(SecAggError, match="1 non-finite"):
        sites["site-1"].mask(update, 1.0)


def _masked_all(server, sites, routed) -> None:
    for name, site in sites.items():
        site.receive_shares(routed[name], server.u2)
        server.add_masked(name, site.mask(np.ones(10, dtype=np.float32) * 0.1, 10.0)[0])


def test_reveal_refuses_overlapping_or_incomplete_sets_and_a_second_call() -> None:
    params = SecAggParams(threshold=2)
    server, sites, routed = _staged(params)
    _masked_all(server, sites, routed)
    site = sites["site-1"]
    with pytest.raises(SecAggError, match=r"\['site-2'\] are listed both"):
        site.reveal(["site-1", "site-2", "site-3", "site-4"], ["site-2"])
    with pytest.raises(SecAggError, match="do not make U2"):
        site.reveal(["site-1", "site-2"], ["site-3"])
    with pytest.raises(SecAggError, match="lists it as dropped"):
        site.reveal(["site-2", "site-3", "site-4"], ["site-1"])
    revealed = site.reveal(["site-1", "site-2", "site-4"], ["site-3"])
    assert {peer: len(share) for peer, share in revealed.items()} == {
        "site-1": 16,  # self-mask seed shares for U3 (its own included) …
        "site-2": 16,
        "site-4": 16,
        "site-3": 32,  # … and the mask-key share for the dropped site only: never both for one peer
    }
    with pytest.raises(SecAggError, match="needs 'masked'"):
        site.reveal(["site-1", "site-2", "site-3", "site-4"], [])  # a second reveal could give the other share


def test_a_site_refuses_to_reveal_when_u3_is_below_the_threshold() -> None:
    params = SecAggParams(threshold=3)
    server, sites, routed = _staged(params)
    _masked_all(server, sites, routed)
    with pytest.raises(ThresholdError, match="stage reveal") as caught:
        sites["site-1"].reveal(["site-1", "site-2"], ["site-3", "site-4"])
    assert caught.value.missing == ["site-3", "site-4"]


def test_a_share_replayed_to_another_recipient_or_relabelled_fails() -> None:
    params = SecAggParams(threshold=3)
    server, sites, routed = _staged(params)
    for_site_2 = routed["site-2"]["site-1"]  # what site-1 sealed for site-2
    replayed = dict(routed["site-3"], **{"site-1": for_site_2})  # handed to site-3 as site-1's
    with pytest.raises(SecAggError, match="authentication"):
        sites["site-3"].receive_shares(replayed, server.u2)
    relabelled = dict(routed["site-2"], **{"site-1": routed["site-2"]["site-4"], "site-4": for_site_2})
    with pytest.raises(SecAggError, match="authentication"):
        sites["site-2"].receive_shares(relabelled, server.u2)


def test_a_share_from_another_job_or_round_fails() -> None:
    params = SecAggParams(threshold=3)
    server, sites, routed = _staged(params, job_id="job-A")
    other = copy.copy(sites["site-2"])  # the same keys and state; only the job differs
    other.job_id = "job-B"
    with pytest.raises(SecAggError, match="authentication"):
        other.receive_shares(routed["site-2"], server.u2)


def test_the_server_refuses_a_vector_twice_from_an_unknown_site_or_of_another_length() -> None:
    params = SecAggParams(threshold=3)
    server, _, _ = _staged(params)
    vector = np.zeros(11, dtype=np.uint32)
    server.add_masked("site-1", vector)
    with pytest.raises(SecAggError, match="second masked vector"):
        server.add_masked("site-1", vector)
    with pytest.raises(SecAggError, match="not in U2"):
        server.add_masked("site-9", vector)
    with pytest.raises(SecAggError, match="12 elements"):
        server.add_masked("site-2", np.zeros(12, dtype=np.uint32))
    with pytest.raises(SecAggError, match="uint32"):
        server.add_masked("site-2", np.zeros(11, dtype=np.float32))


def test_keys_are_fresh_every_round() -> None:
    params = SecAggParams(threshold=2)
    first = SiteSession("site-1", 0, "job-1", params).advertise(SITES[:3])
    second = SiteSession("site-1", 1, "job-1", params).advertise(SITES[:3])
    assert first["c_pk"] != second["c_pk"] and first["s_pk"] != second["s_pk"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1}, "threshold must be an integer ≥ 2"),
        ({"threshold": 3, "clip": 0.0}, "clip must be a finite number > 0"),
        ({"threshold": 3, "max_weight": float("inf")}, "max_weight must be a finite number > 0"),
    ],
)
def test_params_refuse_unsafe_values(kwargs: dict, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        SecAggParams(**kwargs)
