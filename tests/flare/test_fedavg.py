"""The lean FedAvg server holds one global model between rounds (fedllm.flare.fedavg)."""

from __future__ import annotations

import copy
import gc
import json
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.fedavg import FedAvg

from fedllm.flare.fedavg import LINEAGE_META, LeanFedAvg, LeanPTFileModelPersistor, SharedWeights
from fedllm.flare.server_models import EchoModel
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.template import InitialModel, JobTemplate


class RecordingEngine:
    """The one engine call a controller makes outside a running job: firing events."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def fire_event(self, event_type: str, fl_ctx) -> None:
        self.events.append(event_type)


def _three_rounds(controller_class: type[FedAvg]):
    """Run update_model for 3 rounds the way FedAvg.run does; a context made in round 0 is kept."""
    manager = FLContextManager(engine=RecordingEngine(), identity_name="server", job_id="job")
    controller = controller_class(num_rounds=3, persistor_id="")
    controller.fl_ctx = manager.new_context()
    initial = {"w": torch.zeros(256)}
    initial_alive = weakref.ref(initial["w"])
    controller.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(initial, {}), private=True, sticky=True)
    model = FLModel(params_type=ParamsType.FULL, params=initial)
    kept = manager.new_context()  # like the contexts NVFlare components keep for the whole job
    del initial
    for r in range(1, 4):
        aggregated = FLModel(params_type=ParamsType.FULL, params={"w": torch.full((256,), float(r))})
        model = controller.update_model(model, aggregated)
    gc.collect()
    # What the kept context holds locally (no get_prop: that would refresh it from the manager).
    pinned = kept.props[AppConstants.GLOBAL_MODEL]["value"]
    return controller, model, pinned, initial_alive


def test_stock_fedavg_pins_the_initial_model_in_kept_contexts() -> None:
    """The leak the lean controller removes: without it this test's counterpart below would fail."""
    _, model, pinned, initial_alive = _three_rounds(FedAvg)
    assert initial_alive() is not None
    assert pinned["weights"]["w"][0].item() == 0.0
    assert model.params["w"][0].item() == 3.0


def test_lean_fedavg_keeps_one_global_model_for_every_context() -> None:
    controller, model, pinned, initial_alive = _three_rounds(LeanFedAvg)
    assert initial_alive() is None, "the initial weights must be freed once a newer model exists"
    assert pinned["weights"]["w"] is model.params["w"], "old contexts see the current model, not a copy"
    assert controller.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) is pinned


def test_broadcast_deep_copy_shares_the_tensors_and_is_a_plain_dict() -> None:
    weights = SharedWeights({"a": torch.arange(4.0), "b": torch.ones(2, 2)})
    task_data = DXO(DataKind.WEIGHTS, data=weights).to_shareable()
    copied = copy.deepcopy(task_data)  # what NVFlare's WFCommServer does to broadcast task data
    sent = copied["DXO"]["data"]
    assert type(sent) is dict, "the wire must not need a fedllm type"
    assert sent is not weights and all(sent[k] is weights[k] for k in weights)


def _controller(job_id: str = "job", **kwargs) -> LeanFedAvg:
    controller = LeanFedAvg(persistor_id="", **kwargs)
    controller.fl_ctx = FLContextManager(engine=RecordingEngine(), identity_name="server", job_id=job_id).new_context()
    return controller


def test_lean_fedavg_marks_broadcast_weights_as_shared() -> None:
    controller = _controller(num_rounds=1)
    model = FLModel(params_type=ParamsType.FULL, params={"w": torch.ones(3)}, current_round=0, total_rounds=1)
    shareable = controller._build_shareable(model)
    assert isinstance(shareable["DXO"]["data"], SharedWeights)
    assert shareable["DXO"]["data"]["w"] is model.params["w"]


class _Persistor:
    """What LeanFedAvg reads of a continuation's persistor: the resume folder's info (fedllm.flare.resume)."""

    resume_folder = SimpleNamespace(info={"origin_job": "first-job", "from_job": "second-job"})


