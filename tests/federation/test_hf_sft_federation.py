"""Hugging Face SFT and LoRA through the real federation: TRL's SFTTrainer under NVFlare's HF integration.

- a 1-site, 1-round FedAvg job on a 2-process (torchrun, gloo) site yields the weights of the same
  Trainer run without NVFlare on 2 processes (DDP), within fp32 rounding of FedAvg's weighted mean;
- every round starts from the received global adapter, not the site's own (the "zig-zag": the
  training loss jumps back up at each round's first step when the sites' data disagree);
- the sites' curves reach the server's TensorBoard, the final global model is evaluated by every site.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records
from fedllm.jobs.create import cli_args, create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_final_evaluation, read_round_metrics, read_site_scalars
from fedllm.training.hf.tiny_gpt import build_tiny_gpt
from fedllm.training.lineage import STATE_ROOT

pytestmark = pytest.mark.federation

# Small and fast on 2 CPU cores; logging every step so each round's first training loss is visible.
ARGS = {
    "lr": 0.003,
    "batch_size": 8,
    "grad_accum": 1,
    "max_length": 64,
    "logging_steps": 1,
    "gradient_checkpointing": False,
    "cpu_threads": 1,
}


def _pairs(n: int, seed: int, label: str | None = None) -> list[dict[str, str]]:
    # The tiny GPT was pretrained on "<sentence> sentiment: <label>": the answer format is familiar, the task is not.
    return [{"input": f"{r['sentence']} sentiment:", "output": label or r["label"]} for r in sentiment_records(n, seed)]


@pytest.fixture(scope="module")
def sft(data_root: Path) -> dict:
    root = data_root / "sft"
    files = {
        root / "shared.jsonl": _pairs(48, 1),
        root / "validation.jsonl": _pairs(16, 2),
        # Same inputs, opposite answers: a site's own adapter and the average of both differ a lot.
        root / "site-1.jsonl": _pairs(48, 3, "positive"),
        root / "site-2.jsonl": _pairs(48, 3, "negative"),
    }
    write_jsonl_files(files)
    return {"model": str(build_tiny_gpt(log=lambda _m: None)), "root": root, "val": str(root / "validation.jsonl")}


def test_one_site_one_round_on_two_ranks_equals_the_same_ddp_trainer_without_nvflare(
    federation, sft: dict, tmp_path: Path
) -> None:
    args = {**ARGS, "lr": 0.001}
    spec = resolve_spec(
        load_template("hf-sft"), "fedavg", num_clients=1, rounds=1, local_epochs=1, devices=2,
        model=sft["model"], validation=sft["val"], extra_args=args,
    )  # fmt: skip
    spec = dataclasses.replace(spec, site_args={"site-1": {"train": str(sft["root"] / "shared.jsonl")}})
    result = submit_job(federation, create_job(spec, tmp_path / "jobs"), download=tmp_path / "results", timeout=600)
    assert result.status == COMPLETED
    sent = load_global_state(result.result_dir)

    # The same Trainer without NVFlare, on 2 processes (torchrun, gloo): DDP's result.
    reference = tmp_path / "reference"
    train_args = cli_args({**spec.train_args, "train": str(sft["root"] / "shared.jsonl")}).split()
    entry = tmp_path / "entry.py"
    entry.write_text("from fedllm.training.hf.sft import main\nmain()\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(entry), *train_args, "--without-nvflare", str(reference)],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    from safetensors.torch import load_file

    expected = load_file(str(reference / "model.safetensors"))
    assert set(expected) <= set(sent)
    # Tolerance: FedAvg's weighted mean of one site is w·x/w in fp32, within a few ulps of x.
    worst = max((sent[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6
    initial = load_file(str(Path(sft["model"]) / "model.safetensors"))
    assert any(not torch.equal(initial[k], expected[k]) for k in expected)  # it trained

    # One result per round from the site (rank 0 alone talks to the server); both ranks trained their shard.
    rounds = read_round_metrics(result.result_dir)
    assert [list(r["sites"]) for r in rounds] == [["site-1"]]
    log = (result.result_dir / "site_logs" / "site-1.log").read_text()
    assert "rank 0/2: 3 batches of 8" in log and "rank 1/2: 3 batches of 8" in log


def test_lora_rounds_start_from_the_global_adapter_and_stream_their_curves(
    federation, sft: dict, tmp_path: Path
) -> None:
    rounds, epochs = 2, 2
    spec = resolve_spec(
        load_template("hf-lora"), "fedavg", num_clients=2, rounds=rounds, local_epochs=epochs,
        model=sft["model"], validation=sft["val"], extra_args={**ARGS, "lr": 0.01},
        data=[str(sft["root"] / "site-1.jsonl"), str(sft["root"] / "site-2.jsonl")], sites=["site-1", "site-2"],
    )  # fmt: skip
    result = submit_job(federation, create_job(spec, tmp_path / "jobs"), download=tmp_path / "results", timeout=600)
    assert result.status == COMPLETED
    per_round = 48 // ARGS["batch_size"] * epochs

    scalars = read_site_scalars(result.result_dir)
    assert {"site-1", "site-2"} <= set(scalars)
    for site in ("site-1", "site-2"):
        loss = dict(scalars[site]["loss"])
        assert sorted(loss) == list(range(1, rounds * per_round + 1))
        # Round 1's first step starts from the average of two adapters that disagree: far worse on this
        # site's data than the site's own adapter at the end of round 0 (which it would start from otherwise).
        assert loss[per_round + 1] > 1.3 * loss[per_round] + 0.1
        assert [s for s, _ in scalars[site]["val_loss"]] == [per_round, 2 * per_round]
        # Each round's received model, then the final evaluation of the final and the best global model.
        assert [s for s, _ in scalars[site]["global_val_loss"]] == [0, per_round, 2 * per_round, 2 * per_round]

    # The received model's evaluation is what the site sent with its weights; both sites got the same model.
    history = read_round_metrics(result.result_dir)
    assert [r["round"] for r in history] == [0, 1]
    for r in history:
        values = [m["global_val_loss"] for m in r["sites"].values()]
        assert len(values) == 2 and math.isclose(values[0], values[1], rel_tol=1e-4)

    # Site-local TensorBoard stays in the site's own job folder; the Trainer's end-of-round checkpoints (what
    # the next round resumes) are the job lineage's (fedllm.training.lineage), gone once its last round trained.
    site_job = federation.site("site-1") / result.job_id
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    own = EventAccumulator(str(site_job / "tb"), size_guidance={"scalars": 0})
    own.Reload()  # every round's steps, not only the first round's (the callback reopens its writer each round)
    assert [e.step for e in own.Scalars("train/loss")] == list(range(1, rounds * per_round + 1))
    assert not (site_job / "trainer").exists()
    assert not (federation.site("site-1") / STATE_ROOT / result.job_id).exists()
    lr = dict(scalars["site-1"]["learning_rate"])
    assert lr[per_round + 1] < lr[per_round]  # one schedule over both rounds: no second warmup

    # After the last round every site evaluated the final global adapter.
    final = read_final_evaluation(result.result_dir)
    assert {"site-1", "site-2"} <= set(final)
    assert all(math.isfinite(m["global_val_loss"]) for m in final.values())
