"""The NeMo backend on a real GPU: one FL round of p-tuning through a real server and site (docs/nemo.md).

Skipped unless NeMo (in range) and a CUDA GPU are present; never emulated.
"""

from __future__ import annotations

import math

import pytest

from fedllm.training.nemo.compat import require_nemo_nlp
from fedllm.training.nemo.errors import NemoUnavailableError


def _gpu_and_nemo() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU"
        require_nemo_nlp()
    except NemoUnavailableError as exc:
        return str(exc)
    return None


@pytest.mark.gpu
@pytest.mark.federation
def test_one_round_of_ptuning_on_a_gpu(tmp_path, capsys):
    reason = _gpu_and_nemo()
    if reason:
        pytest.skip(f"needs NeMo and a GPU: {reason}")
    from fedllm.apps.gpu_proof import main
    from fedllm.results.metrics import read_round_metrics

    main(["--workspace", str(tmp_path), "--sites", "1", "--rounds", "1", "--per-site", "200"])
    (result,) = (tmp_path / "results").iterdir()
    (rnd,) = read_round_metrics(result)
    m = rnd["sites"]["site-1"]
    assert m["train_steps"] > 0 and math.isfinite(m["val_loss"])  # trained, the loss is a finite number
    assert m["bytes_sent"] == 4 * (10 * 1024 + 2 * 1024 * 2048 + 2048 + 1024)
    assert m["gpu_max_memory_gib"] > 0
