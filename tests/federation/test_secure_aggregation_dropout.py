"""Secure aggregation with sites that die mid-round (5 sites, threshold 3): the round survives down to t, not below.

The sites start with FEDLLM_SITE_FAULT (fedllm.flare.faults.site_crash_point): in round 0 of every secure job,
site-4 (its parent and job processes) is SIGKILLed when the server asks for its unmasking shares, after its
masked update was sent, and site-5 in its mask filter, before anything was sent: lost sites, as when their
machines die. They are restarted between jobs.

NVFlare 2.9 itself marks a job FINISHED:ABNORMAL once a lost site's heartbeat times out ("terminal outcome
unavailable from site-5: client dead"), whatever min_clients says; the site config's heartbeat timeout is 45 s
here, so that verdict comes after the round (which needs 5 s of waiting plus a 10 s unmasking timeout) is done. The server captures what it receives (FEDLLM_CAPTURE_DIR), so a
plain job of the same seed gives each site's true weights to check the aggregate against.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from fedllm.apps.local_federation import local_federation
from fedllm.config import load_site_config
from fedllm.flare.capture import CAPTURE_ENV, META_ENTRY
from fedllm.flare.faults import SITE_FAULT_ENV
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.secure_agg import SecureAggregation
from fedllm.jobs.submit import COMPLETED, JobFailed, submit_job
from fedllm.jobs.template import load_template, template_path
from fedllm.results.metrics import load_global_state
from fedllm.runtime import native
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.sites import environment, local_config_dict, write_yaml

pytestmark = pytest.mark.federation

FAULTS = "site-4@secagg-unmask:0,site-5@secagg-mask:0"
QUICK = {"stage_timeout_s": 10.0, "wait_after_min_s": 5}  # NVFlare gives a dead site up after 2·10 + 5 s
BOUND_LINE = re.compile(r"fixed-point error ≤ ([0-9.e+-]+) per value")


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """A 5-site federation with the fault points armed and the server's capture hook on; (kits, capture, out)."""
    root = tmp_path_factory.mktemp("secagg5")
    config = local_config_dict(project="secagg5", sites=5)
    config["server"]["heartbeat_timeout_s"] = 45
    cfg = load_site_config(write_yaml(root / "site.yaml", config))
    write_demo_data([root / "data" / s for s in cfg.site_names], root / "data" / "val.npz")
    # The sites' processes inherit both when they start.
    with (
        environment({CAPTURE_ENV: str(root / "capture"), SITE_FAULT_ENV: FAULTS}),
        local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=lambda _m: None) as fed,
    ):
        yield fed.kits, root / "capture", root
    assert not any(native.status(fed.kits).values()), "federation processes survived `down`"


def _run(kits, out, name: str, secure: SecureAggregation | None):
    # Without the final evaluation: it would wait for the lost sites until NVFlare gives them up (heartbeat: 120 s).
    data = yaml.safe_load(template_path("demo-mlp").read_text())
    template = load_template(write_yaml(out / "demo-mlp-noeval.yaml", {**data, "final_evaluation": False}))
    spec = resolve_spec(template, "fedavg", num_clients=5, rounds=1, name=name, secure_agg=secure)
    return submit_job(kits, create_job(spec, out / "jobs"), download=out / "r", timeout=600, echo=lambda _m: None)


def test_a_site_lost_after_masking_and_one_before_still_give_the_right_aggregate(five) -> None:
    kits, capture, out = five
    plain = _run(kits, out, "dropout-plain", None)  # no secure aggregation: no fault point on its path
    assert plain.status == COMPLETED
    with pytest.raises(JobFailed) as lost:
        _run(kits, out, "dropout-secure", SecureAggregation(**QUICK))
    secure = lost.value
    _restart_lost_sites(kits)
    # The round completed; NVFlare then failed the job for its two lost sites (see the module doc), not for more.
    assert secure.status == "FINISHED:ABNORMAL" and secure.result_dir is not None, str(secure)
    server_log = (kits.prod_dir / kits.config.server.name / "log.txt").read_text(errors="replace")
    verdicts = re.findall(
        rf"Failing job {secure.job_id}: terminal outcome unavailable from (site-\d): client dead", server_log
    )
    assert set(verdicts) <= {"site-4", "site-5"} and verdicts, server_log[-3000:]

    log = (secure.result_dir / "workspace" / "log.txt").read_text(errors="replace")
    assert "Finished FedAvg." in log
    assert "4 masked updates (['site-1', 'site-2', 'site-3', 'site-4'])" in log
    assert "dropped after the key exchange: ['site-5']" in log
    assert "unmasked with 3 sites' shares" in log  # site-4 died instead of answering
    (bound,) = (float(b) for b in BOUND_LINE.findall(log))

    # What the four sites that sent trained, in the clear, from the plain job's capture (same seed, same start):
    # every site has 300 examples, so FedAvg's weights are equal and the aggregate is their mean.
    sent = [_weights(capture / plain.job_id / "0" / f"site-{k}.npz") for k in (1, 2, 3, 4)]
    expected = {name: np.mean([s[name] for s in sent], axis=0) for name in sent[0]}
    got = load_global_state(secure.result_dir)
    worst = max(float(np.abs(got[k].double().numpy() - expected[k]).max()) for k in expected)
    spacing = max(float(np.spacing(np.float32(np.abs(v).max()))) for v in expected.values())
    print(f"max |secure - mean of sites 1-4| = {worst:.3g}; bound {bound:.3g} (+ float32 {spacing:.3g})")
    assert worst <= bound + spacing
    # ...and not the mean of all five (site-5's update is not in it).
    fifth = _weights(capture / plain.job_id / "0" / "site-5.npz")
    all_five = np.mean([*(s["net.0.weight"] for s in sent), fifth["net.0.weight"]], axis=0)
    assert np.abs(got["net.0.weight"].double().numpy() - all_five).max() > 100 * (bound + spacing)


def test_below_the_threshold_the_round_fails_naming_the_sites_and_t(five) -> None:
    kits, _capture, out = five
    _restart_lost_sites(kits)  # whatever ran before
    with pytest.raises(JobFailed) as failed:
        _run(kits, out, "dropout-threshold", SecureAggregation(threshold=4, **QUICK))
    log = (failed.value.result_dir / "workspace" / "log.txt").read_text(errors="replace")
    message = (
        "secure aggregation, round 0, stage unmask: 3 site(s) answered (site-1, site-2, site-3), fewer than the "
        "threshold t=4; missing: site-4, site-5"
    )
    assert message in log
    print(str(failed.value))


def _restart_lost_sites(kits) -> None:
    """`fedllm up` again: start the sites a fault point killed (nothing to do when all run)."""
    if not all(native.status(kits).values()):
        native.up(kits, echo=lambda _m: None)


def _weights(path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k].astype(np.float64) for k in npz.files if k != META_ENTRY}
