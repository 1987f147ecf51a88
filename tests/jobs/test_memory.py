"""Fit before running: model sizes read from real configs, the estimate against the seeds' figures, fit's choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from fedllm.config.memory import ModelSize, Workload, estimate, fit
from fedllm.config.workloads import NEEDS, SEED_ESTIMATES
from fedllm.jobs.errors import JobSpecError
from fedllm.jobs.memory import model_size, workload_for
from fedllm.jobs.trainer_args import trainer_arguments
from fedllm.resources import resource_dir

GPT2 = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "n_embd": 64,
    "n_layer": 3,
    "n_head": 4,
    "n_positions": 128,
    "vocab_size": 1000,
}
LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}
# Llama-3-8B's published config.json (architecture fields): 8,030,261,248 parameters.
LLAMA3_8B = {
    **LLAMA,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
}


def _folder(tmp_path: Path, config: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _built_parameters(config: dict) -> int:
    """What transformers builds from the config (on the meta device: shapes only), shared tensors counted once."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "config",
    [
        GPT2,
        LLAMA,
        {**LLAMA, "tie_word_embeddings": True},
        {**LLAMA, "attention_bias": True, "mlp_bias": True},
        {**LLAMA, "model_type": "mistral", "architectures": ["MistralForCausalLM"]},
        {**LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
        LLAMA3_8B,
    ],
    ids=["gpt2", "llama-gqa-untied", "llama-tied", "llama-bias", "mistral", "qwen2", "llama3-8b"],
)
def test_parameter_count_from_config_json_is_what_transformers_builds(tmp_path: Path, config: dict) -> None:
    size = model_size(str(_folder(tmp_path, config)))
    assert size is not None
    assert size.parameters == _built_parameters(config)
    assert (size.layers, size.hidden, size.vocab) == (
        config.get("n_layer") or config["num_hidden_layers"],
        config.get("n_embd") or config["hidden_size"],
        config["vocab_size"],
    )
    if config is LLAMA3_8B:
        assert size.parameters == 8_030_261_248 and size.label == "8B"


def test_safetensors_headers_give_the_exact_count_single_and_sharded(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA))
    expected = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for name in ("one", "sharded"):
        size = model_size(str(tmp_path / name))
        assert size is not None and size.parameters == expected and "safetensors" in size.source
    # An index whose shards are elsewhere: its total_size over the dtype's width.
    for shard in (tmp_path / "sharded").glob("*.safetensors"):
        shard.unlink()
    size = model_size(str(tmp_path / "sharded"))
    assert size is not None and size.parameters == expected and "total_size" in size.source


def test_a_nemo_config_counts_like_the_gpt2_of_the_same_shapes(tmp_path: Path) -> None:
    """A legacy Megatron-GPT has GPT-2's tensors: vocabulary padded to 128 × TP, learned positions, tied output."""
    folder = tmp_path / "tiny.nemo.d"
    folder.mkdir()
    cfg = {
        "hidden_size": 64,
        "num_layers": 3,
        "num_attention_heads": 4,
        "ffn_hidden_size": 256,
        "max_position_embeddings": 128,
        "encoder_seq_length": 128,
        "tensor_model_parallel_size": 2,
        "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer"},
    }
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    size = model_size(str(folder))
    assert size is not None
    assert size.vocab == 50432  # 50257 padded to a multiple of 128 × 2
    assert size.parameters == _built_parameters({**GPT2, "vocab_size": 50432})
    assert size.tensor_parallel == 2 and not size.fused_attention  # legacy attention stores the scores
    (folder / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "use_flash_attention": True}))
    assert model_size(str(folder)).fused_attention  # type: ignore[union-attr]


