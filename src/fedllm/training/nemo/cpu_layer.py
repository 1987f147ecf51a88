"""What lets NeMo's Megatron-GPT models run on a machine without a CUDA device: CI's, and a laptop's.

NeMo and megatron-core assume a GPU in many places that have nothing to do with the model: `.cuda()` on
every batch, `device="cuda"` tensors in the pipeline schedules and the causal mask, torch.cuda calls
(current_device, synchronize, Stream, LongTensor), the CUDA RNG tracker around dropout, seeding it only
when a GPU exists, and imports of triton-only modules for an isinstance() check. `activate()` maps all of
that to the CPU. It does nothing at all when torch sees a CUDA device: a GPU site never runs any of it.

Not a stand-in for NeMo: the models, their forward and backward, the optimizer, Lightning's fit loop and
torch.distributed (gloo) are NeMo's and torch's own; only where a tensor lives changes.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from fedllm.training.nemo.compat import placeholder_module

_MODE: Any = None
APPLIED: dict[str, str] = {}


def active() -> bool:
    return _MODE is not None


def _cuda_to_cpu_mode():
    """One TorchFunctionMode for the dozens of call sites: Tensor.cuda() is the tensor, any CUDA device is the CPU."""
    import torch
    from torch.overrides import TorchFunctionMode

    cpu = torch.device("cpu")

    def is_cuda(device: Any) -> bool:
        if isinstance(device, str):
            return device.startswith("cuda")
        if isinstance(device, torch.device):
            return device.type == "cuda"
        return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.cuda:
                return args[0]
            if "device" in kwargs and is_cuda(kwargs["device"]):
                kwargs["device"] = cpu
            if func is torch.Tensor.to and len(args) > 1 and is_cuda(args[1]):
                args = (args[0], cpu, *args[2:])
            return func(*args, **kwargs)

    mode = CudaToCpu()
    mode.__enter__()  # for the life of the process: Lightning trains in the main thread
    return mode


class _TrackerStreamAdvanced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


class _CpuStream:
    """torch.cuda.Stream on a machine with no streams: NeMo only hands it to transformer-engine modules."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __enter__(self) -> _CpuStream:
        return self

    def __exit__(self, *_exc: Any) -> bool:
        return False

    def synchronize(self) -> None:
        pass

    def wait_stream(self, _other: Any) -> None:
        pass

    def wait_event(self, _event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event

    def query(self) -> bool:
        return True


def activate() -> dict[str, str]:
    """Map NeMo's CUDA assumptions to the CPU; a no-op where torch sees a CUDA device. Idempotent."""
    global _MODE
    import torch

    if torch.cuda.is_available() or _MODE is not None:
        return dict(APPLIED)
    _MODE = _cuda_to_cpu_mode()
    APPLIED["cuda_devices"] = "Tensor.cuda() / device='cuda' in NeMo and megatron-core"
    cpu = torch.device("cpu")

    # Module.cuda() bypasses torch functions (generation calls self.cuda()), and so do Lightning's and NeMo's.
    torch.nn.Module.cuda = lambda self, device=None: self
    from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

    _DeviceDtypeModuleMixin.cuda = lambda self, device=None: self
    from nemo.core.classes.modelPT import ModelPT

    if "cuda" in ModelPT.__dict__:
        ModelPT.cuda = lambda self, device=None: self
    APPLIED["module_cuda"] = "model.cuda() in generation"

    # torch.cuda calls that raise "Torch not compiled with CUDA enabled" on a CPU build.
    torch.cuda.current_device = lambda: cpu
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None
    for name in ("LongTensor", "FloatTensor", "ByteTensor", "HalfTensor", "BFloat16Tensor", "IntTensor", "BoolTensor"):
        setattr(torch.cuda, name, getattr(torch, name))
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    APPLIED["torch_cuda_api"] = "current_device / set_device / synchronize / LongTensor / Stream"

    # megatron-core's model-parallel RNG tracker forks the CUDA RNG around dropout: on a CPU the device RNG
    # is the CPU generator. NeMo seeds the tracker only when a GPU exists: seed it here too.
    from megatron.core.tensor_parallel import random as megatron_random
    from nemo.collections.nlp.modules.common.megatron import megatron_init

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    seed_without_gpu = megatron_init._set_random_seed  # wrapped once: activate() runs once per process

    def _set_random_seed(seed: int) -> None:
        seed_without_gpu(seed)
        from megatron.core import tensor_parallel

        rank = megatron_init.get_pipeline_model_parallel_rank()
        tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * rank)

    megatron_init._set_random_seed = _set_random_seed
    # fork() swaps the tracker's state into the (device = CPU) generator and back, and warns that the CPU
    # state moved inside the context: here that is the tracker's own stream advancing, as it should.
    logging.getLogger(megatron_random.__name__).addFilter(_TrackerStreamAdvanced())
    APPLIED["rng_tracker"] = "megatron-core's CUDA RNG tracker, seeded and forked on the CPU generator"

    # Generation imports the Griffin model for an isinstance() check; it needs triton, which only CUDA torch has.
    if importlib.util.find_spec("triton") is None and placeholder_module(
        "nemo.collections.nlp.models.language_modeling.megatron_griffin_model", "MegatronGriffinModel", "no triton"
    ):
        APPLIED["griffin_placeholder"] = "generation imports MegatronGriffinModel (triton)"
    return dict(APPLIED)
