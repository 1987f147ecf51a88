"""Show fedllm's NeMo fixes at work: NeMo failing without each, then getting past it once it is applied.

    python -m tests.support.nemo_probe WORKDIR FIX [FIX ...]

applies every fix but the listed ones (and the CPU layer); then, for each listed fix in turn, runs the NeMo
workload that fix is for and prints `UNFIXED <fix> <error>` (the fixes after it are still missing, so the
list is in the order NeMo's code meets the bugs), applies the fix and goes on; once a workload's fixes are
all applied it runs that workload through and prints `FIXED <fix> ok` for each of them.
Each workload is NeMo's own code (building a Megatron-GPT, a p-tuning step, generation, an SFT step).
Every model in the process uses the same batch sizes: Megatron's micro-batch calculator is one per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from fedllm.data.synthetic import sentiment_records

TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4}


def _trainer():
    from omegaconf import OmegaConf

    from fedllm.training.nemo.config import TrainerSettings, trainer_config
    from fedllm.training.nemo.site import build_trainer

    settings = TrainerSettings(accelerator="cpu", precision=32, max_steps=2, max_epochs=-1)
    cfg = {"trainer": trainer_config(settings), "model": {"gradient_as_bucket_view": False}}
    return build_trainer(OmegaConf.create(cfg), 1)


def _gpt_config(work: Path, mcore: bool):
    from omegaconf import OmegaConf

    from fedllm.apps.random_checkpoint import gpt_model_config, train_tokenizer

    tokenizer = work / "tokenizer.model"  # where train_tokenizer writes it
    if not tokenizer.exists():
        text = work / "text.jsonl"
        text.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(200, seed=0)))
        train_tokenizer(text, work, 300)
    cfg = gpt_model_config(str(tokenizer), seq_length=64, mcore=mcore, gpu=False, **TINY)
    cfg["hidden_dropout"] = cfg["attention_dropout"] = 0.0
    return OmegaConf.create(cfg)


def build_mcore(work: Path):
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    return MegatronGPTModel(_gpt_config(work, mcore=True), trainer=_trainer())


def build_legacy(work: Path):
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    return MegatronGPTModel(_gpt_config(work, mcore=False), trainer=_trainer())


def legacy_forward(work: Path):
    import torch

    model = build_legacy(work).eval()
    tokens = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tril(torch.ones(1, 1, 4, 4)) < 0.5
    with torch.no_grad():
        logits = model.model(tokens, torch.arange(4)[None], mask)
    assert logits.shape[-1] >= 300, logits.shape


def _saved_gpt(work: Path, mcore: bool) -> Path:
    path = work / ("mcore.nemo" if mcore else "legacy.nemo")
    if not path.exists():
        (build_mcore if mcore else build_legacy)(work).save_to(str(path))
    return path


def _ptuning_model(work: Path):
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_prompt_learning_model import (
        MegatronGPTPromptLearningModel,
    )
    from omegaconf import OmegaConf

    from fedllm.training.nemo.config import PtuningSettings, TrainerSettings, ptuning_config

    data = work / "pt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(16, seed=1)))
    settings = PtuningSettings(
        language_model_path=str(_saved_gpt(work, mcore=True)), train_files=[str(data)], validation_files=[str(data)],
        nemo_path=str(work / "ptuned.nemo"), global_batch_size=8, micro_batch_size=4, encoder_hidden=16,
        virtual_tokens=4, max_seq_length=64, num_workers=0,
        trainer=TrainerSettings(accelerator="cpu", precision=32, max_steps=1, max_epochs=-1),
    )  # fmt: skip
    cfg = OmegaConf.create(ptuning_config(settings))
    cfg.model.optim = {"name": "adam", "lr": 1e-3}
    from fedllm.training.nemo.site import build_trainer

    model = MegatronGPTPromptLearningModel(cfg.model, trainer=build_trainer(cfg, 1))
    return model, model.trainer


def ptuning_step(work: Path):
    model, trainer = _ptuning_model(work)
    trainer.fit(model)
    assert trainer.global_step == 1


_GENERATOR: list = []


def ptuning_generate(work: Path):
    # One model for both runs: generation resets Megatron's batch sizes to its own, so a second model could not
    # be built in this process; the fix patches the model's class, which the same model then uses.
    if not _GENERATOR:
        _GENERATOR.append(_ptuning_model(work)[0])
    model = _GENERATOR[0]
    if model.prompt_encoder is None:
        model.init_prompt_encoder()
    model.eval()
    out = model.generate(
        [{"taskname": "sentiment", "sentence": "Sales rose .", "label": ""}],
        length_params={"max_length": 2, "min_length": 1},
        sampling_params=None,
    )
    assert out["sentences"], out


def sft_step(work: Path):
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
    from omegaconf import OmegaConf

    from fedllm.training.nemo.config import SftSettings, TrainerSettings, sft_config
    from fedllm.training.nemo.site import build_trainer

    data = work / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"input": r["sentence"], "output": r["label"]}) + "\n" for r in sentiment_records(16))
    )
    settings = SftSettings(
        train_files=[str(data)], validation_files=[str(data)], global_batch_size=8, micro_batch_size=4,
        max_seq_length=64, num_workers=0,
        trainer=TrainerSettings(accelerator="cpu", precision=32, max_steps=1, max_epochs=-1),
    )  # fmt: skip
    cfg = OmegaConf.create(sft_config(settings))
    cfg.model.optim = {"name": "adam", "lr": 1e-3}
    trainer = build_trainer(cfg, 1, builder="MegatronLMPPTrainerBuilder")
    path = str(_saved_gpt(work, mcore=True))
    model = MegatronGPTSFTModel.restore_from(path, MegatronGPTSFTModel.merge_cfg_with(path, cfg), trainer=trainer)
    trainer.fit(model)
    assert trainer.global_step == 1


def restore_per_rank_mcore(work: Path):
    """NeMo restores the per-rank (TE-named) file fedllm converts its own distributed checkpoint into."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector

    from fedllm.checkpoint import convert

    per_rank = work / "mcore_per_rank.nemo"
    if not per_rank.exists():
        convert(_saved_gpt(work, mcore=True), per_rank, 1, progress=False)
    MegatronGPTModel.restore_from(str(per_rank), trainer=_trainer(), save_restore_connector=NLPSaveRestoreConnector())


