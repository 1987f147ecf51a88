"""A FedAvg server that holds one global model between rounds instead of two or three.

Measured in the server job of a 1 GiB echo run (docs/exchange.md): between rounds NVFlare 2.9's
stock FedAvg keeps, besides the current global model, the initial weights for the whole job (the
nn.Module that NVFlare's config builder makes from the persistor's `{"path", "args"}` model and
keeps in the parsed job config, and the persistor's own reference) and older global models (each
round's `GLOBAL_MODEL` ModelLearnable, copied into every FLContext created while it was current and
pinned by the long-lived ones); while sites download, it also deep-copies the broadcast task data
(+1× model). Three NVFlare extension points remove those copies without changing what any
component sees:

- `LeanPTFileModelPersistor`: PTFileModelPersistor named by the model's class path and arguments
  (plain values the config builder leaves alone); it builds the module at start, hands its
  weights to the controller and lets go of it.
- `LeanFedAvg`: FedAvg that keeps ONE `GLOBAL_MODEL` learnable for the job and updates it in
  place each round, so every context, old or new, sees the current model and pins no other; and
  that marks the weights it broadcasts as `SharedWeights`, whose deep copy shares the tensors.
- `FedllmFedAvgRecipe`: NVFlare's PyTorch FedAvgRecipe wired with the two, through the recipe's
  own hooks (`_create_controller`, `model_persistor`).
"""

from __future__ import annotations

from typing import Any

from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat


class SharedWeights(dict):
    """The weights of one broadcast; their deep copy is a plain dict of the SAME tensors.

    NVFlare deep-copies broadcast task data (once per task, shared by all targets) so that a
    controller editing tensors in place while sites download cannot corrupt the sends.
    `LeanFedAvg` never edits a sent tensor in place (each round's global model is a new set of
    tensors from the aggregator), so the copy would only cost one more model in RAM for the length
    of the downloads. The copy is a plain dict: what goes on the wire needs no fedllm type.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> dict:
        copied = dict(self)
        memo[id(self)] = copied
        return copied


class LeanPTFileModelPersistor(PTFileModelPersistor):
    """PTFileModelPersistor that does not keep the initial model's nn.Module for the whole job.

    The model is named by class path and arguments, plain strings and values: given as NVFlare's
    `{"path": ..., "args": ...}` form, the job's config builder would build the module itself
    and keep it, with the initial weights, in the server's parsed config until the job ends. This
    persistor builds it at start, reads its initial weights, and lets go of it: afterwards it
    only persists the learnables the controller hands it.
    """

    def __init__(
        self,
        model_class: str,
        model_args: dict[str, Any] | None = None,
        allow_numpy_conversion: bool = True,
        best_global_model_file_name: str = DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
    ):
        super().__init__(
            allow_numpy_conversion=allow_numpy_conversion, best_global_model_file_name=best_global_model_file_name
        )
        self.model_class = model_class
        self.model_args = dict(model_args or {})

    def _initialize(self, fl_ctx):
        self.model = {"path": self.model_class, "args": self.model_args}  # built by PTFileModelPersistor
        super()._initialize(fl_ctx)

    def load_model(self, fl_ctx):
        learnable = super().load_model(fl_ctx)
        self.model = None  # the weights live on in `learnable` as long as the controller needs them
        return learnable


class LeanFedAvg(FedAvg):
    """NVFlare's FedAvg with one global model in server RAM between rounds (see the module doc)."""

    def _build_shareable(self, data=None):
        if data is not None and isinstance(data.params, dict) and not isinstance(data.params, SharedWeights):
            data.params = SharedWeights(data.params)
        return super()._build_shareable(data)

    def update_model(self, model, aggr_result):
        held = self.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        model = super().update_model(model, aggr_result)
        fresh = self.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if isinstance(held, ModelLearnable) and isinstance(fresh, ModelLearnable) and held is not fresh:
            # Contexts created in earlier rounds hold `held`: refill it instead of replacing it.
            held.clear()
            held.update(fresh)
            self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, held, private=True, sticky=True)
        return model


class FedllmFedAvgRecipe(FedAvgRecipe):
    """NVFlare's PyTorch FedAvgRecipe with `LeanFedAvg` and `LeanPTFileModelPersistor`.

    Same arguments as FedAvgRecipe; `lean_server=False` builds the stock controller and persistor.
    """

    def __init__(self, *, lean_server: bool = True, **kwargs):
        self._lean_server = lean_server
        super().__init__(**kwargs)

    def _setup_model_and_persistor(self, job) -> str:
        if self._lean_server and self.model_persistor is None and isinstance(self.model, dict):
            # What PTModel builds for a dict model (fedllm's only form), as the lean subclass.
            kwargs = {"best_global_model_file_name": self.best_model_filename} if self.best_model_filename else {}
            self.model_persistor = LeanPTFileModelPersistor(
                model_class=self.model["path"],
                model_args=self.model.get("args", {}),
                allow_numpy_conversion=self.server_expected_format != ExchangeFormat.PYTORCH,
                **kwargs,
            )
            if self._pt_model_locator is None:
                self._pt_model_locator = PTFileModelLocator(pt_persistor_id="persistor")
        return super()._setup_model_and_persistor(job)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> FedAvg:
        controller = super()._create_controller(persistor_id, model_params, model_aggregator)
        if self._lean_server:
            # LeanFedAvg only overrides methods (no state, no __init__): re-typing the FedAvg NVFlare
            # built keeps every argument NVFlare passes, and the Job API exports the subclass path.
            controller.__class__ = LeanFedAvg
        return controller
