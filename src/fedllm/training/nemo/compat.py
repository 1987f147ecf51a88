"""Which NeMo the Megatron-GPT backend runs on, and the fixes for NeMo's own bugs that it needs there.

The seeds' workloads use NeMo's `nemo.collections.nlp` Megatron-GPT models (MegatronGPTPromptLearningModel
for p-tuning, MegatronGPTSFTModel for SFT). Every installable nemo_toolkit was run here (docs/nemo.md):
2.2.1, 2.3.3, 2.4.1 and 2.5.0 run them; 2.5.1 and later no longer ship the classes; 2.1.0 and older do not
install. fedllm targets 2.4.1 (the `nemo` extra pins it, with the pins it needs) and accepts the range
that was run.

`apply_nemo_fixes()` repairs what breaks in those releases on ANY machine — a GPU site running the same
wheels needs it too: gates on apex (which has no wheel) where nothing of apex is used, a transformer-engine
spec built although the local spec was asked for, prompt learning's stale calling conventions, a 2 s sleep
in every deprecation warning, the legacy GPT's placeholder enums. Each fix applies only to the NeMo versions
that have the bug and only when the buggy code is really there (it looks at NeMo's source or attributes),
so it turns itself off where NeMo fixed it. What only a CPU needs is apart, in fedllm.training.nemo.cpu_layer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedllm.training.nemo.errors import NemoUnavailableError

NEMO_DISTRIBUTION = "nemo_toolkit"
TARGET_VERSION = "2.4.1"
MIN_VERSION = (2, 2)
MAX_VERSION_EXCLUSIVE = (2, 5, 1)
SUPPORTED_RANGE = ">=2.2,<2.5.1"
FIX = (
    "run the site in the fedllm NeMo image, or `pip install 'fedllm[nemo]'` (nemo_toolkit "
    f"{TARGET_VERSION} with the pins it needs; see docs/nemo.md)"
)


def parse_version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '2.4.1', '2.0.0rc1' or '2.5'."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise NemoUnavailableError(f"cannot read the NeMo version '{text}'. Fix: {FIX}")
    return tuple(int(g) for g in m.groups(default="0"))


def is_supported(version: str) -> bool:
    return MIN_VERSION <= parse_version(version) < MAX_VERSION_EXCLUSIVE


def installed_nemo_version() -> str | None:
    try:
        return importlib.metadata.version(NEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_nemo_nlp(version: str | None = None, *, nlp_present: bool | None = None) -> str:
    """Return the installed NeMo version, or raise NemoUnavailableError saying what to install.

    `version` / `nlp_present` default to what is installed (tests pass them to check the messages).
    Nothing heavy is imported: the nlp collection is located, not loaded.
    """
    version = installed_nemo_version() if version is None else version
    if version is None:
        raise NemoUnavailableError(f"NeMo ({NEMO_DISTRIBUTION}) is not installed in this Python. Fix: {FIX}")
    if not is_supported(version):
        raise NemoUnavailableError(
            f"{NEMO_DISTRIBUTION} {version} is installed, but fedllm's Megatron-GPT p-tuning/SFT runs on "
            f"{SUPPORTED_RANGE} (the releases it was run on): from 2.5.1 on the wheels no longer ship "
            f"MegatronGPTPromptLearningModel / MegatronGPTSFTModel. Fix: {FIX}"
        )
    if nlp_present is None:
        try:
            nlp_present = importlib.util.find_spec("nemo.collections.nlp") is not None
        except ModuleNotFoundError:
            nlp_present = False
    if not nlp_present:
        raise NemoUnavailableError(
            f"{NEMO_DISTRIBUTION} {version} is installed without nemo.collections.nlp (the Megatron-GPT "
            f"prompt-learning and SFT models). Fix: {FIX}"
        )
    return version


# ---- fixes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NemoFix:
    """One repair of NeMo: where the bug is, which releases have it, and how it is repaired."""

    name: str
    where: str  # NeMo's file (and the line in 2.4.1)
    symptom: str
    apply: Callable[[], bool]  # repairs it; False when this NeMo does not have the bug
    first: tuple[int, ...] = (2, 0)
    last_exclusive: tuple[int, ...] = MAX_VERSION_EXCLUSIVE


APPLIED: dict[str, str] = {}  # name -> symptom, for the site log


def _source_has(obj: Any, snippet: str) -> bool:
    try:
        return snippet in inspect.getsource(obj)
    except (OSError, TypeError):
        return False


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


_LM = "nemo.collections.nlp.models.language_modeling."
_MEGATRON = "nemo.collections.nlp.modules.common.megatron."


def _nvidia_pytorch_version() -> bool:
    base = _module(_LM + "megatron_base_model").MegatronBaseModel
    if "NVIDIA_PYTORCH_VERSION" in os.environ or not _source_has(
        base._enable_nvidia_optimizations, "is_official_release_version(nvidia_torch_version)"
    ):
        return False
    # Any value that is not "YY.MM" makes NeMo take today's date, which keeps the NVFuser branch off.
    os.environ["NVIDIA_PYTORCH_VERSION"] = "not-an-ngc-container"
    return True


def _deprecation_sleep() -> bool:
    dep = _module("nemo.utils.decorators.deprecated")
    warn = getattr(dep, "deprecated_warning", None)
    if warn is None or not warn.__defaults__ or warn.__defaults__[-1] == 0:
        return False
    if not _source_has(warn, "time.sleep(wait_seconds)"):
        return False
    warn.__defaults__ = (*warn.__defaults__[:-1], 0)  # the warning is still logged, without the wait
    return True


def _dataset_helpers_python() -> bool:
    # NeMo's Makefile runs `python3 -m pybind11 --includes`: whichever python3 comes first on PATH.
    bindir = os.path.dirname(sys.executable)
    found = shutil.which("python3")
    if found is not None and os.path.realpath(os.path.dirname(found)) == os.path.realpath(bindir):
        return False
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return True


def _apex_gate() -> bool:
    overrides = _module("nemo.collections.nlp.parts.nlp_overrides")
    if overrides.HAVE_APEX:
        return False
    # The flag only says whether apex's distributed Adam imports; the strategy and the connector use no apex.
    overrides.HAVE_APEX = True
    return True


def _apex_only_names() -> bool:
    import torch

    changed = False
    build = _module(_MEGATRON + "build_model")
    if not hasattr(build, "set_defaults_if_not_set_tensor_model_parallel_attributes"):
        from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes

        build.set_defaults_if_not_set_tensor_model_parallel_attributes = (
            set_defaults_if_not_set_tensor_model_parallel_attributes
        )
        changed = True
    utils = _module(_MEGATRON + "utils")
    if not hasattr(utils, "listify_model"):
        utils.listify_model = lambda model: model if isinstance(model, list) else [model]
        changed = True
    if not hasattr(utils, "FusedLayerNorm"):
        # Names of apex's norms in an isinstance() that exempts norms from weight decay: bind the norms this
        # NeMo builds without apex, so they stay exempt.
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        utils.FusedLayerNorm = torch.nn.LayerNorm
        utils.FastLayerNorm = FusedLayerNorm
        utils.MixedFusedRMSNorm = getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm)
        changed = True
    return changed


def _l2norm(_noop_flag: Any, tensor_lists: list[list[Any]], per_tensor: bool) -> tuple[Any, Any]:
    """apex's amp_C.multi_tensor_l2norm in torch: the L2 norm over all tensors (and per tensor)."""
    import torch

    norms = torch.stack([torch.linalg.vector_norm(t.float()) for t in tensor_lists[0]])
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def _clip_grads_without_apex() -> bool:
    clip = _module(_MEGATRON + "clip_grads")
    if clip.HAVE_APEX or hasattr(clip, "multi_tensor_applier"):
        return False
    clip.amp_C = types.SimpleNamespace(multi_tensor_l2norm=_l2norm)
    clip.multi_tensor_applier = lambda op, noop_flag, tensor_lists, *args: op(noop_flag, tensor_lists, *args)
    return True