def deprecation_wait(_work: Path):
    from nemo.utils.decorators.deprecated import deprecated_warning

    started = time.monotonic()
    deprecated_warning("a deprecated fedllm probe")
    if time.monotonic() - started > 1.0:
        raise RuntimeError(f"deprecated_warning slept {time.monotonic() - started:.1f} s")


def dataset_helpers(_work: Path):
    """NeMo's compile step for its dataset helpers, as its compile_helper runs it (forced, so it really compiles)."""
    import nemo.collections.nlp.data.language_modeling.megatron as megatron_data

    path = Path(megatron_data.__file__).parent
    done = subprocess.run(["make", "-B", "-C", str(path)], capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"make failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")


WORKLOADS = {
    "nvidia_pytorch_version": build_mcore,
    "deprecation_sleep": deprecation_wait,
    "dataset_helpers_python": dataset_helpers,
    "apex_gate": build_mcore,
    "apex_only_names": sft_step,
    "clip_grads_without_apex": sft_step,
    "eager_layer_specs": build_mcore,
    "per_rank_norm_names": restore_per_rank_mcore,
    "process_groups_before_build": build_mcore,
    "prompt_learning_batches": ptuning_step,
    "prompt_learning_loss_signature": ptuning_step,
    "prompt_learning_generation_mask": ptuning_generate,
    "generation_imports_multimodal": ptuning_generate,
    "legacy_gpt_config_get": legacy_forward,
    "legacy_gpt_without_apex": legacy_forward,
}


def _run(workload, work: Path) -> str:
    try:
        workload(work)
    except BaseException as exc:  # NeMo calls sys.exit when a compile fails
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} [{where}]"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    work, *fixes = argv or sys.argv[1:]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if "dataset_helpers_python" in fixes:  # the PATH a site may have: the system's python3 first, not this venv's
        os.environ["PATH"] = os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != Path(sys.executable).parent
        )
    if "nvidia_pytorch_version" in fixes:
        os.environ.pop("NVIDIA_PYTORCH_VERSION", None)
    from fedllm.training.nemo import compat, cpu_layer

    importlib_nemo()
    compat.apply_nemo_fixes(skip=frozenset(fixes))
    cpu_layer.activate()
    done: list[str] = []
    for i, fix in enumerate(fixes):
        print(f"UNFIXED {fix} {_run(WORKLOADS[fix], work)}", flush=True)
        compat.apply_nemo_fixes(skip=frozenset(fixes[i + 1 :]))
        if fix not in compat.APPLIED:
            print(f"NOT APPLIED {fix}", flush=True)
            return 2
        done.append(fix)
        if i + 1 == len(fixes) or WORKLOADS[fixes[i + 1]] is not WORKLOADS[fix]:
            # This workload's fixes are all in: it runs through before the next workload starts.
            outcome = _run(WORKLOADS[fix], work)
            for name in done:
                print(f"FIXED {name} {outcome}", flush=True)
            done = []
    return 0


def importlib_nemo() -> None:
    import importlib

    for name in ("megatron_gpt_prompt_learning_model", "megatron_gpt_sft_model"):
        importlib.import_module(f"nemo.collections.nlp.models.language_modeling.{name}")


if __name__ == "__main__":
    sys.exit(main())
