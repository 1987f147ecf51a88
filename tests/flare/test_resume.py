"""What a continuation job starts from (fedllm.flare.resume), without a federation.

The journal's replay after a crash at every step is tests/flare/test_resume_journal.py; the end-to-end
proof (a real server and sites SIGKILLed at named points) is tests/federation/test_resume.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.storages.filesystem_storage import FilesystemStorage
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

from fedllm.flare.fedavg import MODEL_SELECTOR_ID, LeanFedAvg, LeanPTFileModelPersistor
from fedllm.flare.resume import (
    METRICS_FILE,
    RESUME_ROOT,
    ResumeFolder,
    RoundProgress,
    collect,
    completed_round_lines,
    folder_progress,
    manifest,
    read_progress,
    verify_manifest,
)
from fedllm.flare.server_models import TinyClassifier

MODEL = "fedllm.flare.server_models.TinyClassifier"


class ServerEngine:
    """What the server job's components ask their engine for: the workspace, components, events."""

    def __init__(self, root: Path, components: dict | None = None):
        for part in ("startup", "local"):  # what NVFlare checks a workspace has
            (root / part).mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(str(root), site_name="server")
        self.components = components or {}

    def get_workspace(self) -> Workspace:
        return self.workspace

    def get_component(self, component_id: str):
        return self.components.get(component_id)

    def fire_event(self, event_type: str, fl_ctx) -> None:
        pass


def _context(engine: ServerEngine, job_id: str):
    fl_ctx = FLContextManager(engine=engine, identity_name="server", job_id=job_id).new_context()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, engine.workspace.get_app_dir(job_id), private=True, sticky=True)
    return fl_ctx


def _persistor(engine: ServerEngine, job_id: str) -> tuple[LeanPTFileModelPersistor, object]:
    persistor = LeanPTFileModelPersistor(model_class=MODEL, model_args={"seed": 1}, allow_numpy_conversion=False)
    fl_ctx = _context(engine, job_id)
    persistor.handle_event(EventType.START_RUN, fl_ctx)
    return persistor, fl_ctx


def _interrupted_run(root: Path, job_id: str = "job-1", rounds_done: int = 2) -> Path:
    """A server run dir as a job leaves it when the server dies in round `rounds_done`."""
    engine = ServerEngine(root)
    persistor, fl_ctx = _persistor(engine, job_id)
    weights = persistor.load_model(fl_ctx)["weights"]
    for r in range(rounds_done):
        persistor.progress = RoundProgress(round=r, num_rounds=5, best_val_metric=0.5 + r / 10)
        persistor.save_model(make_model_learnable({k: v + r + 1 for k, v in weights.items()}, {}), fl_ctx)
        if r == 0:
            persistor.save_model_file(persistor._best_ckpt_save_path)  # round 1 picks round 0's model as best
    persistor.handle_event(EventType.END_RUN, fl_ctx)
    run_dir = Path(engine.workspace.get_run_dir(job_id))
    # Round `rounds_done` was aggregated (its metrics line is written) but its checkpoint never landed,
    # and the server died while appending the next line.
    lines = [json.dumps({"round": r, "aggregated_metrics": []}) for r in range(rounds_done + 1)]
    (run_dir / METRICS_FILE).parent.mkdir(parents=True)
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + '\n{"round": ' + str(rounds_done + 1))
    return run_dir


def test_every_global_checkpoint_carries_the_round_it_completes(tmp_path: Path) -> None:
    run_dir = _interrupted_run(tmp_path)
    progress = read_progress(run_dir / "app_server" / "FL_global_model.pt")
    assert progress == RoundProgress(round=1, num_rounds=5, best_val_metric=0.6)
    assert read_progress(run_dir / "app_server" / "best_FL_global_model.pt").round == 0
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, plain)
    assert read_progress(plain) is None


