"""NeMo's own Megatron-GPT p-tuning and SFT through a real NVFlare federation, on CPU (runs in .venv-nemo).

Three sites train a tiny Megatron-GPT that NeMo itself built and saved; site-3 runs it at tensor
parallelism 2 (two torchrun processes on a fedllm-converted TP-2 copy). Nothing here is a stand-in:
the models, their training and validation are NeMo's, the federation is NVFlare's.
"""

from __future__ import annotations

import pytest
import torch

from fedllm.apps.local_federation import local_federation
from fedllm.checkpoint import convert
from fedllm.config import load_site_config
from fedllm.flare.server_models import NemoCheckpointWeights, PromptEncoderWeights
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED
from fedllm.jobs.template import InitialModel, load_template
from fedllm.results.metrics import load_global_state, read_round_metrics
from fedllm.training.lineage import STATE_ROOT
from tests.support.nemo_runs import SEQ_LENGTH, sentiment_data, sft_data
from tests.support.nemo_runs import fedllm_cli as _fedllm
from tests.support.sites import local_config_dict, write_yaml

pytest.importorskip("nemo", reason="NeMo runs in its own environment: make test-nemo (.venv-nemo)")
pytestmark = [pytest.mark.nemo, pytest.mark.federation]

SITES = ["site-1", "site-2", "site-3"]
VIRTUAL_TOKENS, ENCODER_HIDDEN, HIDDEN = 4, 32, 64
COMMON = {"global_batch_size": 8, "micro_batch_size": 4, "max_seq_length": SEQ_LENGTH, "num_workers": 0}


@pytest.fixture(scope="module")
def nemo_world(tmp_path_factory, nemo_models):
    """Data, the tiny GPT (legacy as NVIDIA's public checkpoints: TP1, and TP2 for site-3; Megatron-core as NeMo 2
    writes it: a distributed checkpoint) and a running 3-site federation."""
    root = tmp_path_factory.mktemp("nemo-fed")
    sentiment_data(root / "data", SITES)
    sft_data(root / "data", SITES)
    base, mcore = nemo_models["legacy"], nemo_models["mcore"]
    tp2 = convert(base, root / "tiny_tp2.nemo", 2, progress=False).target
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="nemofed")))
    with local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=lambda _m: None) as fed:
        yield {"fed": fed, "root": root, "base": base, "tp2": tp2, "mcore": mcore}


def _ptuning_spec(world, mode: str, **kw):
    template = load_template("nemo-ptuning-345m").model_copy(
        update={
            "initial_model": InitialModel(
                class_path="fedllm.flare.server_models.PromptEncoderWeights",
                args={"total_virtual_tokens": VIRTUAL_TOKENS, "token_dim": HIDDEN, "encoder_hidden": ENCODER_HIDDEN},
            )
        }
    )
    extra = {**COMMON, "encoder_hidden": ENCODER_HIDDEN, "virtual_tokens": VIRTUAL_TOKENS, "lr": 0.02}
    return resolve_spec(template, mode, model=str(world["base"]), extra_args=extra, **kw)


def _encoder_bytes() -> int:
    return sum(
        t.numel() * 4 for t in PromptEncoderWeights(VIRTUAL_TOKENS, HIDDEN, ENCODER_HIDDEN).state_dict().values()
    )


@pytest.fixture(scope="module")
def ptuning_fedavg(nemo_world, tmp_path_factory):
    """A 3-round FedAvg p-tuning job; site-3 trains the TP-2 copy with two processes."""
    out = tmp_path_factory.mktemp("ptuning")
    spec = _ptuning_spec(
        nemo_world,
        "fedavg",
        rounds=3,
        num_clients=3,
        sites=SITES,
        site_overrides={"site-3": {"devices": 2, "model": str(nemo_world["tp2"])}},
    )
    return nemo_world["fed"].submit(
        create_job(spec, out / "jobs"), download=out / "results", timeout=1200, echo=lambda _m: None
    )


@pytest.fixture(scope="module")
def sft_fedavg(nemo_world, tmp_path_factory):
    """A 2-round FedAvg SFT job on 3 sites from the Megatron-core base: every weight crosses, under the names of
    the distributed checkpoint the server reads (the CPU sites' local spec names its norms apart)."""
    out = tmp_path_factory.mktemp("sft")
    spec = resolve_spec(
        load_template("nemo-sft-1.3b"),
        "fedavg",
        rounds=2,
        num_clients=3,
        model=str(nemo_world["mcore"]),
        extra_args={**COMMON, "lr": 0.001},
        data=["{data_dir}/training.jsonl"],
        validation="{data_dir}/validation.jsonl",
    )
    return nemo_world["fed"].submit(
        create_job(spec, out / "jobs"), download=out / "results", timeout=1200, echo=lambda _m: None
    )


