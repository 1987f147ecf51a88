"""Sites that differ train in one FedAvg job, each on its own share (issue 26; fedllm.jobs.plan).

On CPU, gloo stands in for GPUs: a site's "GPU count" is its process count. The federation is
provisioned from a site config whose sites list 2, 1 and 1 GPUs; `fedllm job create -c` that config
plans an hf-lora job of effective batch 8 (batch_size 4 × grad_accum 2): site-1 runs 2 processes
(DDP) of 4 × 1, site-2 one of 4 × 2, and site-3, told a smaller micro-batch, one of 2 × 4.

The math says site-3's round is the same with 2 × 4 as with 4 × 2 (the same examples per optimizer
step in the same order; the loss is normalized over the whole accumulated batch), so the mixed job's
global adapter equals the uniform job's (site-3 at 4 × 2) to fp32 summation order; the tiny GPT's
dropout is off here, as it would draw other numbers for other batch shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedllm.apps.local_federation import LocalFederation, local_federation
from fedllm.config import load_site_config
from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.results.metrics import load_global_state
from fedllm.training.hf.tiny_gpt import build_tiny_gpt
from tests.support.cli_fuzz import assert_clean, run_cli
from tests.support.sites import local_config_dict, write_yaml

pytestmark = pytest.mark.federation

GPUS = [[0, 1], [2], [3]]
EXAMPLES = 48
ARGS = ["lr=0.01", "batch_size=4", "grad_accum=2", "max_length=64", "logging_steps=1"]
ARGS += ["gradient_checkpointing=false", "cpu_threads=1", "warmup_ratio=0"]
# Measured 2026-12-06 (2 cores): the two jobs' global adapters differ by 3.0e-8 (the summation order of
# FedAvg and of the accumulation), while the round moved lora_B (zero at start) by up to 0.035.
ATOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mixed")


@pytest.fixture(scope="module")
def fed(root: Path) -> LocalFederation:
    """Provisioned from the site config the jobs are created with (root/mixed.yaml)."""
    config = write_yaml(root / "mixed.yaml", local_config_dict(project="mixed", sites=3, gpus=GPUS))
    with local_federation(load_site_config(config), root / "ws", data_root=root, echo=lambda _m: None) as federation:
        yield federation


@pytest.fixture(scope="module")
def inputs(root: Path) -> dict[str, Path]:
    model = root / "tiny-gpt-no-dropout"
    shutil.copytree(build_tiny_gpt(log=lambda _m: None), model)
    config = json.loads((model / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(config))

    def pairs(n: int, seed: int) -> list[dict[str, str]]:
        return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(n, seed)]

    files = {root / "val.jsonl": pairs(16, 2)} | {root / f"site-{i}.jsonl": pairs(EXAMPLES, 10 + i) for i in (1, 2, 3)}
    write_jsonl_files(files)
    return {"model": model, "root": root, "config": root / "mixed.yaml"}


def _create(inputs: dict[str, Path], name: str, *site: str) -> tuple[str, Path]:
    root = inputs["root"]
    args = ["job", "create", "hf-lora", "--model", inputs["model"], "-c", inputs["config"], "--rounds", "1"]
    args += ["--out", root / "jobs", "--name", name, "--validation", root / "val.jsonl"]
    args += [x for i in (1, 2, 3) for x in ("--data", root / f"site-{i}.jsonl")]
    args += [x for a in ARGS for x in ("-a", a)] + [x for s in site for x in ("--site", s)]
    outcome = run_cli(args)
    assert_clean(outcome)
    assert outcome.code == 0, outcome.err
    return outcome.out, root / "jobs" / name


def _run(fed: LocalFederation, job: Path, results: Path) -> dict:
    result = submit_job(fed.kits, job, download=results, timeout=600, echo=lambda _m: None)
    assert result.status == COMPLETED
    return {"state": load_global_state(result.result_dir), "logs": result.result_dir / "site_logs"}


def test_three_different_sites_train_their_plans_and_the_uniform_jobs_result(fed, inputs, tmp_path: Path) -> None:
    printed, mixed_job = _create(inputs, "mixed", "site-3:micro_batch=2")
    plan = [line.split() for line in printed.splitlines()[1:4]]
    assert [[*row[:3], " ".join(row[3:10])] for row in plan] == [
        ["site-1", "0,1", "2", "4 × 1 × 2 = 8"],
        ["site-2", "2", "1", "4 × 2 × 1 = 8"],
        ["site-3", "3", "1", "2 × 4 × 1 = 8"],
    ]
    mixed = _run(fed, mixed_job, tmp_path / "mixed")
    # Each site ran what its plan says: processes (ranks) and micro-batches of its shard of 48 examples.
    logs = {s: (mixed["logs"] / f"{s}.log").read_text() for s in ("site-1", "site-2", "site-3")}
    assert "rank 0/2: 6 batches of 4" in logs["site-1"] and "rank 1/2: 6 batches of 4" in logs["site-1"]
    assert "rank 0/1: 12 batches of 4" in logs["site-2"] and "6 optimizer steps per round" in logs["site-2"]
    assert "rank 0/1: 24 batches of 2" in logs["site-3"] and "6 optimizer steps per round" in logs["site-3"]

    printed, uniform_job = _create(inputs, "uniform")
    assert " ".join(printed.splitlines()[3].split()[3:10]) == "4 × 2 × 1 = 8"
    uniform = _run(fed, uniform_job, tmp_path / "uniform")

    keys = sorted(k for k in mixed["state"] if "lora_" in k)
    assert keys and keys == sorted(k for k in uniform["state"] if "lora_" in k)
    worst = max((mixed["state"][k].float() - uniform["state"][k].float()).abs().max().item() for k in keys)
    print(f"mixed vs uniform global adapter: max |difference| {worst:.3g}")
    assert worst <= ATOL, f"the mixed job's adapter differs from the uniform job's by {worst:.3g}"
    # PEFT starts every lora_B at zero: how far they moved is what one round trained.
    moved = max(mixed["state"][k].float().abs().max().item() for k in keys if "lora_B" in k)
    print(f"one round moved lora_B by up to {moved:.3g}")
    assert moved > 100 * ATOL, "the adapter did not train"
