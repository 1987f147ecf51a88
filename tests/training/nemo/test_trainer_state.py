"""A NeMo site's trainer state across rounds and into a continuation, on real NeMo (runs in .venv-nemo).

A run of rounds 0-2 (one trainer process, the state kept in memory from round to round, as the seeds'
RestoreState keeps it) against a new process that starts at round 1 from round 0's snapshot on disk, as
a continuation job's site does: every step's LR, Adam step count and loss, and what round 2 sends, are
the same. Without the snapshot Adam and the warmup would start over, and SFT would reread its first
samples (NeMo's loader starts at sample 0 on every fit()).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.nemo_runs import sentiment_data, sft_data

pytest.importorskip("nemo", reason="NeMo runs in its own environment: make test-nemo (.venv-nemo)")
pytestmark = pytest.mark.nemo

ROUNDS = 3
REPO = Path(__file__).resolve().parents[3]


def _rounds(kind: str, model: Path, data: Path, work: Path, first: int) -> list[dict]:
    # The site's trainer writes its outputs in its working directory (NVFlare's job workspace): run it in `work`.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "-m", "tests.support.nemo_rounds", kind, str(model), str(data), str(work), str(first), str(ROUNDS)],
        capture_output=True, text=True, cwd=work, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((work / f"steps-{first}.json").read_text())


@pytest.mark.parametrize("kind", ["ptuning", "sft"])
def test_a_continuation_trains_what_the_uninterrupted_site_trains(kind, nemo_models, tmp_path):
    data = tmp_path / "data"
    sentiment_data(data, ["site-1"])
    sft_data(data, ["site-1"])
    model = nemo_models["legacy" if kind == "ptuning" else "mcore"]
    whole = _rounds(kind, model, data, tmp_path, 0)
    per_round = len(whole) // ROUNDS
    # Across rounds in one process: Adam's step count and the LR schedule go on (no second warmup).
    assert [s["adam_step"] for s in whole] == list(range(1, ROUNDS * per_round + 1))
    assert whole[per_round]["lr"] > whole[per_round - 1]["lr"] > whole[0]["lr"], "warmup 50 steps: still rising"

    continued = _rounds(kind, model, data, tmp_path, 1)
    assert continued == whole[per_round:], "the continuation's steps (LR, Adam step, loss) differ"
    sent, resent = torch.load(tmp_path / "sent-2.pt"), torch.load(tmp_path / "resent-2.pt")
    assert all(torch.equal(sent[k], resent[k]) for k in sent)
    assert not (tmp_path / "state" / "lineage" / "round-2").exists(), "no round follows the last: no snapshot of it"
