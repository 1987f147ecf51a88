"""Server-side initial models for FedAvg whose state_dict keys equal what the sites exchange.

NVFlare's FedAvgRecipe keeps a torch module on the server, averages the sites' states into it
and persists it. Job templates name these classes as {"class_path", "args"} (they live under
`fedllm.` so the server's component allow-list admits them).
"""

from __future__ import annotations

import torch
from torch import nn


class ParameterTree(nn.Module):
    """An nn.Module holding the given tensors under their dotted names (a.b.weight → submodule a.b)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(tensor.detach().clone().float(), requires_grad=False))

    def forward(self, *_args):  # pragma: no cover - the server only stores and averages weights
        raise NotImplementedError("a ParameterTree only carries weights between rounds")


class CausalLMWeights(nn.Module):
    """All weights of a Hugging Face causal LM (full SFT): the model's own children, so keys match its state_dict."""

    def __init__(self, model: str):
        super().__init__()
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
        for name, child in hf.named_children():
            self.add_module(name, child)

    def forward(self, *_args):  # pragma: no cover
        raise NotImplementedError("the server only stores and averages weights")


class LoraAdapterWeights(ParameterTree):
    """The LoRA adapter of `model` (PEFT, same settings as the sites): the only weights LoRA sites exchange."""

    def __init__(self, model: str, r: int = 8, alpha: int = 16, target_modules: str = "", seed: int = 0):
        from fedllm.training.sft import lora_model

        torch.manual_seed(seed)
        peft_model, _ = lora_model(model, r=r, alpha=alpha, target_modules=target_modules)
        from peft import get_peft_model_state_dict

        super().__init__(dict(get_peft_model_state_dict(peft_model)))