def test_sites_learn_the_lineage_and_the_rounds_of_the_job_as_first_submitted() -> None:
    """What a site's trainer state is keyed by (fedllm.training.lineage), and what its LR schedule spans."""
    first = _controller("first-job", num_rounds=4)
    task = FLModelUtils.from_shareable(first._build_shareable(FLModel(params={"w": torch.ones(1)}, current_round=2)))
    assert (task.meta[LINEAGE_META], task.current_round, task.total_rounds) == ("first-job", 2, 4)

    # A continuation of it after round 1 runs rounds 2..3 only (fedllm.flare.resume), as NVFlare's FedAvg sees it.
    continuation = _controller("third-job", num_rounds=2, start_round=2)
    continuation.persistor = _Persistor()
    model = FLModel(params={"w": torch.ones(1)}, current_round=2, total_rounds=continuation.num_rounds)
    task = FLModelUtils.from_shareable(continuation._build_shareable(model))
    assert (task.meta[LINEAGE_META], task.current_round, task.total_rounds) == ("first-job", 2, 4)
    assert model.meta in (None, {}), "the global model's own meta is left alone"


def test_lean_persistor_reads_the_initial_weights_then_drops_the_module(tmp_path: Path) -> None:
    args = {"size_mib": 1, "tensor_mib": 0.25, "seed": 3}
    persistor = LeanPTFileModelPersistor(
        model_class="fedllm.flare.server_models.EchoModel", model_args=args, allow_numpy_conversion=False
    )
    fl_ctx = FLContextManager(engine=RecordingEngine(), identity_name="server", job_id="job").new_context()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=True)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    learnable = persistor.load_model(fl_ctx)
    assert persistor.model is None
    expected = EchoModel(**args).state_dict()
    assert set(learnable["weights"]) == set(expected)
    assert all(torch.equal(learnable["weights"][k], expected[k]) for k in expected)
    persistor.save_model(learnable, fl_ctx)
    persistor.handle_event(EventType.END_RUN, fl_ctx)  # the job's end waits for the background write
    saved = torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def _started_persistor(tmp_path: Path, **kwargs):
    persistor = LeanPTFileModelPersistor(
        model_class="fedllm.flare.server_models.EchoModel",
        model_args={"size_mib": 0.5, "tensor_mib": 0.25},
        allow_numpy_conversion=False,
        **kwargs,
    )
    fl_ctx = FLContextManager(engine=RecordingEngine(), identity_name="server", job_id="job").new_context()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=True)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    return persistor, fl_ctx, persistor.load_model(fl_ctx)


def _filled(learnable, value: float):
    return make_model_learnable({k: torch.full_like(v, value) for k, v in learnable["weights"].items()}, {})


