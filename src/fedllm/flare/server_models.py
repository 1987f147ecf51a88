"""The global models NVFlare's FedAvg keeps on the server: one class per kind of job, all in one place.

The server builds the job template's `initial_model` by class path (classes under `fedllm.` pass the
component allow-list), averages the sites' states into it and persists it. Each class's state_dict
keys and shapes are exactly what that job's sites exchange, and the server never needs the site's
backend (no NeMo, no PEFT training loop): it holds weights only.

    TinyClassifier            demo-mlp: the whole (tiny) model
    EchoModel                 exchange benchmark and tests: seeded LLM-shaped weights of any size
    PeftPromptEncoderWeights  hf-ptuning: PEFT's MLP prompt encoder
    CausalLMWeights           hf-sft: every weight of a Hugging Face causal LM
    LoraAdapterWeights        hf-lora: the LoRA adapter only
    PromptEncoderWeights      nemo-ptuning-*: NeMo's MLP prompt encoder (the LLM stays on the sites)
    NemoCheckpointWeights     nemo-sft-*: the base .nemo's weights, keyed per tensor-parallel shard
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedllm.checkpoint.archive import NemoArchive
from fedllm.checkpoint.errors import CheckpointError


class WeightsOnly(nn.Module):
    """A module the server only stores and averages; calling it is a mistake."""

    def forward(self, *_args: Any) -> Any:  # pragma: no cover - never called
        raise NotImplementedError(f"{type(self).__name__} only carries weights between rounds")


class ParameterTree(WeightsOnly):
    """An nn.Module holding the given tensors under their dotted names (a.b.weight → submodule a.b)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(tensor.detach().clone().float(), requires_grad=False))


# ---- demo-mlp ---------------------------------------------------------------------------------------------

FEATURES = 8
CLASSES = 3


class TinyClassifier(nn.Module):
    """Two linear layers; small enough that three sites train it in seconds on CPU (sites train this class too).

    `seed` makes the initial weights the same in every job (the demo job is then deterministic end to end:
    sites seed each round too), without touching the process's global random state.
    """

    def __init__(self, in_features: int = FEATURES, hidden: int = 32, classes: int = CLASSES, seed: int | None = None):
        super().__init__()
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> TinyClassifier:
        """Build the architecture the server's global weights describe (no duplicated sizes)."""
        w1, w2 = torch.as_tensor(state["net.0.weight"]), torch.as_tensor(state["net.2.weight"])
        model = cls(in_features=w1.shape[1], hidden=w1.shape[0], classes=w2.shape[0])
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        return model


# ---- echo (the exchange path alone) -----------------------------------------------------------------------

