"""Secure aggregation through a real federation (3 sites, mTLS): the same aggregate, and a server that sees noise.

The server runs with FEDLLM_CAPTURE_DIR, so its ResultCapture hook (fedllm.flare.capture) saves each site's
`train` result as the server's job process receives it, before any fedllm code. The same seeded demo job runs
three times: plain, secure, and secure again (the same plaintext update under fresh keys: a resend).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedllm.apps.local_federation import local_federation
from fedllm.config import load_site_config
from fedllm.flare.capture import CAPTURE_ENV, META_ENTRY
from fedllm.flare.secagg.vectors import WEIGHT_SLOT
from fedllm.flare.server_models import TinyClassifier
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.secure_agg import SecureAggregation
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template, template_path
from fedllm.results.metrics import load_global_state, read_round_metrics
from fedllm.runtime import native
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.sites import environment, local_config_dict, write_yaml

pytestmark = pytest.mark.federation

HIDDEN = 1024  # 12,291 parameters: enough values for the statistics below to mean something
BOUND_LINE = re.compile(r"fixed-point error ≤ ([0-9.e+-]+) per value")


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A 3-site federation whose server captures what it receives; (kits, data root, capture dir)."""
    root = tmp_path_factory.mktemp("secagg")
    capture = root / "capture"
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="secagg")))
    write_demo_data([root / "data" / s for s in cfg.site_names], root / "data" / "val.npz")
    # the server (and sites) inherit it when they start
    with (
        environment({CAPTURE_ENV: str(capture)}),
        local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=lambda _m: None) as fed,
    ):
        yield fed.kits, root, capture
    assert not any(native.status(fed.kits).values()), "federation processes survived `down`"


@pytest.fixture(scope="module")
def runs(trio, tmp_path_factory):
    """The same seeded 1-round job plain, secure, and secure again: each one's result folder and job id."""
    kits, _root, _capture = trio
    out = tmp_path_factory.mktemp("secagg-jobs")
    template = _wide_template(out)
    results = {}
    for name, secure in (("plain", None), ("secure", SecureAggregation()), ("resend", SecureAggregation())):
        spec = resolve_spec(template, "fedavg", rounds=1, name=f"secagg-{name}", secure_agg=secure)
        result = submit_job(kits, create_job(spec, out / "jobs"), download=out / "r", timeout=600, echo=lambda _m: None)
        assert result.status == COMPLETED, name
        results[name] = result
    return results


def _wide_template(folder: Path):
    """demo-mlp with a wider hidden layer (the same seeded initial model in every job)."""
    data = yaml.safe_load(template_path("demo-mlp").read_text())
    data["name"] = "demo-mlp-wide"
    data["initial_model"]["args"]["hidden"] = HIDDEN
    return load_template(write_yaml(folder / "demo-mlp-wide.yaml", yaml.safe_dump(data)))


def _initial() -> dict[str, np.ndarray]:
    model = TinyClassifier(in_features=8, hidden=HIDDEN, classes=3, seed=0)
    return {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _captured(capture: Path, job_id: str, site: str = "site-1") -> tuple[dict[str, np.ndarray], dict]:
    with np.load(capture / job_id / "0" / f"{site}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != META_ENTRY}
        meta = json.loads(str(npz[META_ENTRY]))
    return arrays, meta


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in sorted(arrays) if k != WEIGHT_SLOT])


def _server_bound(result) -> float:
    log = (result.result_dir / "workspace" / "log.txt").read_text(errors="replace")
    found = BOUND_LINE.findall(log)
    assert len(found) == 1, "one secure round, one error bound in the server's log"
    return float(found[0])


def test_secure_aggregate_equals_plain_fedavg_within_the_fixed_point_bound(runs) -> None:
    plain = load_global_state(runs["plain"].result_dir)
    secure = load_global_state(runs["secure"].result_dir)
    bound = _server_bound(runs["secure"])
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
    # Both globals are stored as float32: each side may round once more, by half a float32 spacing.
    spacing = max(float(np.spacing(np.float32(plain[k].abs().max()))) for k in plain)
    print(f"max |secure - plain| = {worst:.3g}; the server's fixed-point bound {bound:.3g} (+ float32 {spacing:.3g})")
    assert worst <= bound + spacing
    assert worst > 0 or bound > 0  # the comparison is of two real, separately computed aggregates
    site_metrics = read_round_metrics(runs["secure"].result_dir)[0]["sites"]
    assert {m["secagg_clamped"] for m in site_metrics.values()} == {0.0}, "a clamped update would not match"
    assert set(site_metrics) == {"site-1", "site-2", "site-3"}


def test_what_the_server_receives_is_independent_of_the_update(runs, trio) -> None:
    _kits, _root, capture = trio
    plain, plain_meta = _captured(capture, runs["plain"].job_id)
    first, meta = _captured(capture, runs["secure"].job_id)
    resend, _ = _captured(capture, runs["resend"].job_id)
    initial = _initial()
    update = _flat({k: plain[k].astype(np.float64) - initial[k] for k in initial})
    assert np.abs(update).max() > 0, "the plain run's capture holds site-1's real, trained weights"
    assert plain_meta["data_kind"] == "WEIGHTS" and plain_meta["NUM_STEPS_CURRENT_ROUND"] > 1

    assert all(a.dtype == np.uint32 for a in first.values()), "nothing but ring elements reaches the server"
    assert meta["data_kind"] == "WEIGHT_DIFF" and meta["NUM_STEPS_CURRENT_ROUND"] == 1
    received, again = _centered(_flat(first)), _centered(_flat(resend))
    n = received.size
    assert n == update.size == sum(v.size for v in initial.values())
    limit = 5 / math.sqrt(n)
    r_update = float(np.corrcoef(received, update)[0, 1])
    r_resend = float(np.corrcoef(received, again)[0, 1])
    chi2 = _top_byte_chi2(_flat(first))
    critical = _chi2_critical(255, z=3.090)  # p = 1e-3
    print(f"n={n}: r(received, update)={r_update:.4f}, r(received, resend)={r_resend:.4f} (|r| < {limit:.4f}); "
          f"top-byte chi2={chi2:.1f} (uniform rejected above {critical:.1f})")  # fmt: skip
    assert abs(r_update) < limit
    assert abs(r_resend) < limit
    assert chi2 < critical
    assert not np.array_equal(_flat(first), _flat(resend)), "fresh keys every job and round"


def _centered(ring: np.ndarray) -> np.ndarray:
    """uint32 ring elements as signed values around 0 (two's complement), as floats."""
    return ring.astype(np.uint32).view(np.int32).astype(np.float64)


def _top_byte_chi2(ring: np.ndarray) -> float:
    counts = np.bincount((ring.astype(np.uint32) >> 24).astype(np.int64), minlength=256)
    expected = ring.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_critical(dof: int, z: float) -> float:
    """Wilson–Hilferty: the χ² quantile of `dof` degrees of freedom at the normal quantile z (±0.1% at dof 255)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