def _wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable], marker: str = "_fedllm") -> bool:
    """Replace `owner.name` by `wrap(original)`; False where it already is (a second call, a forked process)."""
    original = getattr(owner, name)
    if getattr(original, marker, False):
        return False
    wrapped = wrap(original)
    setattr(wrapped, marker, True)
    setattr(owner, name, wrapped)
    return True


def _per_rank_norm_names() -> bool:
    from fedllm.checkpoint.layout import local_spec_key

    def wrap(original):
        def modify_state_dict(self, conf, state_dict):
            state_dict = original(self, conf, state_dict)
            if conf.get("mcore_gpt", False) and not conf.get("transformer_engine", False):
                # A per-rank file written with transformer-engine's fused norm names, loaded into the local spec.
                state_dict = {local_spec_key(k): v for k, v in state_dict.items()}
            return state_dict

        return modify_state_dict

    connector = _module("nemo.collections.nlp.parts.nlp_overrides").NLPSaveRestoreConnector
    return _wrap_once(connector, "modify_state_dict", wrap)


def _eager_layer_specs() -> bool:
    gpt = _module(_LM + "megatron_gpt_model")
    if not _source_has(gpt.get_specs, "name_spec_dict = {"):
        return False

    def wrap(original):
        def get_specs(spec_name, transformer_config=None, use_te=True, hyena_cfg=None, fp8=False):
            if spec_name == "" and not use_te:  # the local spec: no transformer-engine spec to build
                experts = transformer_config.num_moe_experts if transformer_config else None
                grouped = transformer_config.moe_grouped_gemm if transformer_config else False
                return gpt.get_gpt_layer_local_spec(experts, grouped)
            return original(spec_name, transformer_config, use_te, hyena_cfg, fp8)

        return get_specs

    return _wrap_once(gpt, "get_specs", wrap)


