"""SFT and LoRA with TRL's SFTTrainer on a tiny GPT, without NVFlare: what is exchanged, what is scored, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllm.data.synthetic import sentiment_records
from fedllm.flare.server_models import CausalLMWeights, LoraAdapterWeights, ParameterTree
from fedllm.training.hf.sft import build_trainer, parser, sft_records, steps_per_round
from fedllm.training.hf.trainer_options import TrainerOptionError, resolve_precision


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    return [{"input": f"{r['sentence']} sentiment:", "output": r["label"]} for r in sentiment_records(n, seed=seed)]


def _args(tiny_gpt: Path, method: str, *extra: str):
    argv = ["--model", str(tiny_gpt), "--train", "-", "--val", "-", "--batch-size", "8", "--max-length", "64"]
    args = parser(method).parse_args([*argv, *extra])
    args.model_path = str(tiny_gpt)
    return args


def test_lora_trains_only_the_adapter_the_server_keeps(tiny_gpt, tmp_path: Path) -> None:
    from peft import get_peft_model_state_dict

    trainer = build_trainer(
        _args(tiny_gpt, "lora", "--lr", "0.01", "--epochs", "2"), "lora", _pairs(64, 1), _pairs(16, 2), tmp_path
    )
    server = LoraAdapterWeights(str(tiny_gpt)).state_dict()
    state = get_peft_model_state_dict(trainer.model)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in server.items()}
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    before = trainer.evaluate(metric_key_prefix="global_val")
    trainer.train()
    after = trainer.evaluate()
    assert after["val_loss"] < before["global_val_loss"] * 0.5
    assert after["val_perplexity"] == pytest.approx(torch.tensor(after["val_loss"]).exp().item(), rel=1e-5)
    assert steps_per_round(trainer, 2) == 2 * 8 == trainer.state.global_step


def test_full_sft_exchanges_every_weight_and_scores_only_the_answer(tiny_gpt, tmp_path: Path) -> None:
    trainer = build_trainer(_args(tiny_gpt, "full"), "full", _pairs(8, 1), _pairs(4, 2), tmp_path)
    assert set(trainer.model.state_dict()) == set(CausalLMWeights(str(tiny_gpt)).state_dict())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    tokenizer = trainer.processing_class
    for row in range(2):
        scored = batch["labels"][row][batch["labels"][row] != -100].tolist()
        # Completion-only loss: " <label>" and EOS carry the loss, the sentence and "sentiment:" do not.
        assert tokenizer.decode(scored).strip() in {
            f"{lab}{tokenizer.eos_token}" for lab in ("positive", "neutral", "negative")
        }


def test_sft_records_follow_nemo_prompt_or_the_chat_template() -> None:
    plain = sft_records([{"input": "Q?", "output": "A."}])
    assert plain == [{"prompt": "Q?", "completion": " A."}]
    chat = sft_records([{"input": "Q?", "output": "A."}], chat=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": "Q?"}]
    assert chat[0]["completion"] == [{"role": "assistant", "content": "A."}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
def test_what_a_cpu_site_cannot_do_is_refused_with_the_way_out(tiny_gpt, tmp_path: Path) -> None:
    data = _pairs(4, 1)
    with pytest.raises(TrainerOptionError, match=r"refuses FSDP.*--quantize 4bit"):
        build_trainer(_args(tiny_gpt, "full", "--fsdp"), "full", data, data, tmp_path)
    with pytest.raises(TrainerOptionError, match=r"QLoRA\) needs a CUDA GPU.*drop quantize"):
        build_trainer(_args(tiny_gpt, "lora", "--quantize", "4bit"), "lora", data, data, tmp_path)
    with pytest.raises(TrainerOptionError, match="fp16 needs a CUDA GPU"):
        build_trainer(_args(tiny_gpt, "full", "--precision", "fp16"), "full", data, data, tmp_path)
    assert resolve_precision("auto") == "fp32"


def test_parameter_tree_keeps_dotted_names() -> None:
    tree = ParameterTree({"a.b.weight": torch.ones(2, 3), "a.bias": torch.zeros(2), "top": torch.ones(1)})
    assert {k: tuple(v.shape) for k, v in tree.state_dict().items()} == {
        "a.b.weight": (2, 3),
        "a.bias": (2,),
        "top": (1,),
    }


def test_warmup_is_a_number_of_steps_every_allowed_transformers_reads_alike(tiny_gpt, tmp_path: Path) -> None:
    """--warmup-ratio 0.25 of 8 steps warms up over 2: a ratio passed as warmup_steps would be 0.25 steps on
    transformers 4 (which the hf extra allows), i.e. no warmup."""
    from fedllm.training.hf.trainer_options import warmup_steps

    assert warmup_steps(0.03, 100) == 3 and warmup_steps(0.03, 3) == 1 and warmup_steps(0.0, 50) == 0
    args = _args(tiny_gpt, "lora", "--lr", "0.01", "--warmup-ratio", "0.25", "--lr-scheduler", "linear")
    trainer = build_trainer(args, "lora", _pairs(64, 1), _pairs(8, 2), tmp_path)
    assert trainer.args.warmup_steps == 0, "set once the schedule's length is known"
    trainer.args.warmup_steps = warmup_steps(args.warmup_ratio, steps_per_round(trainer, 1))
    trainer.args.logging_steps = 1
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    # The LR each step used: up from 0 over the 2 warmup steps to 0.01, then linearly down towards 0 at step 8.
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.01 * 5 / 6, 0.01 * 4 / 6, 0.01 * 3 / 6, 0.01 * 2 / 6, 0.01 / 6])
