"""Generation with a NeMo job's result, through NeMo: the seeds' notebook inference, in one process.

p-tuning: NeMo's MegatronGPTPromptLearningModel on the frozen base GPT, its prompt encoder replaced by the
job's global one, generates the label after "{sentence} sentiment:". SFT: the base Megatron-GPT with the
job's global weights loaded generates the answer to each input. Both greedy, as the seeds' notebook.
One process: a checkpoint saved at tensor parallelism > 1 is refused with the fix (convert it to TP 1).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.checkpoint.archive import read_header
from fedllm.checkpoint.model_spec import ModelSpec
from fedllm.checkpoint.verify import check_integrity
from fedllm.training.nemo.config import (
    PTUNING_TASK,
    OptimSettings,
    PtuningSettings,
    TrainerSettings,
    ptuning_config,
    trainer_config,
)
from fedllm.training.nemo.errors import NemoLaunchError
from fedllm.training.nemo.prompt_encoder import load_prompt_encoder_state
from fedllm.training.nemo.site import build_trainer, machine_trainer_settings, start_nemo
from fedllm.training.nemo.weights import load_weights

GREEDY = {
    "use_greedy": True,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "add_BOS": False,
    "all_probs": False,
    "compute_logprob": False,
    "end_strings": ["<|endoftext|>", "</s>"],
}


def _single_process(model: Path) -> dict[str, Any]:
    """The checkpoint's config, after refusing one that needs several processes."""
    header = read_header(model)
    spec = ModelSpec.from_config(header.config, str(model))
    if spec.tensor_parallel != 1:
        raise NemoLaunchError(
            f"{model}: tensor_model_parallel_size is {spec.tensor_parallel}; inference here runs in one process. "
            f"Fix: `fedllm ckpt convert --source {model} --target <tp1>.nemo --target-tp 1` and infer with that"
        )
    check_integrity(model)  # NeMo's torch.load checks no CRC
    return header.config


def _trainer_settings() -> TrainerSettings:
    return machine_trainer_settings(1, "bf16-mixed", max_steps=1)


def generate_sentiment(
    language_model: Path,
    prompt_encoder: Mapping[str, Any],
    sentences: list[str],
    *,
    virtual_tokens: int = 10,
    encoder_hidden: int = 2048,
    max_tokens: int = 4,
) -> list[str]:
    """The label NeMo's p-tuned model generates after each sentence (its first generated word)."""
    start_nemo()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_prompt_learning_model import (
        MegatronGPTPromptLearningModel,
    )
    from omegaconf import OmegaConf

    config = _single_process(language_model)
    seq_length = int(config.get("max_position_embeddings") or config.get("encoder_seq_length") or 1024)
    with tempfile.TemporaryDirectory(prefix="fedllm-infer-") as tmp:
        settings = PtuningSettings(
            language_model_path=str(language_model), train_files=[], validation_files=[],
            nemo_path=os.path.join(tmp, "ptuned.nemo"), encoder_hidden=encoder_hidden, virtual_tokens=virtual_tokens,
            global_batch_size=1, micro_batch_size=1, max_seq_length=seq_length, num_workers=0,
            trainer=_trainer_settings(), optim=OptimSettings(),
        )  # fmt: skip
        cfg = OmegaConf.create(ptuning_config(settings))
        model = MegatronGPTPromptLearningModel(cfg.model, trainer=build_trainer(cfg, 1))
        if model.prompt_encoder is None:
            model.init_prompt_encoder()
        load_prompt_encoder_state(model.prompt_encoder, prompt_encoder)
        model.prompt_encoder.clear_inference_table()
        model.eval()
        inputs = [{"taskname": PTUNING_TASK, "sentence": s, "label": ""} for s in sentences]
        out = model.generate(inputs, length_params={"max_length": max_tokens, "min_length": 1}, sampling_params=None)
    texts = out["sentences"] if isinstance(out, dict) else out
    return [_after(text, "sentiment:") for text in texts]


def generate_answers(
    base_model: Path, weights: Mapping[str, Any], prompts: list[str], max_tokens: int = 8
) -> list[str]:
    """What the base Megatron-GPT with an SFT job's global weights answers to each prompt (greedy)."""
    start_nemo()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from omegaconf import OmegaConf

    _single_process(base_model)
    cfg = OmegaConf.create(
        {"trainer": trainer_config(_trainer_settings()), "model": {"gradient_as_bucket_view": False}}
    )
    model = MegatronGPTModel.restore_from(
        str(base_model), trainer=build_trainer(cfg, 1), save_restore_connector=NLPSaveRestoreConnector()
    )
    load_weights(
        model,
        weights,
        f"the job's global weights do not fit {base_model}",
        "pass the base .nemo the SFT job was created with (TP 1)",
    )
    model.eval()
    out = model.generate(prompts, length_params={"max_length": max_tokens, "min_length": 1}, sampling_params=GREEDY)
    return [
        text[len(prompt) :].strip() if text.startswith(prompt) else text.strip()
        for prompt, text in zip(prompts, out["sentences"], strict=True)
    ]


def _after(text: str, marker: str) -> str:
    """The first word after `marker` in a generated text ("" when the model produced none)."""
    tail = text.split(marker, 1)[1] if marker in text else ""
    words = tail.split()
    return words[0] if words else ""