def test_background_checkpoint_writes_the_snapshot_taken_when_asked(tmp_path: Path, monkeypatch) -> None:
    """The round goes on while the file is written; what lands is the model of the round that asked."""
    import fedllm.flare.fedavg as lean

    gate, started, real_write = threading.Event(), threading.Event(), lean.write_checkpoint

    def gated_write(save_dict, path):
        started.set()
        assert gate.wait(30)
        real_write(save_dict, path)

    monkeypatch.setattr(lean, "write_checkpoint", gated_write)
    persistor, fl_ctx, learnable = _started_persistor(tmp_path)
    persistor.save_model(_filled(learnable, 1.0), fl_ctx)  # returns while the write is held
    assert started.wait(30)
    checkpoint = tmp_path / "FL_global_model.pt"
    assert not checkpoint.exists(), "the write was held back, so save_model did not wait for it"
    persistor.persistence_manager.update(_filled(learnable, 2.0))  # the next round's model arrives
    gate.set()
    persistor.flush()
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(t, torch.ones_like(t)) for t in saved.values())
    persistor.handle_event(EventType.END_RUN, fl_ctx)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_a_failed_checkpoint_write_fails_the_next_save_and_the_job_end(tmp_path: Path, monkeypatch) -> None:
    import fedllm.flare.fedavg as lean

    def disk_full(obj, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    persistor, fl_ctx, learnable = _started_persistor(tmp_path)
    persistor.save_model(_filled(learnable, 1.0), fl_ctx)
    persistor.flush()
    good = (tmp_path / "FL_global_model.pt").read_bytes()
    monkeypatch.setattr(lean.torch, "save", disk_full)
    persistor.save_model(_filled(learnable, 2.0), fl_ctx)
    with pytest.raises(lean.CheckpointWriteError, match="No space left on device"):
        persistor.flush()
    assert (tmp_path / "FL_global_model.pt").read_bytes() == good, "the previous checkpoint survives intact"
    assert not list(tmp_path.glob(".*.tmp"))
    persistor.save_model(_filled(learnable, 3.0), fl_ctx)
    panics = []
    monkeypatch.setattr(persistor, "system_panic", lambda reason, ctx: panics.append(reason))
    persistor.handle_event(EventType.END_RUN, fl_ctx)
    assert panics and "No space left on device" in panics[0]


def test_a_checkpoint_that_does_not_read_back_is_not_installed(tmp_path: Path) -> None:
    import fedllm.flare.fedavg as lean

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2, 2)}}, path)
    with pytest.raises(lean.CheckpointWriteError, match=r"model\.w did not read back as torch\.float32\(3, 2\)"):
        lean._verify_checkpoint({"model": {"w": torch.zeros(3, 2)}}, str(path))


def test_foreground_checkpoint_is_on_disk_when_save_returns(tmp_path: Path) -> None:
    persistor, fl_ctx, learnable = _started_persistor(tmp_path, background_save=False)
    weights = {k: torch.full_like(v, 5.0) for k, v in learnable["weights"].items()}
    # Metadata of types torch's weights-only loader refuses must not fail the read-back.
    persistor.save_model(make_model_learnable(weights, {"val_accuracy": np.float64(0.5)}), fl_ctx)
    saved = torch.load(tmp_path / "FL_global_model.pt", weights_only=False)["model"]
    assert all(torch.equal(t, torch.full_like(t, 5.0)) for t in saved.values())


def _server_components(job: Path) -> tuple[str, dict]:
    config = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    persistor = next(c for c in config["components"] if c["id"] == "persistor")
    return config["workflows"][0]["path"], persistor


def _echo_template(**exchange) -> JobTemplate:
    return JobTemplate(
        name="echo",
        trainer="fedllm.training.toy.echo",
        initial_model=InitialModel(class_path="fedllm.flare.server_models.EchoModel", args={"size_mib": 1}),
        key_metric="global_val_accuracy",
        final_evaluation=False,
        train_args={"size_mib": 1},
        exchange=ExchangeOptions(**exchange),
    )


@pytest.mark.parametrize(
    ("exchange", "controller", "persistor"),
    [
        ({}, "fedllm.flare.fedavg.LeanFedAvg", "fedllm.flare.fedavg.LeanPTFileModelPersistor"),
        (
            {"lean_server": False},
            "nvflare.app_common.workflows.fedavg.FedAvg",
            "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
        ),
        (
            {"profile": "stock"},
            "nvflare.app_common.workflows.fedavg.FedAvg",
            "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
        ),
    ],
)
def test_jobs_get_the_lean_server_unless_asked_not_to(tmp_path: Path, exchange, controller, persistor) -> None:
    job = create_job(resolve_spec(_echo_template(**exchange), "fedavg", num_clients=1, rounds=1), tmp_path / "jobs")
    workflow, component = _server_components(job)
    assert (workflow, component["path"]) == (controller, persistor)
    if persistor.startswith("fedllm"):
        # Class path + plain arguments: NVFlare's config builder must not build (and keep) the module.
        assert component["args"]["model_class"] == "fedllm.flare.server_models.EchoModel"
        assert "path" not in component["args"]["model_args"]