def test_only_completed_rounds_are_carried_over_once_each() -> None:
    text = "\n".join(json.dumps({"round": r, "v": r}) for r in (0, 1, 1, 3, 2)) + '\n{"round": 4, "agg'
    lines, missing = completed_round_lines(text, last_round=2)
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    assert missing == []
    assert completed_round_lines(text, last_round=-1) == ([], [])
    assert completed_round_lines('{"round": 0}\n', last_round=2)[1] == [1, 2]


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_continuation_folder_links_the_interrupted_run_dirs_checkpoints(tmp_path: Path) -> None:
    run_dir = _interrupted_run(tmp_path / "ws")
    target = tmp_path / "ws" / RESUME_ROOT / "job-1" / "job-2"
    held, files = collect(target, own_run=run_dir, own_archive=None, started_from=None, info={"from_job": "job-1"})
    assert _files(target) == [
        "app_server/FL_global_model.pt",
        "app_server/best_FL_global_model.pt",
        "metrics/round_metrics.jsonl",
        "resume.json",
    ], "never a temp file of a checkpoint being written"
    assert os.path.samefile(target / "app_server" / "FL_global_model.pt", run_dir / "app_server" / "FL_global_model.pt")
    assert held == folder_progress(target) == 1, "the global checkpoint's round, not the best model's"
    assert json.loads((target / "resume.json").read_text()) == {"from_job": "job-1", "from_round": 1}
    assert set(files) == set(_files(target)) and verify_manifest(target, files, 1) is None


def test_a_continuation_folder_from_the_workspace_nvflare_archived(tmp_path: Path) -> None:
    """After a site restart the job was aborted and its run dir archived into the job store, then removed."""
    run_dir = _interrupted_run(tmp_path / "ws")
    store = FilesystemStorage(root_dir=str(tmp_path / "jobs-storage"), uri_root="/")
    store.create_object("/jobs/job-1", b"job content", {"name": "demo"}, overwrite_existing=False)
    store.update_object("/jobs/job-1", [str(run_dir)], "workspace")  # what JobRunner._save_workspace does
    store.get_data_for_download("/jobs/job-1", "workspace", str(tmp_path / "workspace.zip"))
    target = tmp_path / "ws" / RESUME_ROOT / "job-1" / "job-2"
    held, _ = collect(target, own_run=None, own_archive=tmp_path / "workspace.zip", started_from=None, info={})
    assert held == 1
    assert torch.equal(
        torch.load(target / "app_server" / "FL_global_model.pt", weights_only=False)["model"]["net.0.bias"],
        torch.load(run_dir / "app_server" / "FL_global_model.pt", weights_only=False)["model"]["net.0.bias"],
    )
    assert (target / METRICS_FILE).read_text() == (run_dir / METRICS_FILE).read_text()


def test_a_run_that_completed_fewer_rounds_never_replaces_what_it_started_from(tmp_path: Path) -> None:
    """A continuation killed as it deployed has a run dir without checkpoints (or older ones): its successor
    starts from what it started from, not from round 0."""
    started_from = tmp_path / "ws" / RESUME_ROOT / "job-1" / "job-2"
    collect(started_from, own_run=_interrupted_run(tmp_path / "ws"), own_archive=None, started_from=None, info={})
    deploying = tmp_path / "ws" / "job-2"
    (deploying / "app_server").mkdir(parents=True)  # deployed, its persistor not started yet
    target = started_from.parent / "job-3"
    held, _ = collect(target, own_run=deploying, own_archive=None, started_from=started_from, info={})
    assert held == 1 and folder_progress(target) == 1
    assert os.path.samefile(
        target / "app_server" / "FL_global_model.pt", started_from / "app_server" / "FL_global_model.pt"
    )
    # Equal rounds: what it started from wins (complete by construction).
    older = tmp_path / "older"
    _interrupted_run(older, job_id="job-2", rounds_done=2)
    held, _ = collect(target, own_run=older / "job-2", own_archive=None, started_from=started_from, info={})
    assert held == 1
    assert os.path.samefile(
        target / "app_server" / "FL_global_model.pt", started_from / "app_server" / "FL_global_model.pt"
    )


def test_a_checkpoint_that_does_not_read_back_is_not_used(tmp_path: Path) -> None:
    started_from = tmp_path / "ws" / RESUME_ROOT / "job-1" / "job-2"
    collect(started_from, own_run=_interrupted_run(tmp_path / "ws"), own_archive=None, started_from=None, info={})
    newer = tmp_path / "newer"
    run_dir = _interrupted_run(newer, job_id="job-2", rounds_done=3)
    (run_dir / "app_server" / "FL_global_model.pt").write_bytes(b"torn")
    target = started_from.parent / "job-3"
    assert collect(target, own_run=run_dir, own_archive=None, started_from=started_from, info={})[0] == 1


