"""The NeMo configs fedllm builds, checked against the source of the NeMo releases it supports.

For nemo_toolkit 2.2.1 and 2.5.0 (the ends of >=2.2,<2.5.1; NeMo 2.4.1 itself runs in the nemo tests)
and the Lightning each runs on:
every model key fedllm sets is one NeMo's model classes read (a typo or a dropped key fails here),
every key those classes require is set, the trainer keys are Lightning Trainer arguments, and the
optimizer/scheduler names and arguments exist in NeMo's registries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fedllm.training.nemo import config as C
from tests.support.nemo_source import (
    CfgRead,
    dict_keys_assigned,
    init_parameters,
    init_parameters_with_bases,
    is_read,
    scan_file,
    self_attributes,
)

# NeMo's and Lightning's wheels come from PyPI (cached under ~/.cache/fedllm after the first run).
pytestmark = pytest.mark.network

LM = "nemo/collections/nlp/models/language_modeling/"
MODEL_ROOTS = {
    "cfg": "model",
    "self.cfg": "model",
    "self._cfg": "model",
    "task_templates": "model.task_templates",
    "data_cfg": "model.data.*_ds",
}
PTUNING_FILES = [LM + "megatron_gpt_prompt_learning_model.py", LM + "megatron_base_prompt_learning_model.py"]
SFT_FILES = [LM + "megatron_gpt_sft_model.py", LM + "megatron_gpt_model.py"]
COMMON_FILES = [LM + "megatron_base_model.py", "nemo/core/classes/modelPT.py"]


def leaves(d: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict):
            yield from leaves(value, path)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                yield from leaves(item, path + "[]")
        else:
            yield path, value


def reads(release, files: list[str]) -> list[CfgRead]:
    out: list[CfgRead] = []
    for f in files:
        out += scan_file(release.root, f, MODEL_ROOTS)
    return out


def ptuning() -> dict:
    return C.ptuning_config(C.PtuningSettings("gpt.nemo", ["train.jsonl"], ["val.jsonl"], "ptuned.nemo"))


def sft() -> dict:
    return C.sft_config(C.SftSettings(["a.jsonl"], ["val.jsonl"], trainer=C.TrainerSettings(max_steps=10)))


def _model_keys(cfg: dict) -> list[str]:
    # optim.* are optimizer/scheduler kwargs, checked against NeMo's registries below.
    return [p for p, _ in leaves(cfg["model"], "model") if not p.startswith("model.optim.")]


BUILDER = "nemo/collections/nlp/parts/megatron_trainer_builder.py"


def builder_reads(release) -> list[CfgRead]:
    """NeMo's MegatronTrainerBuilder reads the whole config (self.cfg.trainer..., self.cfg.model...)."""
    return scan_file(release.root, BUILDER, {"self.cfg": ""})


@pytest.mark.parametrize(("name", "build", "files"), [("p-tuning", ptuning, PTUNING_FILES), ("sft", sft, SFT_FILES)])
def test_every_model_key_is_read_by_nemo(nemo_release, name, build, files):
    r = reads(nemo_release, files + COMMON_FILES) + builder_reads(nemo_release)
    unread = [p for p in _model_keys(build()) if not is_read(p, r)]
    assert not unread, f"NeMo {nemo_release.version} {name} never reads {unread}"


def test_ptuning_sets_every_key_nemo_requires(nemo_release):
    r = reads(nemo_release, PTUNING_FILES)
    ours = {p for p, _ in leaves(ptuning()["model"], "model")}
    prefixes = {
        q
        for p in ours
        for i in range(p.count(".") + 1)
        for q in {p.rsplit(".", i)[0], p.rsplit(".", i)[0].removesuffix("[]")}
    }
    # Read only behind a guard: test_ds when cfg.data.get("test_ds") is set, inference when hasattr(cfg,
    # "inference"), nemo_path at the end of training (set), optim.sched via NeMo's scheduler builder.
    guarded = {"model.data.test_ds", "model.inference"}
    required = {x.path for x in r if x.required and not x.path.startswith(tuple(guarded))}
    missing = sorted(p for p in required if p not in prefixes)
    assert not missing, f"NeMo {nemo_release.version} prompt learning requires {missing}"