def _process_groups_before_build() -> bool:
    from megatron.core import parallel_state

    def wrap(original):
        def model_provider_func(self, pre_process, post_process):
            # What NeMo's own restore_from and generate do before they build: launch + process groups.
            if not parallel_state.is_initialized() and getattr(self, "trainer", None) is not None:
                if self.trainer.strategy.launcher is not None:
                    self.trainer.strategy.launcher.launch(lambda: None, trainer=self.trainer)
                self.trainer.strategy.setup_environment()
            return original(self, pre_process, post_process)

        return model_provider_func

    return _wrap_once(_module(_LM + "megatron_gpt_model").MegatronGPTModel, "model_provider_func", wrap)


def _as_triples(batches):
    """(batch, None, None) for bare batches; Lightning's (batch, batch_idx, dataloader_idx) pass through."""
    for item in batches:
        if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], list | tuple | dict):
            yield item
        else:
            yield item, None, None


def _prompt_learning_batches() -> bool:
    pl = _module(_LM + "megatron_gpt_prompt_learning_model")
    model = pl.MegatronGPTPromptLearningModel
    if getattr(model.fwd_bwd_step, "_fedllm", False) or not _source_has(
        model.fwd_bwd_step, "batch, _, _ = next(dataloader_iter)"
    ):
        return False
    step, split, output_only = model.fwd_bwd_step, pl.get_iterator_k_split, model.get_forward_output_only_func

    def fwd_bwd_step(self, dataloader_iter, batch_idx, forward_only):
        return step(self, _as_triples(dataloader_iter), batch_idx, forward_only)

    def get_iterator_k_split(*args, **kwargs):
        return _as_triples(split(*args, **kwargs))

    def get_forward_output_only_func(self):
        func = output_only(self)
        return lambda dataloader_iter, module: func(_as_triples(dataloader_iter), module)

    fwd_bwd_step._fedllm = True
    model.fwd_bwd_step = fwd_bwd_step
    pl.get_iterator_k_split = get_iterator_k_split  # the module's own name, used by fwd_bwd_step only
    model.get_forward_output_only_func = get_forward_output_only_func
    return True


