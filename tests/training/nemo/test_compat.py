"""The NeMo version guard: which nemo_toolkit the backend accepts, and what it says otherwise."""

from __future__ import annotations

import pytest

from fedllm.training.nemo.compat import require_nemo_nlp
from fedllm.training.nemo.errors import NemoUnavailableError


def test_nemo_version_guard_messages():
    with pytest.raises(NemoUnavailableError, match="cannot read the NeMo version"):
        require_nemo_nlp("", nlp_present=True)
    with pytest.raises(NemoUnavailableError, match=r"2\.5\.3 is installed.*>=2\.2,<2\.5\.1.*no longer ship"):
        require_nemo_nlp("2.5.3", nlp_present=False)
    with pytest.raises(NemoUnavailableError, match=r"2\.1\.0"):
        require_nemo_nlp("2.1.0", nlp_present=True)
    with pytest.raises(NemoUnavailableError, match=r"without nemo\.collections\.nlp"):
        require_nemo_nlp("2.4.1", nlp_present=False)
    assert require_nemo_nlp("2.4.1", nlp_present=True) == "2.4.1"
    assert require_nemo_nlp("2.5.0rc1", nlp_present=True) == "2.5.0rc1"  # the last release with the classes


def test_the_cpu_layer_never_touches_a_machine_with_a_gpu(monkeypatch):
    import torch

    from fedllm.training.nemo import cpu_layer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda_calls = (torch.cuda.current_device, torch.cuda.set_device, torch.nn.Module.cuda)
    assert cpu_layer.activate() == {} or cpu_layer.active(), "it returned shims on a GPU machine"
    if not cpu_layer.active():  # (in a process where it was activated before, it stays what it was)
        assert (torch.cuda.current_device, torch.cuda.set_device, torch.nn.Module.cuda) == cuda_calls


def test_nemo_absent_in_this_environment_is_reported():
    try:
        import nemo  # noqa: F401
    except ImportError:
        with pytest.raises(NemoUnavailableError, match="not installed"):
            require_nemo_nlp()
    else:
        pytest.skip("NeMo is installed in this environment; the absent case cannot be shown here")


# ---- in the NeMo environment: each fix against NeMo itself -------------------------------------------------

# What NeMo raises without the fix (the probe prints "UNFIXED <type>: <message> [<file>:<line>]").
UNFIXED = {
    "nvidia_pytorch_version": r"TypeError: expected string or bytes-like object",
    "deprecation_sleep": r"RuntimeError: deprecated_warning slept [2-9]\.\d s",
    "dataset_helpers_python": r"RuntimeError: make failed",
    "apex_gate": r"ImportError: Apex was not found",
    "apex_only_names": r"NameError: name 'set_defaults_if_not_set_tensor_model_parallel_attributes' is not defined",
    "clip_grads_without_apex": r"NameError: name 'multi_tensor_applier' is not defined",
    "eager_layer_specs": r"NameError: name 'TESpecProvider' is not defined",
    "per_rank_norm_names": r"RuntimeError: Error\(s\) in loading state_dict",
    "process_groups_before_build": r"AttributeError: 'NoneType' object has no attribute 'size'",
    "prompt_learning_batches": r"ValueError: too many values to unpack",
    "prompt_learning_loss_signature": r"TypeError: .*loss_func\(\) missing 1 required positional argument",
    "prompt_learning_generation_mask": r"RuntimeError: The size of tensor a \(\d+\) must match the size of tensor b",
    "generation_imports_multimodal": r"NameError: name 'InterpolationMode' is not defined",
    "legacy_gpt_config_get": r"AttributeError: 'ModelParallelConfig' object has no attribute 'get'",
    "legacy_gpt_without_apex": r"NameError: name 'MixedFusedLayerNorm' is not defined",
}


# One process per group; in each, the order in which NeMo's code meets the bugs.
GROUPS = {
    "building a Megatron-core GPT": ["apex_gate", "nvidia_pytorch_version", "eager_layer_specs",
                                     "process_groups_before_build"],
    "an SFT step": ["apex_only_names", "clip_grads_without_apex"],
    "a p-tuning step, then generation": ["prompt_learning_batches", "prompt_learning_loss_signature",
                                         "generation_imports_multimodal", "prompt_learning_generation_mask"],
    "a legacy GPT": ["legacy_gpt_config_get", "legacy_gpt_without_apex"],
    "a per-rank Megatron-core checkpoint": ["per_rank_norm_names"],
    "warnings and the dataset helpers' build": ["deprecation_sleep", "dataset_helpers_python"],
}  # fmt: skip


def test_every_fix_is_shown_failing_and_fixed():
    from fedllm.training.nemo.compat import NEMO_FIXES

    listed = [fix for group in GROUPS.values() for fix in group]
    assert sorted(listed) == sorted(UNFIXED) == sorted(f.name for f in NEMO_FIXES)


@pytest.mark.nemo
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_nemo_fails_without_each_fix_and_works_with_them(group, tmp_path):
    """NeMo's own workloads (a GPT build, a p-tuning or SFT step, generation) without each fix, then with it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("nemo", reason="NeMo runs in its own environment: make test-nemo (.venv-nemo)")
    repo = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.nemo_probe", str(tmp_path), *GROUPS[group]],
        capture_output=True, text=True, timeout=900, cwd=repo,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    seen = {}
    for line in done.stdout.splitlines():
        state, _, rest = line.partition(" ")
        if state in ("UNFIXED", "FIXED"):
            fix, _, outcome = rest.partition(" ")
            seen[(state, fix)] = outcome
    for fix in GROUPS[group]:
        assert re.match(UNFIXED[fix], seen[("UNFIXED", fix)]), f"without {fix}: {seen[('UNFIXED', fix)]}"
        assert seen[("FIXED", fix)] == "ok", f"with every fix, {fix}'s workload: {seen[('FIXED', fix)]}"
