"""A model state past NVFlare's 2 GB single-message limit crosses with fedllm's default settings."""

from __future__ import annotations

import pytest

from tests.support.exchange import echo_federation, echo_job

pytestmark = pytest.mark.federation

# 2.05 GiB = 2.2 GB of fp32 weights: more than max_message_size (2 GiB) and than a signed 32-bit length,
# in one tensor (an LLM's embedding can be one): it crosses in download-chunk-sized slices.
SIZE_MIB = 2100


def test_state_over_2gb_crosses_both_ways(tmp_path):
    with echo_federation(tmp_path / "fed", sites=1) as fed:
        # Two rounds with --verify: round 0 checks server → site; round 1's weights are the server's
        # aggregate of the site's round-0 echo, so its check covers site → server too.
        job = echo_job(tmp_path / "jobs", SIZE_MIB, sites=1, rounds=2, name="echo-2gb", tensor_mib=SIZE_MIB)
        result = fed.submit(job, timeout=900, echo=lambda _m: None)
        assert result.ok, result.status
        site_log = (fed.kits.site("site-1") / result.job_id / "log.txt").read_text(errors="replace")
        assert "round 1: weights verified" in site_log, site_log[-3000:]
