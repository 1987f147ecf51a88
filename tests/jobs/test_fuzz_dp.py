"""Fuzzing `fedllm job create --dp` and the sites' privacy ledger (issue 28's rules, issue 27's inputs).

Any `--dp` text ends in a job whose plan holds (σ, q, steps, ε per round) or in fedllm's one-line error, with no
partial job folder; a damaged ledger file is read back whole and unchanged, or refused, never reset to ε = 0.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fedllm.training.dp import DPError, DPSettings, PrivacyLedger
from tests.support.cli_fuzz import FUZZ_SETTINGS, assert_clean, assert_no_partial_output, corrupted, run_cli, snapshot

KEYS = st.sampled_from(["epsilon", "delta", "noise", "clip", "sample_rate", "accountant", "eps", "", "epsilon "])
VALUES = st.sampled_from(["8", "1e-5", "0", "-1", "nan", "inf", "1e-300", "0.1", "2", "abc", "", "rdp", "1,5", "="])
ITEMS = st.tuples(KEYS, st.sampled_from(["=", "", "=="]), VALUES).map("".join)


@FUZZ_SETTINGS
@given(items=st.lists(ITEMS, min_size=0, max_size=4))
def test_any_dp_text_makes_a_job_or_a_clean_error(items: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "jobs"
        out.mkdir()
        before = snapshot(out)
        outcome = run_cli(["job", "create", "demo-mlp", "--rounds", "2", "--out", out, "--dp", ",".join(items)])
        assert_clean(outcome, allowed=(0, 1))
        assert_no_partial_output(outcome, out, before)
        if outcome.code == 0:
            assert "ε after each round: 0: " in outcome.out, outcome.text


SETTINGS = DPSettings(delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.1)


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_damaged_ledger_reads_back_whole_or_is_refused(data) -> None:
    ledger = PrivacyLedger()
    for rnd in range(3):
        ledger.record(SETTINGS, 10, rnd)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dp-ledger.json"
        ledger.save(path)
        damaged = data.draw(corrupted(path.read_bytes()))
        path.write_bytes(damaged)
        try:
            loaded = PrivacyLedger.load(path)
        except DPError as exc:
            assert str(path) in str(exc)
            return
        assert loaded == ledger  # only a change the check cannot see (whitespace) reads back