def test_models_not_readable_here_have_no_size_and_damaged_ones_name_the_file(tmp_path: Path) -> None:
    assert model_size("meta-llama/Llama-3.2-1B") is None
    assert model_size(str(tmp_path / "absent")) is None
    assert model_size(str(tmp_path / "absent.nemo")) is None
    assert model_size("{data_dir}/model") is None
    assert model_size(str(_folder(tmp_path, {"model_type": "bert"}, "no-shapes"))) is None
    bad = _folder(tmp_path, GPT2, "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(JobSpecError, match=r"cannot read .*config\.json"):
        model_size(str(bad))
    (bad / "config.json").write_text(json.dumps(GPT2))
    (bad / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(JobSpecError, match=r"model\.safetensors is not a readable safetensors file"):
        model_size(str(bad))


# The seeds' published figures, GiB per GPU (GPU makers' "GB" are GiB: an A100-80GB has 80 GiB).
SEED_FIGURES = {"gpt-5b-sft": 100 / 2, "gpt-20b-ptuning-tp2": 64}
TOLERANCE = 0.10


@pytest.mark.parametrize("workload", sorted(SEED_FIGURES))
def test_the_estimate_is_within_ten_percent_of_the_seeds_where_their_jobs_run_at_full_length(workload: str) -> None:
    size, settings = SEED_ESTIMATES[workload]
    total = estimate(size, settings).total
    assert abs(total - SEED_FIGURES[workload]) <= TOLERANCE * SEED_FIGURES[workload], total
    assert NEEDS[workload].free_gib_per_gpu == pytest.approx(total, abs=0.1)  # preflight's figure is the estimate


def test_where_the_estimate_overstates_the_seeds_their_figures_stay_and_the_numbers_are_the_documented_ones() -> None:
    """docs/workloads.md's table: at max_seq_length the 345M and 1.3B estimates exceed what the seeds ran."""
    totals = {w: round(estimate(*SEED_ESTIMATES[w]).total, 1) for w in SEED_ESTIMATES}
    assert totals == {"gpt-345m-ptuning": 13.2, "gpt-1.3b-sft": 31.7, "gpt-5b-sft": 50.4, "gpt-20b-ptuning-tp2": 63.8}
    assert NEEDS["gpt-345m-ptuning"].free_gib_per_gpu == 5 and NEEDS["gpt-1.3b-sft"].free_gib_per_gpu == 25
    size_13b, sft = SEED_ESTIMATES["gpt-1.3b-sft"]
    parts = estimate(size_13b, sft)
    assert parts.weights + parts.gradients + parts.optimizer == pytest.approx(16 * size_13b.parameters / 1024**3)


LLAMA_1B = ModelSize(1_235_814_400, 16, 2048, 128256, 32, 128256 * 2048)


def test_fit_halves_the_micro_batch_then_turns_on_checkpointing_then_4bit() -> None:
    lora = Workload("lora", micro_batch=16, seq_len=2048)
    per_mb = {mb: estimate(LLAMA_1B, Workload("lora", micro_batch=mb, seq_len=2048)).total for mb in (16, 8, 4, 2, 1)}
    # Room for micro-batch 4 but not 8: the largest power-of-two step that fits is chosen.
    chosen = fit(LLAMA_1B, lora, (per_mb[4] + per_mb[8]) / 2, margin=0)
    assert (chosen.micro_batch, chosen.checkpointing, chosen.quantize, chosen.problem) == (4, False, "none", None)
    assert chosen.estimate.total == pytest.approx(per_mb[4])
    # Not even micro-batch 1 without checkpointing: without auto that is the problem; with auto checkpointing
    # comes first, at the largest micro-batch it allows.
    tight = per_mb[1] - 0.5
    assert fit(LLAMA_1B, lora, tight, margin=0).problem is not None
    chosen = fit(LLAMA_1B, lora, tight, margin=0, auto=True)
    assert chosen.checkpointing and chosen.quantize == "none" and chosen.fits
    assert chosen.micro_batch == max(
        mb
        for mb in (16, 8, 4, 2, 1)
        if estimate(LLAMA_1B, Workload("lora", micro_batch=mb, seq_len=2048, checkpointing=True)).total <= tight
    )
    # Room for the fp32 base and the CUDA context only: just a 4-bit base fits.
    base_fp32 = 4 * LLAMA_1B.parameters / 1024**3
    chosen = fit(LLAMA_1B, lora, base_fp32 + 1, margin=0, auto=True)
    assert (chosen.checkpointing, chosen.quantize, chosen.workload.method) == (True, "4bit", "qlora") and chosen.fits
    # Full SFT is never quantized.
    assert fit(LLAMA_1B, Workload("full"), base_fp32 + 1, margin=0, auto=True).quantize == "none"


def test_the_margin_is_kept() -> None:
    need = estimate(LLAMA_1B, Workload("lora")).total
    assert fit(LLAMA_1B, Workload("lora"), need / 0.9 + 0.01, margin=0.1).fits
    assert not fit(LLAMA_1B, Workload("lora"), need / 0.9 - 0.01, margin=0.1).fits


def test_an_8b_full_sft_on_one_24_gib_gpu_is_refused_naming_site_need_gpus_and_fix(tmp_path: Path) -> None:
    size = model_size(str(_folder(tmp_path, LLAMA3_8B)))
    assert size is not None
    sft = Workload("full", micro_batch=1, seq_len=512, checkpointing=True)  # hf-sft's template settings
    result = fit(size, sft, 24, site="site-2", gpus=1, template="hf-sft", auto=True)
    need = estimate(size, sft).total
    assert not result.fits and need > 100  # 16 bytes per parameter: ~120 GiB
    message = result.problem
    assert message is not None and "\n" not in message
    assert message.startswith(f"site-2: hf-sft of an 8B model needs ~{need:.0f} GiB per GPU at micro-batch 1")
    assert "it has 1 × 24 GiB (21.6 GiB usable with a 10% margin)" in message
    assert "use hf-lora with quantize=4bit" in message  # QLoRA fits 24 GiB; plain LoRA's fp32 base does not
    assert "give it GPUs with ≥ 135 GiB each" in message
    qlora = fit(size, Workload("qlora", seq_len=512, checkpointing=True), 24, site="site-2")
    assert qlora.fits and qlora.estimate.total < 24 * 0.9


def test_a_nemo_site_is_told_the_tensor_parallel_size_that_fits() -> None:
    size, settings = SEED_ESTIMATES["gpt-5b-sft"]
    one_gpu = Workload("full", micro_batch=1, seq_len=2048, backend="nemo")
    message = fit(size, one_gpu, 80, site="site-1", template="nemo-sft-5b").problem
    assert message is not None and "give it 2 GPUs with the checkpoint converted to tensor parallel 2" in message
    assert fit(size, settings, 80).fits


def test_without_auto_the_problem_names_the_switch_that_would_fit_and_nemo_gets_no_recomputation() -> None:
    full = Workload("full", seq_len=2048)
    with_ckpt = estimate(LLAMA_1B, Workload("full", seq_len=2048, checkpointing=True)).total
    without = estimate(LLAMA_1B, full).total
    gpu = (with_ckpt + without) / 2
    message = fit(LLAMA_1B, full, gpu, margin=0, site="site-1", template="hf-sft").problem
    assert message is not None and "set -a gradient_checkpointing=true" in message
    assert fit(LLAMA_1B, full, gpu, margin=0, auto=True).checkpointing
    # fedllm's NeMo trainers have no recomputation setting: auto never turns it on for them.
    nemo = Workload("full", seq_len=2048, backend="nemo")
    assert not fit(LLAMA_1B, nemo, 1, auto=True).checkpointing


TEMPLATE_OF_SEED = {
    "gpt-345m-ptuning": "nemo-ptuning-345m",
    "gpt-1.3b-sft": "nemo-sft-1.3b",
    "gpt-5b-sft": "nemo-sft-5b",
    "gpt-20b-ptuning-tp2": "nemo-ptuning-20b",
}


def _template_workload(name: str) -> Workload | None:
    """What workload_for makes of a shipped template's own arguments, parsed by its trainer's parser."""
    template = yaml.safe_load((resource_dir("jobs") / f"{name}.yaml").read_text())
    parser = trainer_arguments(template["trainer"])
    args = {k: v for k, v in template["train_args"].items() if parser.takes(k)}
    _, parsed = parser.check(args, name)
    return workload_for(template["trainer"], vars(parsed), template["defaults"]["devices"])


@pytest.mark.parametrize("seed", sorted(TEMPLATE_OF_SEED))
def test_the_workload_table_estimates_the_seed_templates_own_settings(seed: str) -> None:
    assert _template_workload(TEMPLATE_OF_SEED[seed]) == SEED_ESTIMATES[seed][1]


def test_workload_for_reads_the_hf_templates_and_knows_no_demo() -> None:
    sft = _template_workload("hf-sft")
    assert sft == Workload("full", micro_batch=1, seq_len=512, checkpointing=True)
    lora = _template_workload("hf-lora")
    assert lora is not None and lora.method == "lora" and lora.backend == "hf"
    assert workload_for("fedllm.training.hf.lora", {"batch_size": 2, "max_length": 64, "quantize": "4bit"}, 2) == (
        Workload("qlora", micro_batch=2, seq_len=64, processes=2)
    )
    ptuning = _template_workload("hf-ptuning")
    assert ptuning is not None and ptuning.method == "ptuning" and ptuning.encoder_hidden is None
    assert _template_workload("demo-mlp") is None