def test_fedavg_ptuning_with_a_tp2_site_learns_and_sends_only_the_prompt_encoder(nemo_world, ptuning_fedavg):
    result = ptuning_fedavg
    assert result.status == COMPLETED
    rounds = read_round_metrics(result.result_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert set(r["sites"]) == set(SITES)
        for site, m in r["sites"].items():
            assert m["bytes_sent"] == _encoder_bytes(), site  # the prompt encoder, nothing of the GPT
            assert m["ranks"] == (2.0 if site == "site-3" else 1.0)
            assert m["train_steps"] > 0
    losses = [r["aggregated"]["global_val_loss"] for r in rounds]
    assert losses[-1] < losses[0], f"the global prompt encoder's validation loss did not fall: {losses}"
    # Adam's moments and the LR schedule go on across rounds, as the seeds' RestoreState has them: the step
    # count adds up, and every round starts where the last one's LR left off (warmup: 50 steps), not anew.
    for site in SITES:
        mine = [r["sites"][site] for r in rounds]
        steps = [m["train_steps"] for m in mine]
        assert [m["optimizer_steps"] for m in mine] == [sum(steps[: r + 1]) for r in range(3)], site
        assert mine[0]["lr_first_step"] < mine[0]["lr_last_step"] < mine[1]["lr_first_step"] < mine[1]["lr_last_step"]
        assert mine[2]["lr_first_step"] > mine[1]["lr_last_step"], site
    # After the final global model's evaluation no site keeps the job's trainer state (fedllm.training.lineage).
    kits = nemo_world["fed"].kits
    assert not any((kits.site(site) / STATE_ROOT / result.job_id).exists() for site in SITES)
    expected = PromptEncoderWeights(VIRTUAL_TOKENS, HIDDEN, ENCODER_HIDDEN).state_dict()
    global_state = load_global_state(result.result_dir)
    assert {k: tuple(v.shape) for k, v in global_state.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_sft_exchanges_full_weights_and_sites_start_from_the_aggregate(nemo_world, sft_fedavg):
    result = sft_fedavg
    assert result.status == COMPLETED
    base = NemoCheckpointWeights(str(nemo_world["mcore"])).state_dict()
    weights_bytes = sum(t.numel() * 4 for t in base.values())
    first, second = read_round_metrics(result.result_dir)
    assert {m["bytes_sent"] for m in first["sites"].values()} == {float(weights_bytes)}  # every weight crosses
    # Every site evaluates the same aggregate it received before round 1: one number, not its own model's.
    received = {round(m["global_val_loss"], 5) for m in second["sites"].values()}
    assert len(received) == 1
    assert all(round(m["val_loss"], 5) not in received for m in first["sites"].values())
    assert second["aggregated"]["global_val_loss"] < first["aggregated"]["global_val_loss"]
    final = load_global_state(result.result_dir)
    assert set(final) == set(base)
    assert any(not torch.equal(final[k], base[k]) for k in base), "the server's global model did not change"


@pytest.mark.parametrize("mode", ["local", "central"])
def test_local_only_and_centralized_modes(nemo_world, tmp_path, mode):
    kw = {"num_clients": 3} if mode == "local" else {}
    spec = _ptuning_spec(nemo_world, mode, local_epochs=1, **kw)
    result = nemo_world["fed"].submit(
        create_job(spec, tmp_path / "jobs"), download=tmp_path / "results", timeout=900, echo=lambda _m: None
    )
    assert result.status == COMPLETED
    (only,) = read_round_metrics(result.result_dir)
    assert len(only["sites"]) == (3 if mode == "local" else 1)
    assert all(m["val_loss"] < m["global_val_loss"] for m in only["sites"].values())


def test_inference_with_the_global_prompt_encoder_through_nemo(nemo_world, ptuning_fedavg):
    """The seeds' notebook: the frozen GPT with the job's global prompt encoder labels the five example sentences."""
    from fedllm.cli.workloads import EXAMPLE_SENTENCES

    args = ["infer", "--model", str(nemo_world["base"]), "--prompt-encoder", str(ptuning_fedavg.result_dir)]
    args += ["--num-virtual-tokens", str(VIRTUAL_TOKENS), "--encoder-hidden", str(ENCODER_HIDDEN)]
    done = _fedllm(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if " sentiment: " in line]
    assert [line.split(" sentiment: ")[0] for line in lines] == EXAMPLE_SENTENCES
    # A prompt encoder of another shape is refused, not silently skipped.
    wrong = _fedllm(*args[:-1], "64")
    assert wrong.returncode == 1 and "does not match this site's" in wrong.stderr


def test_generation_from_the_sft_jobs_global_model(nemo_world, sft_fedavg):
    prompt = "Profit rose to EUR 13.5 mn . sentiment:"
    done = _fedllm(
        "infer", "--model", str(nemo_world["mcore"]), "--sft", str(sft_fedavg.result_dir), "--prompt", prompt
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(prompt)]
    assert line[len(prompt) :].strip(), "the SFT model generated nothing"