# One transformer block's worth of fp32 weights at hidden 4096 is ~800 MiB; 64 MiB tensors keep
# per-tensor overhead visible without making the state dict unrealistically fine-grained.
TENSOR_MIB = 64
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_sizes(size_mib: float, tensor_mib: float = TENSOR_MIB, dtype: str = "float32") -> list[int]:
    """Element counts of the tensors that add up to `size_mib` MiB."""
    itemsize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    total = int(size_mib * 2**20) // itemsize
    per = max(1, int(tensor_mib * 2**20) // itemsize)
    return [min(per, total - start) for start in range(0, total, per)]


def iter_weights(
    size_mib: float, dtype: str = "float32", seed: int = 0, tensor_mib: float = TENSOR_MIB
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the seeded echo model, one tensor at a time (checks need not hold a second copy)."""
    gen = torch.Generator().manual_seed(seed)
    for i, n in enumerate(tensor_sizes(size_mib, tensor_mib, dtype)):
        # 2-D like a weight matrix; uniform values exercise every mantissa bit.
        cols = 1024 if n % 1024 == 0 else 1
        yield f"w{i:04d}", torch.empty(n // cols, cols).uniform_(-1, 1, generator=gen).to(DTYPES[dtype])


class EchoModel(WeightsOnly):
    """Parameters `w0000`, `w0001`, … of `size_mib` MiB in total, filled from `seed` (fedllm.training.toy.echo)."""

    def __init__(self, size_mib: float = 1024, dtype: str = "float32", seed: int = 0, tensor_mib: float = TENSOR_MIB):
        super().__init__()
        for name, t in iter_weights(size_mib, dtype, seed, tensor_mib):
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))


# ---- Hugging Face -----------------------------------------------------------------------------------------


class PeftPromptEncoderWeights(WeightsOnly):
    """PEFT's MLP PromptEncoder as the server keeps it: same parameter names and shapes, no PEFT needed."""

    def __init__(
        self, token_dim: int, num_virtual_tokens: int = 10, encoder_hidden_size: int | None = None, seed: int = 0
    ):
        super().__init__()
        hidden = encoder_hidden_size or token_dim
        # Seeded: every run of a job starts from the same global prompt encoder (runs are comparable).
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )


def lora_config(r: int = 8, alpha: float = 16, target_modules: str = ""):
    """The LoRA settings sites and server share; target_modules "a,b" (empty: PEFT's default for the model)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=[t for t in target_modules.split(",") if t] or None,
    )


def _causal_lm(model: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


class CausalLMWeights(WeightsOnly):
    """All weights of a Hugging Face causal LM (full SFT): the model's own children, so keys match its state_dict."""

    def __init__(self, model: str):
        super().__init__()
        for name, child in _causal_lm(model).named_children():
            self.add_module(name, child)


class LoraAdapterWeights(ParameterTree):
    """The LoRA adapter of `model` (PEFT, the sites' settings): the only weights LoRA sites exchange."""

    def __init__(self, model: str, r: int = 8, alpha: float = 16, target_modules: str = "", seed: int = 0):
        from peft import get_peft_model, get_peft_model_state_dict

        torch.manual_seed(seed)
        peft_model = get_peft_model(_causal_lm(model), lora_config(r, alpha, target_modules))
        super().__init__(dict(get_peft_model_state_dict(peft_model)))


# ---- NeMo -------------------------------------------------------------------------------------------------


class PromptEncoderWeights(WeightsOnly):
    """The server's global prompt encoder of a NeMo p-tuning job: NeMo's MLP PromptEncoder's parameters.

    Built like NeMo's (and initialised alike: nn.Embedding N(0, 1), nn.Linear defaults), so the
    round-0 model every site loads is a valid fresh encoder. token_dim is the LLM's hidden size.
    """

    def __init__(
        self, total_virtual_tokens: int = 10, token_dim: int = 1024, encoder_hidden: int = 2048, num_layers: int = 2
    ):
        super().__init__()
        if num_layers < 2:
            raise ValueError("NeMo's MLP prompt encoder has at least 2 layers")
        self.embedding = nn.Embedding(total_virtual_tokens, token_dim)
        layers: list[nn.Module] = [nn.Linear(token_dim, encoder_hidden), nn.ReLU()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(encoder_hidden, encoder_hidden), nn.ReLU()]
        layers.append(nn.Linear(encoder_hidden, token_dim))
        self.mlp_head = nn.Sequential(*layers)

    def forward(self) -> torch.Tensor:
        """The virtual-token embeddings (what the LLM gets in place of <|VIRTUAL_PROMPT_0|>)."""
        return self.mlp_head(self.embedding.weight)


_SHARD_KEY = re.compile(r"^mp_rank_(\d+)/(.+)$")


def shard_key(rank: int, key: str, tensor_parallel: int) -> str:
    """Exchange key of one tensor of TP rank `rank`: the .nemo's own layout (plain key at TP=1)."""
    return key if tensor_parallel == 1 else f"mp_rank_{rank:02d}/{key}"


def split_shard_key(key: str) -> tuple[int, str]:
    """(TP rank, the rank's own key) of an exchange key."""
    m = _SHARD_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else (0, key)


def load_nemo_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a (TP-sharded, PP=1) `.nemo`, keyed as sites send them, read tensor by tensor.

    fedllm.checkpoint reads each tensor's bytes straight into its own buffer, so the server holds
    the model once (never a shard's file and its tensors at the same time).
    """
    with NemoArchive(path) as archive:
        if archive.pp != 1:
            raise CheckpointError(
                f"{archive.path}: model_config.yaml field pipeline_model_parallel_size is {archive.pp}. "
                "Fix: convert the checkpoint to pipeline_model_parallel_size 1"
            )
        out: dict[str, torch.Tensor] = {}
        for rank in range(archive.shards):
            with archive.open_rank(rank) as state:
                for key, tensor in state.tensors():
                    out[shard_key(rank, key, archive.shards)] = tensor.load()
    return out


class NemoCheckpointWeights(WeightsOnly):
    """The SFT job's global model on the server: the base checkpoint's tensors, keyed as sites send them.

    Its state dict is the checkpoint's, not parameters of submodules (Megatron keys contain dots),
    so state_dict/load_state_dict are overridden; NVFlare's persistor only uses those two.
    """

    def __init__(self, checkpoint: str):
        super().__init__()
        self.checkpoint = checkpoint
        self._weights = load_nemo_weights(checkpoint)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._weights)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        missing = sorted(set(self._weights) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._weights))
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"weights do not match {self.checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                "Fix: sites and server must use the same base checkpoint"
            )
        self._weights.update({k: torch.as_tensor(v) for k, v in state_dict.items() if k in self._weights})
        return nn.modules.module._IncompatibleKeys(missing, unexpected)