def test_verification_is_by_content(tmp_path: Path) -> None:
    target = tmp_path / "f"
    held, files = collect(
        target, own_run=_interrupted_run(tmp_path / "ws"), own_archive=None, started_from=None, info={}
    )
    assert verify_manifest(target, files, held) is None
    assert "round 1, not round 0" in verify_manifest(target, files, 0)
    metrics = target / METRICS_FILE
    metrics.write_text(metrics.read_text().replace("0", "9"))  # same size, other bytes
    assert "sha256" in verify_manifest(target, files, held)
    assert manifest(target)["resume.json"]["size"] == (target / "resume.json").stat().st_size


def _continuation(tmp_path: Path) -> tuple[ServerEngine, LeanPTFileModelPersistor, object, Path]:
    run_dir = _interrupted_run(tmp_path)
    info = {"from_job": "job-1", "origin_job": "job-1", "reason": "the server restarted"}
    collect(tmp_path / RESUME_ROOT / "job-1" / "job-2", own_run=run_dir, own_archive=None, started_from=None, info=info)
    selector = IntimeModelSelector(key_metric="val_accuracy")
    engine = ServerEngine(tmp_path, {MODEL_SELECTOR_ID: selector})
    persistor, fl_ctx = _persistor(engine, "job-2")
    return engine, persistor, fl_ctx, run_dir


def test_a_continuation_starts_from_the_interrupted_global_model(tmp_path: Path) -> None:
    engine, persistor, fl_ctx, run_dir = _continuation(tmp_path)
    assert persistor.resume_folder == ResumeFolder(tmp_path / RESUME_ROOT / "job-1" / "job-2")
    assert persistor.resume_folder.info["origin_job"] == "job-1", "the lineage, for the sites' trainer state"
    assert persistor.resumed_progress.round == 1
    learnable = persistor.load_model(fl_ctx)
    saved = torch.load(run_dir / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert all(torch.equal(torch.as_tensor(learnable["weights"][k]), saved[k]) for k in saved)
    # Its own app dir holds the models so far from the start (its result has them even if no round is left).
    app = Path(engine.workspace.get_app_dir("job-2"))
    assert os.path.samefile(app / "FL_global_model.pt", run_dir / "app_server" / "FL_global_model.pt")
    assert os.path.samefile(app / "best_FL_global_model.pt", run_dir / "app_server" / "best_FL_global_model.pt")
    persistor.handle_event(EventType.END_RUN, fl_ctx)


def test_a_fresh_job_builds_its_initial_model(tmp_path: Path) -> None:
    persistor, fl_ctx = _persistor(ServerEngine(tmp_path), "job-1")
    assert persistor.resume_folder is None and persistor.resumed_progress is None
    initial = TinyClassifier(seed=1).state_dict()["net.0.bias"]
    assert torch.equal(persistor.load_model(fl_ctx)["weights"]["net.0.bias"], initial)


def test_the_controller_goes_on_after_the_last_completed_round(tmp_path: Path) -> None:
    engine, persistor, fl_ctx, _run_dir = _continuation(tmp_path)
    controller = LeanFedAvg(num_rounds=5, persistor_id="persistor")
    controller.fl_ctx, controller.engine, controller.persistor = fl_ctx, engine, persistor
    controller.load_model()
    assert (controller.start_round, controller.num_rounds) == (2, 3), "rounds 2..4 of 5 are left"
    assert fl_ctx.get_prop(AppConstants.NUM_ROUNDS) == 3
    selector = engine.get_component(MODEL_SELECTOR_ID)
    assert selector.best_val_metric == pytest.approx(0.6), "a later model is best only if it beats round 1's"
    # Rounds 0 and 1 carried over; round 2 (aggregated, never checkpointed) and the torn line are gone.
    carried = (Path(engine.workspace.get_run_dir("job-2")) / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["round"] for line in carried] == [0, 1]

    # Its next checkpoint records round 2 of 5 and the selector's state.
    controller.current_round = 2
    selector.best_val_metric = 0.9
    controller.save_model(FLModel(params=persistor.load_model(fl_ctx)["weights"]))
    persistor.flush()
    progress = read_progress(Path(engine.workspace.get_app_dir("job-2")) / "FL_global_model.pt")
    assert (progress.round, progress.num_rounds, progress.best_val_metric) == (2, 5, 0.9)
    persistor.handle_event(EventType.END_RUN, fl_ctx)
