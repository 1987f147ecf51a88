"""A job's trainer arguments are checked at creation against the trainer's own parser (issue 28, item 2)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedllm.flare.server_models import LoraAdapterWeights, PeftPromptEncoderWeights
from fedllm.jobs.create import JobSpecError, create_job, resolve_spec
from fedllm.jobs.template import load_template
from fedllm.jobs.trainer_args import parse_assignments, trainer_arguments
from tests.support.sites import write_yaml


def _spec(name: str, *assignments: str, **options):
    return resolve_spec(load_template(name), "fedavg", extra_args=parse_assignments(list(assignments)), **options)


def _script_args(job: Path) -> list[str]:
    """What each site's trainer is started with (torchrun's command line, or the in-process script's)."""
    client = json.loads(next(job.glob("app*/config/config_fed_client.json")).read_text())
    args = client["executors"][0]["executor"]["args"]
    return args["command"] if "command" in args else args["task_script_args"].split()


def _server_model_args(job: Path) -> dict:
    server = json.loads(next(job.glob("app*/config/config_fed_server.json")).read_text())
    return next(c for c in server["components"] if c["id"] == "persistor")["args"].get("model_args", {})


def test_a_misspelt_argument_is_refused_with_did_you_mean() -> None:
    with pytest.raises(JobSpecError, match=r"has no argument lerning_rate .*did you mean lr\?"):
        _spec("demo-mlp", "lerning_rate=0.1")
    with pytest.raises(JobSpecError, match=r"has no argument precison .*did you mean precision\?"):
        _spec("hf-sft", "precison=bf16", model="/models/m")


@pytest.mark.parametrize(
    ("template", "assignment", "complaint"),
    [
        ("hf-sft", "precision=fp8", "argument --precision: invalid choice: 'fp8'"),
        ("hf-lora", "quantize=8bit", "argument --quantize: invalid choice: '8bit'"),
        ("demo-mlp", "lr=fast", "argument --lr: invalid float value: 'fast'"),
        ("demo-mlp", "lr={bad", "argument --lr: invalid float value: '{bad'"),
        ("nemo-sft-1.3b", "global_batch_size=8.5", "argument --global-batch-size: invalid int value: '8.5'"),
    ],
)
def test_a_value_the_trainer_rejects_is_refused_at_creation(template: str, assignment: str, complaint: str) -> None:
    options = {"model": "/models/m"} if template.startswith("hf-") else {}
    with pytest.raises(JobSpecError, match="rejects the job's arguments") as info:
        _spec(template, assignment, **options)
    assert complaint in str(info.value) and "fedllm job args" in str(info.value)


def test_an_option_the_trainer_does_not_take_is_refused() -> None:
    with pytest.raises(JobSpecError, match=r"--model: template demo-mlp's trainer .* takes no model argument"):
        resolve_spec(load_template("demo-mlp"), "fedavg", model="/models/gpt2")


def test_switches_take_true_or_false_and_values_take_values(tmp_path: Path) -> None:
    spec = _spec("hf-sft", "packing=true", "chat_template=false", model="/models/m")
    argv = _script_args(create_job(spec, tmp_path))
    assert "--packing" in argv and "--chat-template" not in argv
    with pytest.raises(JobSpecError, match=r"packing=maybe, but --packing is a switch; write packing=true"):
        _spec("hf-sft", "packing=maybe", model="/models/m")
    with pytest.raises(JobSpecError, match=r"lr=true, but the trainer's --lr takes a value \(float\)"):
        resolve_spec(load_template("demo-mlp"), "fedavg", extra_args={"lr": True})


def test_each_sites_own_arguments_are_checked_too() -> None:
    with pytest.raises(JobSpecError, match=r"site-2's arguments: .*invalid int value: 'two'"):
        resolve_spec(
            load_template("nemo-sft-1.3b"),
            "fedavg",
            sites=["site-1", "site-2", "site-3"],
            site_overrides={"site-2": {"devices": "two"}},
        )