def test_ptuning_overrides_the_defaults_that_differ_from_the_seeds(nemo_release):
    r = {x.path: x for x in reads(nemo_release, PTUNING_FILES) if not x.required}
    model = ptuning()["model"]
    task = model["task_templates"][0]
    # NeMo defaults to loss on the whole sequence and to the TP-sharded encoder; the seeds want neither.
    assert r["model.task_templates[].answer_only_loss"].default is False and task["answer_only_loss"] is True
    assert r["model.p_tuning.encoder_type"].default == "tpmlp" and model["p_tuning"]["encoder_type"] == "mlp"
    assert task["prompt_template"] == "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
    assert task["total_virtual_tokens"] == 10 == sum(task["virtual_token_splits"])


def test_prompt_encoder_type_and_layout_exist_in_nemo(nemo_release):
    src = (nemo_release.root / "nemo/collections/nlp/modules/common/prompt_encoder.py").read_text()
    assert 'MLP = "mlp"' in src
    # The server's PromptEncoderWeights mirrors these submodule names; the cache is not exchanged.
    assert {"embedding", "mlp_head", "inference_table"} <= self_attributes(src, "PromptEncoder")


@pytest.mark.parametrize("build", [ptuning, sft])
def test_sets_every_key_nemos_trainer_builder_requires(nemo_release, build):
    cfg = build()
    ours = {p for p, _ in leaves(cfg, "")} | {
        p for p, _ in leaves({"trainer": cfg["trainer"], "model": cfg["model"]}, "")
    }
    ours = {p.lstrip(".") for p in ours}
    prefixes = {p.rsplit(".", i)[0] for p in ours for i in range(p.count(".") + 1)}
    # exp_manager is only touched when async checkpoint saving is on (it is off: no exp_manager at all).
    required = {x.path for x in builder_reads(nemo_release) if x.required and not x.path.startswith("exp_manager")}
    assert not sorted(required - prefixes), (
        f"NeMo {nemo_release.version}'s trainer builder requires {sorted(required - prefixes)}"
    )


@pytest.mark.parametrize("build", [ptuning, sft])
def test_trainer_keys_are_lightning_trainer_arguments(nemo_release, build):
    src = (nemo_release.lightning_root / nemo_release.trainer_file).read_text()
    unknown = set(build()["trainer"]) - init_parameters(src, "Trainer")
    assert not unknown, f"Lightning for NeMo {nemo_release.version} has no Trainer argument {sorted(unknown)}"


@pytest.mark.parametrize("build", [ptuning, sft])
def test_optimizer_and_scheduler_exist_in_nemo(nemo_release, build):
    optim = build()["model"]["optim"]
    opt_src = (nemo_release.root / "nemo/core/optim/optimizers.py").read_text()
    sched_src = (nemo_release.root / "nemo/core/optim/lr_scheduler.py").read_text()
    assert optim["name"] in dict_keys_assigned(opt_src, "AVAILABLE_OPTIMIZERS")
    sched = dict(optim["sched"])
    assert sched.pop("name") in dict_keys_assigned(sched_src, "AVAILABLE_SCHEDULERS")
    assert set(sched) <= init_parameters_with_bases(sched_src, "CosineAnnealing")


def test_sft_dataset_keys_match_the_seed_records(nemo_release):
    r = {x.path: x for x in reads(nemo_release, SFT_FILES) if not x.required}
    ds = sft()["model"]["data"]["train_ds"]
    # NeMo's SFT defaults expect {"input", "answer"}; the seeds' records are {"input", "output"}.
    assert r["model.data.*_ds.label_key"].default == "answer" and ds["label_key"] == "output"
    assert ds["prompt_template"] == "{input} {output}"
    assert len(ds["concat_sampling_probabilities"]) == len(ds["file_names"])


def test_random_345m_checkpoint_config_is_what_megatron_gpt_reads(nemo_release):
    from fedllm.apps.random_checkpoint import gpt_model_config

    cfg = gpt_model_config("tokenizer.model")
    files = [LM + "megatron_gpt_model.py", *COMMON_FILES, "nemo/collections/nlp/modules/common/tokenizer_utils.py"]
    r = reads(nemo_release, files)
    r += scan_file(nemo_release.root, LM + "megatron_base_model.py", {"tokenizer_cfg": "model.tokenizer"})
    r += builder_reads(nemo_release)
    unread = [p for p, _ in leaves(cfg, "model") if not p.startswith("model.optim.") and not is_read(p, r)]
    assert not unread, f"NeMo {nemo_release.version}'s MegatronGPTModel never reads {unread}"
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (24, 1024, 16)