def _prompt_learning_loss_signature() -> bool:
    pl = _module(_LM + "megatron_gpt_prompt_learning_model")
    model = pl.MegatronGPTPromptLearningModel
    if not _source_has(model.get_forward_output_and_loss_func, "self.frozen_model.loss_func(loss_mask, output_tensor)"):
        return False

    def wrap(original):
        def init_model(self, cfg, trainer):
            original(self, cfg, trainer)
            three_arguments = self.frozen_model.loss_func

            def loss_func(loss_mask, *rest):
                if len(rest) == 1:  # NeMo 1's (loss_mask, output_tensor): it divided by the mask's sum
                    return three_arguments(loss_mask, loss_mask.float().sum(), rest[0])
                return three_arguments(loss_mask, *rest)

            self.frozen_model.loss_func = loss_func

        return init_model

    return _wrap_once(model, "init_model", wrap)


def _prompt_learning_generation_mask() -> bool:
    pl = _module(_LM + "megatron_gpt_prompt_learning_model")

    def wrap(original):
        def get_forward_output_only_func(self):
            func = original(self)
            if not self.frozen_model.mcore_gpt:
                return func

            def forward(dataloader_iter, module):
                # Megatron-core builds the causal mask itself; the full-length one clashes with the KV cache.
                def without_mask(tokens, position_ids, attention_mask, task_ids, **kwargs):
                    return module(tokens, position_ids, None, task_ids, **kwargs)

                return func(dataloader_iter, without_mask)

            return forward

        return get_forward_output_only_func

    model = pl.MegatronGPTPromptLearningModel
    return _wrap_once(model, "get_forward_output_only_func", wrap, marker="_fedllm_mask")


def placeholder_module(name: str, class_name: str, why: str) -> bool:
    """Register `name` as a module holding a never-instantiated `class_name`, unless the real one imports.

    For modules NeMo imports only for an isinstance() check, whose own imports need a package this site does
    not have; isinstance() against the placeholder is False, as it would be for the real class.
    """
    if name in sys.modules:
        return False
    try:
        importlib.import_module(name)
        return False
    except Exception:
        sys.modules.pop(name, None)
    stub = types.ModuleType(name)
    stub.__file__ = f"<fedllm placeholder: {why}>"
    setattr(stub, class_name, type(class_name, (), {"__doc__": f"fedllm placeholder: {why}"}))
    sys.modules[name] = stub
    return True


def _generation_imports_multimodal() -> bool:
    if importlib.util.find_spec("torchvision") is not None:
        return False
    return placeholder_module(
        "nemo.collections.multimodal.models.multimodal_llm.neva.neva_model", "MegatronNevaModel", "no torchvision"
    )


def _rebind_placeholders(module: types.ModuleType, real: dict[str, Any]) -> None:
    """Replace apex's ApexGuardDefaults placeholders by the real enums, defaults evaluated at def time too."""
    import ast

    for name, value in real.items():
        if type(getattr(module, name, None)).__name__ == "ApexGuardDefaults":
            setattr(module, name, value)

    def repair(function: Any, node: ast.FunctionDef) -> None:
        function = getattr(function, "__func__", function)
        if not hasattr(function, "__defaults__"):
            return
        args = [*node.args.posonlyargs, *node.args.args]
        defaults = list(function.__defaults__ or ())
        for arg, default in zip(args[len(args) - len(node.args.defaults) :], node.args.defaults, strict=True):
            if isinstance(default, ast.Attribute) and isinstance(default.value, ast.Name) and default.value.id in real:
                i = args.index(arg) - (len(args) - len(defaults))
                if 0 <= i < len(defaults) and defaults[i] is None:
                    defaults[i] = getattr(real[default.value.id], default.attr)
        function.__defaults__ = tuple(defaults) or None
        keyword = dict(function.__kwdefaults__ or {})
        for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True):
            if (
                isinstance(default, ast.Attribute)
                and isinstance(default.value, ast.Name)
                and default.value.id in real
                and keyword.get(arg.arg, 0) is None
            ):
                keyword[arg.arg] = getattr(real[default.value.id], default.attr)
        if keyword:
            function.__kwdefaults__ = keyword

    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef) and hasattr(module, node.name):
            repair(getattr(module, node.name), node)
        elif isinstance(node, ast.ClassDef) and hasattr(module, node.name):
            cls = getattr(module, node.name)
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and sub.name in cls.__dict__:
                    repair(cls.__dict__[sub.name], sub)