def test_the_servers_model_follows_the_trainer_arguments(tmp_path: Path) -> None:
    spec = _spec("hf-lora", "lora_r=16", "lora_alpha=32", "target_modules=c_attn", model="/models/m")
    args = _server_model_args(create_job(spec, tmp_path))
    assert args == {"model": "/models/m", "r": 16, "alpha": 32, "target_modules": "c_attn"}
    # The server builds LoraAdapterWeights(**args): the same adapter shape as the sites'.
    assert set(args) <= set(inspect.signature(LoraAdapterWeights).parameters)
    assert _spec("nemo-ptuning-345m", "virtual_tokens=4", "encoder_hidden=64").initial_args == {
        "total_virtual_tokens": 4,
        "token_dim": 1024,
        "encoder_hidden": 64,
        "num_layers": 2,
    }


def test_ptuning_token_dim_is_the_hidden_size_of_a_local_model(tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    write_yaml(model / "config.json", json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12}))
    spec = resolve_spec(load_template("hf-ptuning"), "fedavg", model=str(model))
    assert spec.initial_args == {"token_dim": 768, "num_virtual_tokens": 10, "encoder_hidden_size": 0}
    server = PeftPromptEncoderWeights(**spec.initial_args)
    assert server.embedding.weight.shape == (10, 768) and server.mlp_head[0].out_features == 768
    assert not [n for n in spec.notes if "token_dim" in n]


def test_ptuning_with_a_model_not_readable_here_keeps_the_templates_token_dim_and_says_so() -> None:
    spec = resolve_spec(load_template("hf-ptuning"), "fedavg", model="/only/on/the/sites/gpt2")
    assert spec.initial_args["token_dim"] == 96
    (note,) = [n for n in spec.notes if "token_dim" in n]
    assert "token_dim 96 (the template's) kept" in note and "initial_model.args.token_dim" in note


def test_nemo_arguments_are_checked_without_nemo() -> None:
    """NeMo's trainers import NeMo when they run: checking their arguments must not need it."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["nemo"] = None  # any import of NeMo fails
        from fedllm.jobs.create import JobSpecError, resolve_spec
        from fedllm.jobs.template import load_template
        spec = resolve_spec(load_template("nemo-ptuning-345m"), "fedavg", extra_args={"virtual_tokens": "4"})
        assert spec.initial_args["total_virtual_tokens"] == 4, spec.initial_args
        try:
            resolve_spec(load_template("nemo-ptuning-20b"), "fedavg", extra_args={"encoder_hiden": "64"})
        except JobSpecError as exc:
            assert "did you mean encoder_hidden?" in str(exc), exc
        else:
            raise AssertionError("a misspelt argument was accepted")
        assert not [m for m in sys.modules if m.startswith(("nemo.", "transformers", "megatron"))]
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_misspelt_fedllm_trainer_is_refused_and_another_packages_goes_unchecked(tmp_path: Path) -> None:
    typo = write_yaml(tmp_path / "typo.yaml", {"name": "typo", "trainer": "fedllm.training.toy.demo_mpl"})
    with pytest.raises(JobSpecError, match=r"no such fedllm module.*did you mean fedllm.training.toy.demo_mlp\?"):
        resolve_spec(load_template(str(typo)), "fedavg")
    theirs = write_yaml(tmp_path / "theirs.yaml", {"name": "theirs", "trainer": "their_lab.trainer"})
    spec = resolve_spec(load_template(str(theirs)), "fedavg", extra_args={"anything": "1"})
    assert any("trainer module their_lab.trainer is not installed here" in n for n in spec.notes)


def test_every_shipped_trainer_exposes_its_parser() -> None:
    from fedllm.jobs.template import available_templates

    for name in available_templates():
        trainer = trainer_arguments(load_template(name).trainer)
        assert {"epochs", "devices"} <= set(trainer.actions), name


@pytest.mark.parametrize("item", ["lr", "=1", "a b=1", "lr="])
def test_a_malformed_assignment_says_how_to_write_it(item: str) -> None:
    with pytest.raises(JobSpecError, match=r"-a"):
        parse_assignments([item])
