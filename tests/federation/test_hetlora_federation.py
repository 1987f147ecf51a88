"""Heterogeneous LoRA ranks through the real federation: sites of rank 16, 8 and 4 in one hf-lora FedAvg job.

One job (shared by the module's tests): the server holds the rank-16 global adapter, each site trains
the first r_k rank components of it and sends them back zero-padded (fedllm.training.hf.hetlora), and
the global adapter learns the demo's skewed sentiment task: each site holds mostly one label, the global
adapter answers the shared validation set better than the majority label and than the untrained model.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records, skewed_site_records
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.lora_ranks import lora_rank_overrides, parse_lora_ranks
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_final_evaluation, read_round_metrics
from fedllm.training.hf.tiny_gpt import build_tiny_gpt

pytestmark = pytest.mark.federation

SITES = ["site-1", "site-2", "site-3"]
RANKS = "site-1:16,site-2:8,site-3:4"
ROUNDS = 3
ARGS = {
    "lr": 0.01,
    "batch_size": 8,
    "grad_accum": 1,
    "max_length": 64,
    "logging_steps": 1,
    "gradient_checkpointing": False,
    "cpu_threads": 1,
    "target_modules": "c_attn",
}


def _pairs(records: list[dict]) -> list[dict[str, str]]:
    return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in records]


@pytest.fixture(scope="module")
def hetlora(federation, data_root: Path, tmp_path_factory) -> dict:
    root = data_root / "hetlora"
    val = sentiment_records(30, seed=21)
    files = {root / "validation.jsonl": _pairs(val)}
    for site, records in zip(SITES, skewed_site_records(3, 48, majority=0.7, seed=5), strict=True):
        files[root / f"{site}.jsonl"] = _pairs(records)
    write_jsonl_files(files)
    model = str(build_tiny_gpt(log=lambda _m: None))
    template = load_template("hf-lora")
    job_args, site_args = lora_rank_overrides(parse_lora_ranks(RANKS), {**template.train_args, **ARGS})
    spec = resolve_spec(
        template, "fedavg", num_clients=3, rounds=ROUNDS, local_epochs=1, model=model,
        validation=str(root / "validation.jsonl"), extra_args={**ARGS, **job_args},
        data=[str(root / f"{site}.jsonl") for site in SITES], sites=SITES, site_overrides=site_args,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("hetlora")
    result = submit_job(federation, create_job(spec, out / "jobs"), download=out / "results", timeout=600)
    return {"result": result, "model": model, "val": val}


def test_the_job_completes_with_each_site_at_its_own_rank(hetlora: dict) -> None:
    result = hetlora["result"]
    assert result.status == COMPLETED
    state = load_global_state(result.result_dir)
    a_keys = [k for k in state if ".lora_A." in k]
    assert a_keys and all(state[k].shape[0] == 16 for k in a_keys)  # the server's global adapter: rank 16
    assert all(state[k].shape[1] == 16 for k in state if ".lora_B." in k)
    logs = {site: (result.result_dir / "site_logs" / f"{site}.log").read_text() for site in SITES}
    assert "LoRA rank 8 of the global adapter's 16 (HetLoRA)" in logs["site-2"]
    assert "LoRA rank 4 of the global adapter's 16 (HetLoRA)" in logs["site-3"]
    assert "(HetLoRA)" not in logs["site-1"]  # the full rank: nothing to cut
    # Every round aggregated all three sites' (padded) adapters.
    assert [sorted(r["sites"]) for r in read_round_metrics(result.result_dir)] == [SITES] * ROUNDS


def test_the_global_adapter_learns_the_task(hetlora: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.results.infer import generate, load_tuned_causal_lm

    result, val = hetlora["result"], hetlora["val"]
    # Loss on the shared validation set: the untrained global adapter (round 0's, ΔW = 0) against the final one.
    untrained = [m["global_val_loss"] for m in read_round_metrics(result.result_dir)[0]["sites"].values()]
    final = read_final_evaluation(result.result_dir)
    assert set(SITES) <= set(final)
    full_rank = final["site-1"]["global_val_loss"]
    assert math.isfinite(full_rank) and full_rank < 0.7 * min(untrained)

    prompts = [f"{r['sentence']} sentiment:" for r in val]
    truth = [r["label"] for r in val]
    majority = Counter(truth).most_common(1)[0][1] / len(truth)

    def accuracy(model, tokenizer) -> float:
        answers = generate(model, tokenizer, prompts, max_new_tokens=3)
        return sum(a.split()[0] == t if a.split() else False for a, t in zip(answers, truth, strict=True)) / len(truth)

    tuned = accuracy(*load_tuned_causal_lm(hetlora["model"], result.result_dir, "lora"))
    tokenizer = AutoTokenizer.from_pretrained(hetlora["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(hetlora["model"], dtype=torch.float32).eval()
    untuned = accuracy(base, tokenizer)
    print(f"accuracy: global adapter {tuned:.2f}, base model {untuned:.2f}, majority label {majority:.2f}")
    assert untuned <= majority < tuned
