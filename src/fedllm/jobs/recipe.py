"""The FedAvg recipe every fedllm job is built from: NVFlare's, with fedllm's lean server components.

`FedllmFedAvgRecipe` is NVFlare's PyTorch FedAvgRecipe wired, through the recipe's own hooks
(`_create_controller`, `model_persistor`), with fedllm.flare.fedavg's `LeanFedAvg` and
`LeanPTFileModelPersistor` (one global model in server RAM between rounds; docs/exchange.md).
It runs where jobs are created; the components it names run in the server's job process.
"""

from __future__ import annotations

from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat
from nvflare.recipe.utils import set_recipe_meta

from fedllm.flare.fedavg import LeanFedAvg, LeanPTFileModelPersistor
from fedllm.flare.resume import RESUMABLE_PROP


class FedllmFedAvgRecipe(FedAvgRecipe):
    """NVFlare's PyTorch FedAvgRecipe with `LeanFedAvg` and `LeanPTFileModelPersistor`.

    Same arguments as FedAvgRecipe; `lean_server=False` builds the stock controller and persistor;
    `background_checkpoint=False` makes the lean persistor write each checkpoint before the round goes on.
    `secure_agg_sites=N` builds `SecAggFedAvg` (fedllm.flare.secagg.server) instead, which sends each round to
    all N sites while `min_clients` (the sites the job needs to start) is secure aggregation's min_sites.
    With the lean server the job is marked resumable (custom_props): the server's JobResumer continues
    it from its last completed round after a server or site restart (fedllm.flare.resume).
    """

    def __init__(
        self,
        *,
        lean_server: bool = True,
        background_checkpoint: bool = True,
        secure_agg_sites: int | None = None,
        **kwargs,
    ):
        self._lean_server = lean_server
        self._secure_agg_sites = secure_agg_sites
        self._background_checkpoint = background_checkpoint
        super().__init__(**kwargs)
        if lean_server:
            set_recipe_meta(self, JobMetaKey.CUSTOM_PROPS, {RESUMABLE_PROP: True})

    def _setup_model_and_persistor(self, job) -> str:
        if self._lean_server and self.model_persistor is None and isinstance(self.model, dict):
            # What PTModel builds for a dict model (fedllm's only form), as the lean subclass.
            kwargs = {"best_global_model_file_name": self.best_model_filename} if self.best_model_filename else {}
            self.model_persistor = LeanPTFileModelPersistor(
                model_class=self.model["path"],
                model_args=self.model.get("args", {}),
                allow_numpy_conversion=self.server_expected_format != ExchangeFormat.PYTORCH,
                background_save=self._background_checkpoint,
                **kwargs,
            )
            if self._pt_model_locator is None:
                self._pt_model_locator = PTFileModelLocator(pt_persistor_id="persistor")
        return super()._setup_model_and_persistor(job)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> FedAvg:
        controller = super()._create_controller(persistor_id, model_params, model_aggregator)
        if self._secure_agg_sites is not None:
            from fedllm.flare.secagg.server import SecAggFedAvg

            # NVFlare's recipe makes min_clients FedAvg's sites per round too; every site trains each round.
            controller.__class__ = SecAggFedAvg
            controller.num_clients = self._secure_agg_sites
        elif self._lean_server:
            # LeanFedAvg only overrides methods (no state, no __init__): re-typing the FedAvg NVFlare
            # built keeps every argument NVFlare passes, and the Job API exports the subclass path.
            controller.__class__ = LeanFedAvg
        return controller

    # NVFlare's Recipe has filter and config helpers but none for components; these go through the same
    # FedJob placement its filter helpers use (per-site client apps stay intact). Re-check on an NVFlare upgrade.
    def add_server_component(self, component, component_id: str) -> None:
        self._job.to_server(component, id=component_id)

    def add_client_component(self, component, component_id: str) -> None:
        self._add_to_client_apps(component, id=component_id)
