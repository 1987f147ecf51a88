"""A downloaded job result written by the components that write it in a real job, without running one.

NVFlare's `MetricsArtifactWriter` writes workspace/metrics/round_metrics.jsonl from the events FedAvg
fires after each aggregation, and fedllm's `LeanPTFileModelPersistor` (the persistor every job
template uses) writes workspace/app_server/FL_global_model.pt and best_FL_global_model.pt. Both are
driven here through their event handlers, so the files have exactly the job's format in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.metrics_artifact_writer import MetricsArtifactWriter

from fedllm.flare.fedavg import LeanPTFileModelPersistor

JOB_ID = "job"


class _Workspace:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def get_run_dir(self, job_id: str) -> str:
        return str(self.run_dir)


class _Engine:
    """What the writer and the persistor ask of NVFlare's server engine: the run dir and event firing."""

    def __init__(self, run_dir: Path) -> None:
        self.workspace = _Workspace(run_dir)

    def get_workspace(self) -> _Workspace:
        return self.workspace

    def fire_event(self, event_type: str, fl_ctx) -> None:
        pass


def write_job_result(
    root: Path,
    model_class: str,
    model_args: dict,
    rounds: list[dict[str, dict[str, float]]],
    *,
    final_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """root as `fedllm job submit --download` leaves it: per round {site: metrics} → round_metrics.jsonl
    (each site's metrics and their mean), the initial model of `model_class` persisted as the best global
    model and `final_state` (default: the initial weights) as the final one."""
    workspace = root / "workspace"
    app = workspace / "app_server"
    app.mkdir(parents=True)
    fl_ctx = FLContextManager(engine=_Engine(workspace), identity_name="server", job_id=JOB_ID).new_context()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=True)

    writer = MetricsArtifactWriter()
    writer.handle_event(EventType.START_RUN, fl_ctx)
    for number, by_site in enumerate(rounds):
        names = sorted(set().union(*by_site.values()))
        mean = {n: sum(m[n] for m in by_site.values() if n in m) / len(by_site) for n in names}
        info = {"sites": [{"name": site, "metrics": metrics} for site, metrics in by_site.items()]}
        result = FLModel(metrics=mean, current_round=number, meta={AppConstants.METRICS_AGGREGATION_INFO: info})
        fl_ctx.set_prop(AppConstants.AGGREGATION_RESULT, result, private=True, sticky=False)
        writer.handle_event(AppEventType.AFTER_AGGREGATION, fl_ctx)
    writer.handle_event(EventType.END_RUN, fl_ctx)

    persistor = LeanPTFileModelPersistor(model_class=model_class, model_args=model_args, background_save=False)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    learnable = persistor.load_model(fl_ctx)
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, learnable, private=True, sticky=True)
    persistor.handle_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, fl_ctx)
    final = learnable if final_state is None else make_model_learnable(final_state, {})
    persistor.save_model(final, fl_ctx)
    persistor.handle_event(EventType.END_RUN, fl_ctx)
    return root
