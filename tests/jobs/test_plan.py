"""Each site's share of a job comes from the GPUs its site config lists (fedllm.jobs.plan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.config.site_config import SiteConfig
from fedllm.jobs.create import JobSpecError, create_job, resolve_spec
from fedllm.jobs.sites import Federation
from fedllm.jobs.template import load_template
from tests.support.cli_fuzz import assert_clean, run_cli
from tests.support.sites import local_config_dict, write_yaml

MODEL = "/models/Llama-3.2-1B"  # never read: the HF templates pass it on to the sites


def _federation(gpus: list[list[int]]) -> Federation:
    return Federation(SiteConfig.model_validate(local_config_dict(sites=len(gpus), gpus=gpus)), "sites.yaml")


def _plan(template: str, gpus: list[list[int]], **kw):
    spec = resolve_spec(load_template(template), "fedavg", model=MODEL, federation=_federation(gpus), **kw)
    return spec, {p.site: p for p in spec.plan.sites}


def _command(job: Path, site: str) -> list[str]:
    config = json.loads((job / f"app_{site}" / "config" / "config_fed_client.json").read_text())
    return config["executors"][0]["executor"]["args"]["command"]


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_every_site_trains_one_process_per_gpu_it_lists_with_the_jobs_effective_batch(tmp_path: Path) -> None:
    # hf-lora: batch_size 4 × grad_accum 2 × 1 device = 8 examples per optimizer step.
    spec, plan = _plan("hf-lora", [[0, 1], [2], [3]])
    assert [(p.processes, p.micro_batch, p.accumulation, p.effective_batch) for p in plan.values()] == [
        (2, 4, 1, 8),
        (1, 4, 2, 8),
        (1, 4, 2, 8),
    ]
    job = create_job(spec, tmp_path)
    for site, (processes, accumulation) in {"site-1": (2, 1), "site-2": (1, 2), "site-3": (1, 2)}.items():
        command = _command(job, site)
        assert f"--nproc_per_node={processes}" in command
        assert _flag(command, "--devices") == str(processes) and _flag(command, "--grad-accum") == str(accumulation)


def test_a_site_with_a_smaller_micro_batch_accumulates_more(tmp_path: Path) -> None:
    spec, plan = _plan("hf-lora", [[0, 1], [2], [3]], site_overrides={"site-3": {"batch_size": "2"}})
    assert (plan["site-3"].micro_batch, plan["site-3"].accumulation, plan["site-3"].effective_batch) == (2, 4, 8)
    assert plan["site-3"].batch == "2 × 4 × 1 = 8" and plan["site-1"].batch == "4 × 1 × 2 = 8"
    command = _command(create_job(spec, tmp_path), "site-3")
    assert _flag(command, "--batch-size") == "2" and _flag(command, "--grad-accum") == "4"


def test_an_inherited_micro_batch_too_large_for_a_site_is_made_smaller_and_said() -> None:
    # 8 examples over 4 processes: 2 each, so the job's micro-batch 4 becomes 2 there (accumulation 1).
    _, plan = _plan("hf-lora", [[0, 1, 2, 3], [4]])
    assert (plan["site-1"].micro_batch, plan["site-1"].accumulation, plan["site-1"].processes) == (2, 1, 4)
    assert plan["site-1"].note == "micro-batch 4 → 2: 2 examples per process"


def test_the_site_config_gpus_drive_sft_and_devices_overrides_them() -> None:
    _, plan = _plan("hf-sft", [[0, 1], [2]])  # batch_size 1 × grad_accum 8
    assert [(p.processes, p.accumulation) for p in plan.values()] == [(2, 4), (1, 8)]
    _, plan = _plan("hf-sft", [[0, 1], [2, 3]], devices=1)
    assert [(p.processes, p.accumulation) for p in plan.values()] == [(1, 8), (1, 8)]


def test_more_processes_than_a_site_has_gpus_is_refused_naming_the_site_and_fix() -> None:
    with pytest.raises(JobSpecError) as raised:
        _plan("hf-lora", [[0, 1], [2]], devices=2)
    assert str(raised.value) == (
        "--devices 2: site-2 lists 1 GPU(s) (2) in sites.yaml, so 2 processes would share them. Fix: "
        "--site site-2:devices=1, or give site-2 more GPUs in the site config and provision again"
    )


def test_a_nemo_site_whose_gpus_cannot_host_the_tensor_parallel_group_is_refused() -> None:
    with pytest.raises(JobSpecError, match=r"site-2 lists 1 GPU\(s\) \(2\) in sites.yaml; the job trains tensor "):
        resolve_spec(load_template("nemo-ptuning-20b"), "fedavg", federation=_federation([[0, 1], [2]]))
    spec = resolve_spec(
        load_template("nemo-ptuning-20b"), "fedavg", federation=_federation([[0, 1], [2]]),
        site_overrides={"site-2": {"devices": 1, "model": "/models/gpt20b-tp1.nemo"}},
    )  # fmt: skip
    plan = {p.site: p for p in spec.plan.sites}
    # NeMo keeps the global batch itself: a TP group is one replica, accumulation = global / micro.
    assert [(p.processes, p.replicas, p.batch) for p in plan.values()] == [
        (2, 1, "4 × 2 × 1 = 8"),
        (1, 1, "4 × 2 × 1 = 8"),
    ]


def test_accumulation_is_the_jobs_and_a_micro_batch_that_cannot_divide_is_refused() -> None:
    with pytest.raises(JobSpecError, match=r"--site site-2:grad_accum=\.\.\.: the job keeps one effective batch"):
        _plan("hf-lora", [[0], [1]], site_overrides={"site-2": {"grad_accum": "4"}})
    with pytest.raises(JobSpecError, match=r"--site site-2:micro_batch=3: with 1 process\(es\) each takes 8"):
        _plan("hf-lora", [[0], [1]], site_overrides={"site-2": {"batch_size": "3"}})
    with pytest.raises(JobSpecError, match=r"site-1: 3 processes cannot share the job's effective batch of 8"):
        _plan("hf-lora", [[0, 1, 2], [3]])


def test_4bit_on_a_site_without_gpus_is_refused() -> None:
    with pytest.raises(JobSpecError, match=r"site-2: quantize=4bit .* site-2 lists no GPUs\. Fix: --site site-2:"):
        _plan("hf-lora", [[0], []], extra_args={"quantize": "4bit"})


def test_single_process_templates_run_one_process_whatever_the_gpus() -> None:
    _, plan = _plan("hf-ptuning", [[0, 1], [2]])
    assert [p.processes for p in plan.values()] == [1, 1]
    with pytest.raises(JobSpecError, match="site-1: devices=2, but template hf-ptuning trains in the site's job"):
        _plan("hf-ptuning", [[0, 1], [2]], site_overrides={"site-1": {"devices": 2}})


def test_without_a_site_config_one_row_stands_for_every_site() -> None:
    spec = resolve_spec(load_template("hf-lora"), "fedavg", model=MODEL)
    assert [(p.site, p.processes, p.batch) for p in spec.plan.sites] == [("(every site)", 1, "4 × 2 × 1 = 8")]
    assert spec.site_args == {}


def _config(tmp_path: Path, gpus: list[list[int]], monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "mixed.yaml", local_config_dict(sites=len(gpus), gpus=gpus))
    return "mixed.yaml"


def test_job_create_prints_the_plan_and_takes_site_settings(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path, [[0, 1], [2], [3]], monkeypatch)
    outcome = run_cli(
        ["job", "create", "hf-lora", "--model", MODEL, "-c", config, "--out", "jobs", "--site", "site-3:micro_batch=2"]
    )
    assert_clean(outcome)
    assert outcome.code == 0, outcome.err
    lines = [line.split() for line in outcome.out.splitlines()[:4]]
    assert lines[1][:3] == ["site-1", "0,1", "2"] and " ".join(lines[1][3:10]) == "4 × 1 × 2 = 8"
    assert lines[2][:3] == ["site-2", "2", "1"] and " ".join(lines[2][3:10]) == "4 × 2 × 1 = 8"
    assert lines[3][:3] == ["site-3", "3", "1"] and " ".join(lines[3][3:10]) == "2 × 4 × 1 = 8"
    assert "every site steps its optimizer once per 8 examples" in outcome.out


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ("site-9:devices=1", "--site site-9:...: the site config mixed.yaml has no site site-9; its sites are"),
        ("site-1", "--site 'site-1' is not NAME:KEY=VALUE; write e.g. --site site-2:micro_batch=2"),
        ("site-1:micro_batch=", "gives no value"),
    ],
)
def test_bad_site_settings_are_one_line_errors(tmp_path: Path, monkeypatch, site: str, message: str) -> None:
    config = _config(tmp_path, [[0], [1]], monkeypatch)
    outcome = run_cli(["job", "create", "hf-lora", "--model", MODEL, "-c", config, "--out", "jobs", "--site", site])
    assert_clean(outcome)
    assert outcome.code == 1 and message in outcome.err
    assert not (tmp_path / "jobs").exists()


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip


def _sized_federation(memory: list[float | None], gpus: list[list[int]]) -> Federation:
    data = local_config_dict(sites=len(gpus), gpus=gpus)
    for site, gib in zip(data["sites"], memory, strict=True):
        if gib is not None:
            site["gpu_memory_gib"] = gib
    return Federation(SiteConfig.model_validate(data), "sites.yaml")


def _llama_8b(tmp_path: Path) -> str:
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return str(folder)


def test_a_site_that_cannot_hold_its_share_is_refused_with_the_need_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError) as raised:
        resolve_spec(
            load_template("hf-sft"), "fedavg", model=_llama_8b(tmp_path), federation=_sized_federation([80, 24], [[0, 1], [2]])
        )  # fmt: skip
    message = str(raised.value)
    assert message.startswith("site-1: hf-sft of an 8B model needs ~")
    assert "it has 2 × 80 GiB (72.0 GiB usable with a 10% margin): use hf-lora" in message


def test_the_fit_halves_a_sites_micro_batch_and_keeps_the_jobs_batch(tmp_path: Path) -> None:
    model = _llama_8b(tmp_path)
    spec = resolve_spec(
        load_template("hf-lora"), "fedavg", model=model, extra_args={"max_length": "2048"},
        federation=_sized_federation([80, None], [[0, 1], [2]]),
    )  # fmt: skip
    plan = {p.site: p for p in spec.plan.sites}
    assert (plan["site-1"].micro_batch, plan["site-1"].accumulation, plan["site-1"].effective_batch) == (2, 2, 8)
    assert plan["site-1"].note == "micro-batch 4 → 2 to fit 80 GiB" and plan["site-1"].memory.endswith(" of 80")
    assert spec.site_args["site-1"]["batch_size"] == 2 and spec.site_args["site-1"]["grad_accum"] == 2
    # No gpu_memory_gib: the estimate is shown, nothing is changed.
    assert plan["site-2"].memory.startswith("~") and " of " not in plan["site-2"].memory
    assert plan["site-2"].micro_batch == 4

    with pytest.raises(JobSpecError, match=r"site-2: hf-lora of an 8B model needs ~.* set quantize=4bit"):
        resolve_spec(
            load_template("hf-lora"), "fedavg", model=model, extra_args={"max_length": "2048"},
            federation=_sized_federation([80, 24], [[0, 1], [2]]),
        )  # fmt: skip


def test_fit_auto_turns_on_checkpointing_and_a_4bit_base_where_nothing_else_fits(tmp_path: Path) -> None:
    spec = resolve_spec(
        load_template("hf-lora"), "fedavg", model=_llama_8b(tmp_path), extra_args={"max_length": "2048"},
        federation=_sized_federation([80, 24], [[0, 1], [2]]), fit="auto",
    )  # fmt: skip
    plan = {p.site: p for p in spec.plan.sites}
    assert plan["site-2"].quantize == "4bit" and plan["site-1"].quantize == "none"
    assert plan["site-2"].note == "--fit auto: gradient checkpointing and a 4bit base (QLoRA) to fit 24 GiB"
    command = _command(create_job(spec, tmp_path / "jobs"), "site-2")
    assert _flag(command, "--quantize") == "4bit" and "--gradient-checkpointing" in command


def test_lora_ranks_per_site_keep_one_scaling_and_the_server_holds_the_largest(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path, [[0, 1], [2], [3]], monkeypatch)
    outcome = run_cli(
        ["job", "create", "hf-lora", "--model", MODEL, "-c", config, "--out", "jobs",
         "--lora-ranks", "site-1:16,site-2:8", "--site", "site-3:lora_r=4"]
    )  # fmt: skip
    assert_clean(outcome)
    assert outcome.code == 0, outcome.err
    assert [line.split()[-1] for line in outcome.out.splitlines()[1:4]] == ["16", "8", "4"]
    job = tmp_path / "jobs" / "hf-lora-fedavg-3sites"
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert '"r": 16' in json.dumps(server) and '"alpha": 32.0' in json.dumps(server)
    for site, (r, alpha) in {"site-1": ("16", "32.0"), "site-2": ("8", "16.0"), "site-3": ("4", "8.0")}.items():
        command = _command(job, site)
        assert (_flag(command, "--lora-r"), _flag(command, "--lora-alpha")) == (r, alpha)


def test_a_rank_given_twice_is_refused(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path, [[0], [1]], monkeypatch)
    outcome = run_cli(
        ["job", "create", "hf-lora", "--model", MODEL, "-c", config, "--out", "jobs",
         "--lora-ranks", "site-1:16", "--site", "site-1:lora_r=4"]
    )  # fmt: skip
    assert_clean(outcome)
    assert outcome.code == 1 and "--site site-1:lora_r=4 and --lora-ranks both set site-1's rank" in outcome.err