def _legacy_gpt_config_get() -> bool:
    from megatron.core import ModelParallelConfig

    transformer = _module(_MEGATRON + "transformer")
    if hasattr(ModelParallelConfig, "get") or not _source_has(
        transformer, "config.get('virtual_pipeline_model_parallel_size'"
    ):
        return False
    ModelParallelConfig.get = lambda self, key, default=None: getattr(self, key, default)
    return True


def _legacy_gpt_without_apex() -> bool:
    if importlib.util.find_spec("apex") is not None:
        return False
    import torch
    from megatron.core.enums import ModelType
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType, AttnType
    from megatron.core.utils import divide

    layer_type = _module(_MEGATRON + "layer_type").LayerType
    real = {"ModelType": ModelType, "AttnMaskType": AttnMaskType, "AttnType": AttnType, "LayerType": layer_type}

    class MixedFusedLayerNorm(torch.nn.LayerNorm):
        """apex's MixedFusedLayerNorm as a torch LayerNorm (same parameters, same sequence-parallel flag)."""

        def __init__(self, normalized_shape, eps=1e-5, sequence_parallel_enabled=False, **_kwargs):
            super().__init__(normalized_shape, eps=eps)
            self.sequence_parallel_enabled = sequence_parallel_enabled
            for parameter in self.parameters():
                parameter.sequence_parallel = sequence_parallel_enabled

    class MatchedScaleMaskSoftmax(FusedScaleMaskSoftmax):
        """NeMo's apex-based softmax, on megatron-core's identical base class (NeMo's own torch path)."""

        def forward_torch_softmax(self, input, mask):
            if self.input_in_float16 and self.softmax_in_fp32:
                input = input.float()
            if self.scale is not None:
                input = input * self.scale
            masked = self.mask_func(input, mask) if mask is not None else input
            probs = torch.nn.Softmax(dim=-1)(masked)
            if mask is not None:
                all_masked = mask.all(axis=-1)
                probs = probs * (1.0 - all_masked.type(probs.type()))[:, :, :, None]
            if self.input_in_float16 and self.softmax_in_fp32:
                probs = probs.half() if self.input_in_fp16 else probs.bfloat16()
            return probs

    norm = _module(_MEGATRON + "fused_layer_norm")
    if not hasattr(norm, "MixedFusedLayerNorm"):
        norm.MixedFusedLayerNorm = MixedFusedLayerNorm
    for name in ("transformer", "attention", "mlp", "language_model"):
        _rebind_placeholders(_module(_MEGATRON + name), real)
    _rebind_placeholders(_module(_LM + "megatron.gpt_model"), real)
    attention = _module(_MEGATRON + "attention")
    if not hasattr(attention, "safe_divide"):
        attention.safe_divide = divide
    softmax = _module(_MEGATRON + "fused_softmax")
    if issubclass(softmax.MatchedScaleMaskSoftmax, softmax.ApexGuardDefaults):
        softmax.MatchedScaleMaskSoftmax = attention.MatchedScaleMaskSoftmax = MatchedScaleMaskSoftmax
    return True


