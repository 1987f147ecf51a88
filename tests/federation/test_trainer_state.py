"""A site's trainer state (AdamW moments, LR schedule, data position) goes on through a server restart.

An hf-lora job (tiny GPT, 2 sites, 4 rounds, a log line per optimizer step) whose server is SIGKILLed in
round 2 and started again goes on as a continuation job (fedllm.flare.resume): its sites resume their
Trainer from the checkpoint of the round before the redone one, kept per job lineage
(fedllm.training.lineage), with the schedule of the job as first submitted. The LR the continuation
logs at each step and its final adapter are the uninterrupted run's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedllm.apps.local_federation import LocalFederation, local_federation
from fedllm.config import load_site_config
from fedllm.data.io import write_jsonl_files
from fedllm.data.synthetic import sentiment_records
from fedllm.flare.resume import CONTINUATION_META
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, JobResult, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import load_global_state, read_round_metrics, read_site_scalars
from fedllm.runtime import native
from fedllm.training.hf.tiny_gpt import build_tiny_gpt
from fedllm.training.lineage import STATE_ROOT
from tests.support.sites import local_config_dict, write_yaml

pytestmark = pytest.mark.federation

SITES = ["site-1", "site-2"]
ROUNDS, EXAMPLES, BATCH = 4, 32, 8
STEPS = EXAMPLES // BATCH  # optimizer steps per round and site (1 epoch)
ARGS = {
    "lr": 0.01,
    "batch_size": BATCH,
    "grad_accum": 1,
    "max_length": 64,
    "logging_steps": 1,
    "warmup_ratio": 0.25,  # 4 of the job's 16 steps: a warmup that restarted would show in round 2
    "gradient_checkpointing": False,
    "cpu_threads": 1,
}
# Measured 2026-12-06 on 2 cores: two uninterrupted runs agree bit for bit (adapter and every step's loss;
# with two sites FedAvg's sum does not depend on the order the updates arrive in), and so did the
# continuation. A continuation that loses the sites' AdamW state and schedule differs by ~0.05 (issue 25).
ATOL = 1e-6


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> LocalFederation:
    root = tmp_path_factory.mktemp("trainer-state")
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="state", sites=2)))
    with local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=_quiet) as federation:
        yield federation


@pytest.fixture(scope="module")
def job_args(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora-data")

    def pairs(n: int, seed: int, label: str | None = None) -> list[dict[str, str]]:
        return [
            {"input": f"{r['sentence']} sentiment:", "output": label or r["label"]} for r in sentiment_records(n, seed)
        ]

    files = {
        root / "val.jsonl": pairs(16, 2),
        root / "site-1.jsonl": pairs(EXAMPLES, 3, "positive"),
        root / "site-2.jsonl": pairs(EXAMPLES, 4, "negative"),
    }
    write_jsonl_files(files)
    return {
        "model": str(build_tiny_gpt(log=_quiet)),
        "validation": str(root / "val.jsonl"),
        "data": [str(root / f"{site}.jsonl") for site in SITES],
    }


def _job(job_args: dict, out: Path) -> Path:
    spec = resolve_spec(
        load_template("hf-lora"), "fedavg", num_clients=2, rounds=ROUNDS, local_epochs=1, sites=SITES,
        extra_args=ARGS, **job_args,
    )  # fmt: skip
    return create_job(spec, out)


@pytest.fixture(scope="module")
def reference(fed, job_args, tmp_path_factory) -> JobResult:
    """The same job, never interrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    result = fed.submit(_job(job_args, tmp / "jobs"), download=tmp / "results", timeout=600, echo=_quiet)
    assert result.status == COMPLETED
    return result


def _interrupted(fed: LocalFederation, job_dir: Path, download: Path) -> tuple[str, JobResult]:
    """Submit and follow the job as `fedllm job submit` does; SIGKILL the server in round 2, then `fedllm up`."""
    lines: list[str] = []
    outcome: dict = {}

    def follow() -> None:
        try:
            outcome["result"] = submit_job(fed.kits, job_dir, download=download, timeout=600, echo=lines.append)
        except Exception as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    follower = threading.Thread(target=follow)
    follower.start()
    deadline, job_id, log = time.monotonic() + 300, None, None
    while time.monotonic() < deadline:
        if job_id is None and (found := [ln for ln in list(lines) if ln.startswith("submitted ")]):
            job_id = found[0].rsplit(" ", 1)[1]
            log = fed.kits.server() / job_id / "log.txt"
        if log is not None and log.is_file() and "Round 2 started" in log.read_text(errors="replace"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"round 2 never started; follower said: {lines}")
    native.kill(fed.kits, fed.config.server.name)
    native.up(fed.kits, echo=_quiet)
    follower.join(timeout=900)
    assert not follower.is_alive(), f"job submit still following after 900 s: {lines}"
    if "error" in outcome:
        raise outcome["error"]
    return job_id, outcome["result"]


def test_hf_lora_continuation_after_a_server_kill_trains_what_the_uninterrupted_run_trains(
    fed, job_args, reference, tmp_path: Path
) -> None:
    interrupted, result = _interrupted(fed, _job(job_args, tmp_path / "jobs"), tmp_path / "results")
    assert result.status == COMPLETED and result.job_id != interrupted
    with fed.admin() as session:
        resumed = session.get_job_meta(result.job_id)[CONTINUATION_META]
    first = resumed["from_round"] + 1  # the first round the continuation ran (it redid the interrupted one)
    assert [r["round"] for r in read_round_metrics(result.result_dir)] == list(range(ROUNDS))

    got, want = read_site_scalars(result.result_dir), read_site_scalars(reference.result_dir)
    for site in SITES:
        lr, expected = dict(got[site]["learning_rate"]), dict(want[site]["learning_rate"])
        assert sorted(expected) == list(range(1, ROUNDS * STEPS + 1))
        # The continuation's sites logged the lineage's steps, from the redone round's first to the job's last.
        assert sorted(lr) == list(range(first * STEPS + 1, ROUNDS * STEPS + 1)), site
        differing = [step for step in lr if abs(lr[step] - expected[step]) > 1e-12]
        assert not differing, f"{site}: the LR differs from the uninterrupted run's at steps {differing}"
        loss, expected_loss = dict(got[site]["loss"]), dict(want[site]["loss"])
        worst = max(abs(loss[s] - expected_loss[s]) for s in loss)
        print(f"{site}: {len(lr)} steps after the restart, max |loss difference| {worst:.3g}")
        assert worst <= ATOL, f"{site}: the continuation's training losses differ by {worst}"
        log = (result.result_dir / "site_logs" / f"{site}.log").read_text()
        if first > 0:
            assert f"round {first} goes on from the trainer state in" in log, site

    final, expected_final = load_global_state(result.result_dir), load_global_state(reference.result_dir)
    assert final.keys() == expected_final.keys()
    worst = max((final[k] - expected_final[k]).abs().max().item() for k in final)
    print(f"final adapter: max |difference| from the uninterrupted run {worst:.3g}")
    assert worst <= ATOL

    # The lineage trained its last round: no site keeps its state (each checkpoint ~3× an SFT model).
    for site in SITES:
        state = fed.kits.site(site) / STATE_ROOT
        assert not state.exists() or not any(state.iterdir()), f"{site} kept {list(state.iterdir())}"
