"""fedllm's .nemo tools on files NeMo itself writes, and NeMo restoring what fedllm writes (runs in .venv-nemo).

NeMo builds and saves a tiny Megatron-GPT (legacy: per-rank weights, as NVIDIA's public checkpoints;
Megatron-core: NeMo 2's distributed checkpoint); fedllm reads, converts and exports it; NeMo restores the
conversions — at tensor parallelism 2 under torchrun with gloo — and gives the source's logits.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedllm.checkpoint import convert, summarize
from fedllm.checkpoint.hf_export import export_hf
from tests.support.nemo_runs import VOCAB
from tests.support.nemo_runs import fedllm_cli as fedllm

pytest.importorskip("nemo", reason="NeMo runs in its own environment: make test-nemo (.venv-nemo)")
pytestmark = pytest.mark.nemo
REPO = Path(__file__).resolve().parents[2]


def nemo_logits(model: Path, out: Path, processes: int = 1) -> torch.Tensor:
    """The logits NeMo computes for fixed tokens after restoring `model` (under torchrun when it is TP > 1)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, "-m", "tests.support.nemo_logits", str(model), str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)["logits"][..., :VOCAB]  # the padding rows differ with the TP; the vocabulary must not


def test_fedllm_reads_nemos_distributed_checkpoint(nemo_models, tmp_path):
    info = fedllm("ckpt", "info", str(nemo_models["mcore"]))
    assert info.returncode == 0, info.stderr
    assert "mcore (distributed checkpoint) Megatron-GPT" in info.stdout and "2 layers, hidden 64" in info.stdout
    assert "136,960 (137 K) in 28 tensors" in info.stdout, info.stdout
    verified = fedllm("ckpt", "verify", str(nemo_models["mcore"]))
    assert verified.returncode == 0 and "CRCs intact" in verified.stdout, verified.stderr
    summary = summarize(nemo_models["mcore"])
    assert summary.tensors == 4 + 2 * 12 and summary.padded_vocab >= VOCAB


def test_the_hugging_face_export_of_nemos_checkpoint_gives_nemos_logits(nemo_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    want = nemo_logits(nemo_models["mcore"], tmp_path / "nemo.pt")
    folder = export_hf(nemo_models["mcore"], tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    from tests.support.nemo_logits import TOKENS

    with torch.no_grad():
        got = hf(torch.tensor(TOKENS)).logits
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["legacy", "mcore"])
def test_tp1_to_tp2_and_back_restored_by_nemo_keep_the_logits(nemo_models, tmp_path, layout):
    source = nemo_models[layout]
    want = nemo_logits(source, tmp_path / "source.pt")
    tp2 = convert(source, tmp_path / "tp2.nemo", 2, progress=False).target
    torch.testing.assert_close(nemo_logits(tp2, tmp_path / "tp2.pt", processes=2), want, rtol=1e-5, atol=1e-5)
    back = convert(tp2, tmp_path / "tp1.nemo", 1, progress=False).target
    torch.testing.assert_close(nemo_logits(back, tmp_path / "tp1.pt"), want, rtol=1e-5, atol=1e-5)
