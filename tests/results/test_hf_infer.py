"""`fedllm infer` and `fedllm export-hf` on SFT and LoRA job results: the global model generates, and loads in plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedllm.cli.main import main
from fedllm.data.synthetic import sentiment_records


def _result_folder(root: Path, state: dict[str, torch.Tensor], server_args: dict | None = None) -> Path:
    """A downloaded job result as `fedllm job submit --download` leaves it: the global model (+ server config)."""
    app = root / "workspace" / "app_server"
    app.mkdir(parents=True)
    torch.save({"model": state}, app / "FL_global_model.pt")
    if server_args is not None:
        component = {"id": "persistor", "path": "fedllm.flare.fedavg.LeanPTFileModelPersistor", "args": server_args}
        (app / "config").mkdir()
        (app / "config" / "config_fed_server.json").write_text(json.dumps({"components": [component]}))
    return root


@pytest.fixture(scope="module")
def lora_result(tiny_gpt, tmp_path_factory) -> Path:
    """A LoRA adapter trained for a few steps (alpha 32, not hf-lora's default), saved as the server saves it."""
    from peft import get_peft_model_state_dict

    from fedllm.training.hf.sft import build_trainer, parser

    root = tmp_path_factory.mktemp("lora")
    pairs = [{"input": f"{r['sentence']} sentiment:", "output": "positive"} for r in sentiment_records(32, seed=4)]
    args = parser("lora").parse_args(["--model", str(tiny_gpt), "--train", "-", "--val", "-", "--lr", "0.02",
                                      "--lora-alpha", "32", "--epochs", "2", "--batch-size", "8"])  # fmt: skip
    args.model_path = str(tiny_gpt)
    trainer = build_trainer(args, "lora", pairs, pairs[:8], root / "trainer")
    trainer.train()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    model_args = {"model": str(tiny_gpt), "r": 8, "alpha": 32}
    return _result_folder(root / "result", state, {"model_class": "fedllm.flare.server_models.LoraAdapterWeights",
                                                   "model_args": model_args})  # fmt: skip


def test_lora_global_adapter_generates_and_exports_merged_into_plain_transformers(
    tiny_gpt, lora_result: Path, tmp_path: Path, capsys
) -> None:
    from transformers import AutoModelForCausalLM

    from fedllm.results.infer import generate, load_tuned_causal_lm

    sentence = sentiment_records(1, seed=77)[0]["sentence"]
    assert main(["infer", "--model", str(tiny_gpt), "--adapter", str(lora_result), "--sentence", sentence]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{sentence} sentiment: ") and line.split("sentiment: ", 1)[1].split()[0] == "positive"

    out = tmp_path / "merged"
    assert main(["export-hf", str(lora_result), "--model", str(tiny_gpt), "--out", str(out), "--lora"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)  # no PEFT, no base model
    assert not any("lora" in k for k in plain.state_dict())
    peft_model, tokenizer = load_tuned_causal_lm(str(tiny_gpt), lora_result, "lora")
    prompt = [f"{sentence} sentiment:"]
    assert generate(plain, tokenizer, prompt, 4) == generate(peft_model, tokenizer, prompt, 4)
    assert main(["export-hf", str(lora_result), "--model", str(tiny_gpt), "--out", str(out), "--lora"]) == 1


def test_sft_global_model_loads_generates_and_exports(tiny_gpt, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state["transformer.ln_f.bias"] += 0.5  # the "tuned" weights differ from the base
    result = _result_folder(tmp_path / "result", state)
    assert main(["infer", "--model", str(tiny_gpt), "--sft", str(result), "--prompt", "The profit rose"]) == 0
    assert capsys.readouterr().out.startswith("The profit rose ")
    out = tmp_path / "export"
    assert main(["export-hf", str(result), "--model", str(tiny_gpt), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(exported["transformer.ln_f.bias"], state["transformer.ln_f.bias"])
    # A LoRA result passed as SFT (or a wrong base) is refused with what to pass instead.
    lora_state = {"base_model.model.x.lora_A.weight": torch.zeros(8, 4)}
    wrong = _result_folder(tmp_path / "wrong", lora_state)
    assert main(["infer", "--model", str(tiny_gpt), "--sft", str(wrong)]) == 1
    assert "pass it with --adapter instead of --sft" in capsys.readouterr().err.replace("\n", " ")