NEMO_FIXES: tuple[NemoFix, ...] = (
    NemoFix(
        "nvidia_pytorch_version",
        "megatron_base_model.py:401 MegatronBaseModel._enable_nvidia_optimizations",
        "TypeError from re.fullmatch(pattern, None) outside NVIDIA's containers (NVIDIA_PYTORCH_VERSION unset)",
        _nvidia_pytorch_version,
    ),
    NemoFix(
        "deprecation_sleep",
        "utils/decorators/deprecated.py:96 deprecated_warning",
        "time.sleep(2) in every deprecation warning: +4 s per prompt-learning model build, fit and validate",
        _deprecation_sleep,
    ),
    NemoFix(
        "dataset_helpers_python",
        "data/language_modeling/megatron/dataset_utils.py:82 compile_helper (its Makefile)",
        "SFT's first fit compiles helpers.cpp with the python3 first on PATH, which may lack pybind11: sys.exit(1)",
        _dataset_helpers_python,
    ),
    NemoFix(
        "apex_gate",
        "parts/nlp_overrides.py:76-85, 219",
        "ImportError: Apex was not found, from NLPDDPStrategy / NLPSaveRestoreConnector, which use no apex",
        _apex_gate,
    ),
    NemoFix(
        "apex_only_names",
        "modules/common/megatron/build_model.py:36,135 and utils.py:30,366,375",
        "NameError for apex-only names megatron-core also has (set_defaults_if_not_set_tensor_model_parallel_"
        "attributes, listify_model, FusedLayerNorm in the weight-decay grouping)",
        _apex_only_names,
    ),
    NemoFix(
        "clip_grads_without_apex",
        "modules/common/megatron/clip_grads.py:26,138 clip_grad_norm_fp32",
        "NameError: multi_tensor_applier: gradient clipping computes the norm with apex's kernels only",
        _clip_grads_without_apex,
    ),
    NemoFix(
        "per_rank_norm_names",
        "parts/nlp_overrides.py:1192 NLPSaveRestoreConnector.modify_state_dict",
        "RuntimeError: Missing key(s) input_layernorm / pre_mlp_layernorm: a per-rank Megatron-core checkpoint "
        "written with transformer-engine (fused norm names) does not load where transformer-engine is absent",
        _per_rank_norm_names,
    ),
    NemoFix(
        "eager_layer_specs",
        "megatron_gpt_model.py:145-170 get_specs",
        "NameError: TESpecProvider: every layer spec is built before one is picked, the local one included",
        _eager_layer_specs,
    ),
    NemoFix(
        "process_groups_before_build",
        "megatron_gpt_model.py:392 model_provider_func (megatron-core >= 0.13)",
        "AttributeError: 'NoneType' object has no attribute 'size': attention reads process groups that do "
        "not exist yet when a model is built or restored",
        _process_groups_before_build,
    ),
    NemoFix(
        "prompt_learning_batches",
        "megatron_gpt_prompt_learning_model.py:317, 679, 702",
        "ValueError: too many values to unpack (expected 3): batches unpacked twice",
        _prompt_learning_batches,
    ),
    NemoFix(
        "prompt_learning_loss_signature",
        "megatron_gpt_prompt_learning_model.py:688 vs megatron_gpt_model.py:1624",
        "TypeError: loss_func() missing 1 required positional argument (NeMo 1's two-argument call)",
        _prompt_learning_loss_signature,
    ),
    NemoFix(
        "prompt_learning_generation_mask",
        "megatron_gpt_prompt_learning_model.py:729",
        "generation with a megatron-core GPT fails: the full-length attention mask clashes with the KV cache",
        _prompt_learning_generation_mask,
    ),
    NemoFix(
        "generation_imports_multimodal",
        "modules/common/text_generation_strategy.py:1048",
        "NameError: InterpolationMode: generate() imports the multimodal Neva model (torchvision) for isinstance",
        _generation_imports_multimodal,
    ),
    NemoFix(
        "legacy_gpt_config_get",
        "modules/common/megatron/transformer.py:1217 ParallelTransformer",
        "AttributeError: 'ModelParallelConfig' object has no attribute 'get' building a legacy (mcore_gpt: false) GPT",
        _legacy_gpt_config_get,
        first=(2, 4),
    ),
    NemoFix(
        "legacy_gpt_without_apex",
        "modules/common/megatron/{transformer,attention,mlp,language_model,fused_layer_norm,fused_softmax}.py",
        "legacy GPT layers built empty or failing: apex's placeholders (every enum None, no MixedFusedLayerNorm, "
        "safe_divide, MatchedScaleMaskSoftmax)",
        _legacy_gpt_without_apex,
    ),
)


def apply_nemo_fixes(skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Apply every fix this NeMo needs, each once per process; returns what was applied, for the site log.

    `skip` leaves fixes out by name: the tests use it to show unfixed NeMo failing.
    """
    version = parse_version(require_nemo_nlp())
    for fix in NEMO_FIXES:
        if fix.name in skip or fix.name in APPLIED or not fix.first <= version < fix.last_exclusive:
            continue
        if fix.apply():
            APPLIED[fix.name] = fix.symptom
    return dict(APPLIED)
