"""`--lora-ranks`: parsing, the job-level and per-site LoRA arguments, and the job they make (issue 26, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.lora_ranks import lora_rank_overrides, parse_lora_ranks
from fedllm.jobs.template import load_template


def test_ranks_parse_per_site() -> None:
    assert parse_lora_ranks("site-1:16,site-2:8, site-3 : 4") == {"site-1": 16, "site-2": 8, "site-3": 4}
    assert parse_lora_ranks("hospital_a.eu:2") == {"hospital_a.eu": 2}


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("", "is empty"),
        (" , ", "is empty"),
        ("site-1:16,,site-2:8", "empty entry"),
        ("site-1=16", "'site-1=16' has no ':'"),
        (":16", "':16' names no site"),
        ("site-1:sixteen", "the rank 'sixteen'"),
        ("site-1:0", "the rank '0'"),
        ("site-1:-4", "the rank '-4'"),
        ("site-1:2.5", "the rank '2.5'"),
        ("site-1:16,site-1:8", "gives site-1 twice"),
    ],
)
def test_bad_ranks_name_the_option_the_part_and_the_fix(text: str, part: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_lora_ranks(text)
    message = str(info.value)
    assert message.startswith("--lora-ranks") and part in message and "Fix:" in message


def test_every_site_keeps_the_jobs_lora_scaling() -> None:
    job, sites = lora_rank_overrides({"site-1": 16, "site-2": 8, "site-3": 4}, {"lora_r": 8, "lora_alpha": 16})
    assert job == {"lora_r": 16, "lora_alpha": 32}
    assert sites == {
        "site-1": {"lora_r": 16, "lora_alpha": 32},
        "site-2": {"lora_r": 8, "lora_alpha": 16},
        "site-3": {"lora_r": 4, "lora_alpha": 8},
    }
    # PEFT's scale alpha / r is the job's on every site, fractional alphas included.
    job, sites = lora_rank_overrides({"a": 3, "b": 2}, {"lora_r": 4, "lora_alpha": 5})
    assert job == {"lora_r": 3, "lora_alpha": 3.75} and sites["b"] == {"lora_r": 2, "lora_alpha": 2.5}


def test_ranks_on_a_job_without_lora_are_refused() -> None:
    with pytest.raises(JobSpecError, match=r"--lora-ranks .*no lora_r/lora_alpha.*Fix: use it with a LoRA template"):
        lora_rank_overrides({"site-1": 4}, {"lr": 0.1})
    with pytest.raises(JobSpecError, match=r"--lora-ranks names no site"):
        lora_rank_overrides({}, {"lora_r": 8, "lora_alpha": 16})


def test_the_job_gives_the_server_the_largest_rank_and_each_site_its_own(tmp_path: Path) -> None:
    template = load_template("hf-lora")
    job_args, site_args = lora_rank_overrides(parse_lora_ranks("site-1:16,site-2:8,site-3:4"), template.train_args)
    spec = resolve_spec(
        template, "fedavg", model="/models/m", sites=["site-1", "site-2", "site-3"],
        extra_args=job_args, site_overrides=site_args,
    )  # fmt: skip
    job = create_job(spec, tmp_path)
    server = json.loads(next(job.glob("app*/config/config_fed_server.json")).read_text())
    model_args = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model_args"]
    assert (model_args["r"], model_args["alpha"]) == (16, 32)
    for site, (rank, alpha) in {"site-1": (16, 32), "site-2": (8, 16), "site-3": (4, 8)}.items():
        client = json.loads((job / f"app_{site}" / "config" / "config_fed_client.json").read_text())
        script = client["executors"][0]["executor"]["args"]["command"]  # torchrun's command line
        r, a = script[script.index("--lora-r") + 1], script[script.index("--lora-alpha") + 1]
        assert (r, float(a)) == (str(rank), alpha)
