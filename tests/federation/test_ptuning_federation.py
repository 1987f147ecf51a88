"""Federated p-tuning of a tiny GPT through the real federation: FedAvg beats training alone.

Reuses the package's running federation; each site gets label-skewed sentiment data (site i holds
mostly label i) and the shared validation set, exactly as `make demo` does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedllm.apps.demo import write_demo_data
from fedllm.data.io import read_jsonl
from fedllm.flare.server_models import PeftPromptEncoderWeights
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_round_metrics, read_site_scalars
from fedllm.results.report import run_curves, write_report
from fedllm.training.hf.ptuning import PTuningTask
from fedllm.training.hf.tiny_gpt import build_tiny_gpt

pytestmark = pytest.mark.federation
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def ptuning_runs(federation, data_root: Path, tmp_path_factory) -> dict:
    model = build_tiny_gpt(log=lambda _m: None)
    write_demo_data([data_root / "data" / s for s in SITES], data_root / "data" / "val.jsonl")
    out = tmp_path_factory.mktemp("ptuning")
    template = load_template("hf-ptuning")
    common = {"model": str(model), "extra_args": {"cpu_threads": 1}}
    runs = {}
    for mode, sizes in (("fedavg", {"rounds": 4, "local_epochs": 2}), ("local", {"local_epochs": 8})):
        job = create_job(resolve_spec(template, mode, **sizes, **common), out / "jobs")
        runs[mode] = submit_job(federation, job, download=out / "results", timeout=900, echo=lambda _m: None)
    return {"model": model, "val": data_root / "data" / "val.jsonl", "out": out, **runs}


def test_fedavg_beats_local_only_and_the_majority_class(ptuning_runs) -> None:
    fedavg, local = ptuning_runs["fedavg"], ptuning_runs["local"]
    assert fedavg.status == COMPLETED and local.status == COMPLETED
    val = read_jsonl(ptuning_runs["val"])
    majority = Counter(r["label"] for r in val).most_common(1)[0][1] / len(val)

    task = PTuningTask(str(ptuning_runs["model"]), [], val)
    task.load_exchanged_state(load_global_state(fedavg.result_dir))
    here = task.evaluate()
    fedavg_acc = here["val_accuracy"]
    # Every site evaluated the final global prompt encoder in the job: the same accuracy and macro-F1 as here.
    final = run_curves(fedavg.result_dir).final
    assert final["val_accuracy"] == pytest.approx(fedavg_acc) and final["val_macro_f1"] == pytest.approx(
        here["val_macro_f1"]
    )
    local_acc = [m["val_accuracy"] for m in read_round_metrics(local.result_dir)[0]["sites"].values()]
    assert len(local_acc) == 3
    assert fedavg_acc > majority + 0.3
    assert fedavg_acc >= sum(local_acc) / len(local_acc)


def test_only_the_prompt_encoder_crossed_the_wire(ptuning_runs) -> None:
    rounds = read_round_metrics(ptuning_runs["fedavg"].result_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    global_state = load_global_state(ptuning_runs["fedavg"].result_dir)
    expected = PeftPromptEncoderWeights(token_dim=96, num_virtual_tokens=10, encoder_hidden_size=96).state_dict()
    assert {k: tuple(v.shape) for k, v in global_state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    sent = sum(v.numel() * 4 for v in expected.values())
    for rnd in rounds:
        assert {s: m["bytes_sent"] for s, m in rnd["sites"].items()} == dict.fromkeys(SITES, float(sent))
    # The global model each site receives improves over the rounds (round 0 gets the random encoder).
    global_acc = [r["aggregated"]["global_val_accuracy"] for r in rounds]
    assert global_acc[-1] > global_acc[0] + 0.3


def test_sites_log_tensorboard_and_the_report_draws_both_runs(ptuning_runs, federation) -> None:
    job_id = ptuning_runs["fedavg"].job_id
    events = list((federation.site("site-1") / job_id / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    report = write_report(
        {"FedAvg": ptuning_runs["fedavg"].result_dir, "local-only": ptuning_runs["local"].result_dir},
        ptuning_runs["out"] / "report",
    )
    assert report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| FedAvg | val_accuracy | 4 |" in report.table and "| local-only | val_accuracy | 1 |" in report.table
    # The server's TensorBoard holds every site's per-round curves, streamed while the job ran.
    scalars = read_site_scalars(ptuning_runs["fedavg"].result_dir)
    assert all([s for s, _ in scalars[site]["val_accuracy"]] == [0, 1, 2, 3] for site in SITES)
