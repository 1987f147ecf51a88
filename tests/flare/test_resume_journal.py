"""Continuing a job survives a crash at every step (fedllm.flare.resume.JobResumer's journal), in-process.

The server's parent process is played by a JobResumer over NVFlare's own job store (SimpleJobDefManager on
a FilesystemStorage); its death by an exception raised at the k-th act (each journal write and journal
point, each write into the job store, each folder deletion), for every k until a run has no act left to
crash at. A fresh JobResumer then starts as after a server restart, and the result must be the one a run
without a crash gives: one continuation, holding the newest completed round, the old job marked, and what
the old job started from deleted only once the continuation holds it. The real processes killed at named
points are tests/federation/test_resume.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.impl.job_def_manager import SimpleJobDefManager
from nvflare.apis.job_def import JobMetaKey, RunStatus
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.storages import filesystem_storage
from nvflare.app_common.storages.filesystem_storage import FilesystemStorage

from fedllm.flare import resume
from fedllm.flare.fedavg import LeanPTFileModelPersistor
from fedllm.flare.resume import (
    CONTINUATION_META,
    CONTINUED_AS_META,
    METRICS_FILE,
    NOT_CONTINUED_META,
    PENDING,
    RESUMABLE_PROP,
    RESUME_ROOT,
    JobResumer,
    Lineage,
    RoundProgress,
    folder_progress,
    sha256_of,
)

MODEL = "fedllm.flare.server_models.TinyClassifier"
GLOBAL = Path("app_server") / "FL_global_model.pt"


class Crash(BaseException):
    """The server died here (a BaseException: nothing in the resumer may catch it, as nothing survives SIGKILL)."""


class Runner:
    """The JobRunner calls the resumer makes: the running jobs, and stop_run (the abort it sends)."""

    def __init__(self) -> None:
        self.running_jobs: dict = {}
        self.stopped: list[str] = []

    def stop_run(self, job_id: str, fl_ctx) -> str:
        self.stopped.append(job_id)
        return ""


class Server:
    """What the server's parent process gives its components: workspace, job store, job runner, contexts."""

    def __init__(self, root: Path):
        for part in ("startup", "local"):
            (root / part).mkdir(parents=True, exist_ok=True)
        self.root = root
        self.workspace = Workspace(str(root), site_name="server")
        store = FilesystemStorage(root_dir=str(root / "jobs-storage"), uri_root="/")
        self.job_manager = SimpleJobDefManager(uri_root="jobs")  # relative: a copied server finds its jobs
        self.job_manager._get_job_store = lambda fl_ctx: store  # the engine's job_store component
        self.restart()

    def restart(self) -> None:
        """A new server process: nothing runs, the resumer remembers nothing but what is on disk."""
        self.runner = Runner()
        self.resumer = JobResumer(max_site_restarts_per_hour=2)

    def get_workspace(self) -> Workspace:
        return self.workspace

    def get_component(self, component_id: str):
        return {"job_manager": self.job_manager, "job_runner": self.runner}.get(component_id)

    def fire_event(self, event_type: str, fl_ctx) -> None:
        pass

    def new_context(self):
        return FLContextManager(engine=self, identity_name="server", job_id="").new_context()

    # ---- NVFlare's side of a job's life ---------------------------------------------------------------
    def meta(self, job_id: str) -> dict:
        return self.job_manager.get_job(job_id, self.new_context()).meta

    def jobs(self) -> list:
        return self.job_manager.get_all_jobs(self.new_context())

    def left_running(self) -> list[str]:
        statuses = [RunStatus.RUNNING, RunStatus.DISPATCHED]
        return [j.job_id for j in self.job_manager.get_jobs_by_status(statuses, self.new_context())]

    def submit(self, props: dict | None = None) -> str:
        meta = {"name": "demo", "deploy_map": {"app": ["@ALL"]}, "min_clients": 1}
        meta[JobMetaKey.CUSTOM_PROPS.value] = {RESUMABLE_PROP: True, **(props or {})}
        return self.job_manager.create(meta, b"job content", self.new_context())["job_id"]

    def run(self, job_id: str, rounds: range) -> None:
        """The job's server process: it starts (from its resume folder, if any) and completes `rounds`."""
        ctx = self.new_context()
        self.job_manager.set_status(job_id, RunStatus.RUNNING, ctx)
        self.runner.running_jobs[job_id] = self.job_manager.get_job(job_id, ctx)
        if not rounds:  # killed as it deployed: a run dir whose persistor never started
            (Path(self.workspace.get_app_dir(job_id))).mkdir(parents=True, exist_ok=True)
            return
        fl_ctx = FLContextManager(engine=self, identity_name="server", job_id=job_id).new_context()
        fl_ctx.set_prop("__app_root__", self.workspace.get_app_dir(job_id), private=True, sticky=True)
        persistor = LeanPTFileModelPersistor(model_class=MODEL, model_args={"seed": 1}, allow_numpy_conversion=False)
        persistor.handle_event(EventType.START_RUN, fl_ctx)
        weights = persistor.load_model(fl_ctx)["weights"]
        run_dir = Path(self.workspace.get_run_dir(job_id))
        lines = [json.dumps({"round": r}) for r in range(rounds.stop)]
        for r in rounds:
            persistor.progress = RoundProgress(round=r, num_rounds=6)
            persistor.save_model(make_model_learnable({k: v + r + 1 for k, v in weights.items()}, {}), fl_ctx)
            if r == rounds.start:
                persistor.save_model_file(persistor._best_ckpt_save_path)
        persistor.handle_event(EventType.END_RUN, fl_ctx)
        (run_dir / METRICS_FILE).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n")

    def end(self, job_id: str, status: RunStatus) -> None:
        """What NVFlare's JobRunner does when a job's process has ended: archive, delete, status, then the event."""
        ctx = self.new_context()
        run_dir = self.workspace.get_run_dir(job_id)
        self.job_manager.save_workspace(job_id, [run_dir], ctx)
        shutil.rmtree(run_dir)
        self.job_manager.set_status(job_id, status, ctx)
        self.runner.running_jobs.pop(job_id, None)
        self.resumer.job_ended(self, job_id)

    def start(self) -> None:
        """The server's start: the resumer at SYSTEM_START, with the jobs the store still calls running."""
        self.resumer.recover(self, self.left_running())


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch) -> None:
    """Durability against power loss is not what an in-process crash tests (the process dies, the page cache
    stays); fsync would only make each of these hundreds of replays slow."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


class Acts:
    """Counts the resumer's acts a crash can fall between, and raises Crash at the k-th (never with 0).

    Acts: each write into NVFlare's job store (meta, status, clone, archive), each journal write and
    journal point, each collect of a folder and each folder deletion, before and after.
    """

    def __init__(self, monkeypatch, crash_at: int = 0):
        self.count, self.crash_at, self.names = 0, crash_at, []
        self._patch(monkeypatch, filesystem_storage, "_write", "store write")
        self._patch(monkeypatch, resume, "_remove", "delete folder")
        self._patch(monkeypatch, resume, "collect", "collect")
        monkeypatch.setattr(Lineage, "write", self._wrap(Lineage.write, "journal write"))
        monkeypatch.setattr(resume, "crash_point", lambda point, *a, **k: self.act(point))

    def _patch(self, monkeypatch, module, name: str, label: str) -> None:
        monkeypatch.setattr(module, name, self._wrap(getattr(module, name), label))

    def _wrap(self, function: Callable, label: str) -> Callable:
        def wrapped(*args, **kwargs):
            self.act(f"before {label}")
            result = function(*args, **kwargs)
            self.act(f"after {label}")
            return result

        return wrapped

    def act(self, name: str) -> None:
        self.count += 1
        self.names.append(name)
        if self.count == self.crash_at:
            raise Crash(name)


def _continuations_of(server: Server, old: str) -> list[str]:
    return [j.job_id for j in server.jobs() if j.meta.get(JobMetaKey.CLONED_FROM.value) == old]


def _continued_once(server: Server, old: str) -> str:
    """Exactly one continuation of `old`, which names it; returned."""
    clones = _continuations_of(server, old)
    assert len(clones) == 1, f"{len(clones)} continuations of job {old}"
    assert server.meta(old)[CONTINUED_AS_META] == clones[0]
    return clones[0]


def _global_digests(server: Server, job_id: str) -> set[str]:
    """sha256 of every global checkpoint that holds the lineage's rounds: in resume folders, the job's run
    dir, and the workspace NVFlare archived."""
    found = {sha256_of(p) for p in (server.root / RESUME_ROOT).glob(f"*/[!.]*/{GLOBAL}")}
    run_dir = Path(server.workspace.get_run_dir(job_id))
    if (run_dir / GLOBAL).is_file():
        found.add(sha256_of(run_dir / GLOBAL))
    archive = server.root / "jobs-storage" / "jobs" / job_id / "workspace"
    if archive.is_file():
        with zipfile.ZipFile(archive) as zipped:
            if GLOBAL.as_posix() in zipped.namelist():
                found.add(hashlib.sha256(zipped.read(GLOBAL.as_posix())).hexdigest())
    return found


def _check_continued(server: Server, old: str, held: int, digest: str, reason: str) -> None:
    new = _continued_once(server, old)
    meta = server.meta(new)
    info = meta[CONTINUATION_META]
    assert (info["from_job"], info["from_round"], info["reason"]) == (old, held, reason)
    assert server.meta(old)[JobMetaKey.STATUS.value] in ("FINISHED:ABANDONED", "FINISHED:ABORTED")
    lineage = Lineage(server.root / RESUME_ROOT / info["origin_job"])
    journal = lineage.read()
    assert journal["step"] is None and journal["head"] == new
    assert folder_progress(lineage.folder(new)) == held and sha256_of(lineage.folder(new) / GLOBAL) == digest
    assert sorted(p.name for p in lineage.path.iterdir()) == sorted([new, "journal.json"]), (
        "what the old job started from is gone once the new one holds it, and nothing half made is left"
    )


def _template(root: Path, deployed_only: bool) -> tuple[str, int, str]:
    """Job A completed rounds 0..1, then the server died; its continuation B started (2..3 done, or killed as
    it deployed). Returns B, the round its continuation must start after, and that checkpoint's sha256."""
    server = Server(root)
    first = server.submit()
    server.run(first, range(0, 2))
    server.restart()
    server.start()
    second = _continued_once(server, first)
    server.run(second, range(0) if deployed_only else range(2, 4))
    newest = (
        next((root / RESUME_ROOT).glob(f"*/{second}")) if deployed_only else Path(server.workspace.get_run_dir(second))
    )
    return second, folder_progress(newest), sha256_of(newest / GLOBAL)


def _server_died(server: Server, job_id: str) -> None:
    server.restart()
    server.start()


def _site_restarted(server: Server, job_id: str) -> None:
    server.runner.running_jobs[job_id] = server.job_manager.get_job(job_id, server.new_context())
    server.resumer.site_restarted(server, job_id, "site-2")
    assert server.runner.stopped == [job_id] and server.meta(job_id)[CONTINUED_AS_META] == PENDING
    server.end(job_id, RunStatus.FINISHED_ABORTED)


CASES = {
    "server-restart-mid-round": (False, _server_died, "the server restarted"),
    "server-restart-while-deploying": (True, _server_died, "the server restarted"),
    "site-restart-mid-round": (False, _site_restarted, "site site-2 restarted"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_crash_at_any_step_is_replayed_into_the_same_single_continuation(tmp_path, monkeypatch, case) -> None:
    deployed_only, interrupt, reason = CASES[case]
    monkeypatch.chdir(tmp_path)
    old, held, digest = _template(tmp_path / "template", deployed_only)
    assert held == (1 if deployed_only else 3), "never None: the run that deployed only holds what it started from"

    clean = Server(_copy(tmp_path / "template", tmp_path / "clean"))
    with monkeypatch.context() as patch:
        acts = Acts(patch)
        interrupt(clean, old)
    _check_continued(clean, old, held, digest, reason)
    assert {f"journal:{p}" for p in ("intent", "collected", "cloning", "cloned", "marked")} <= set(acts.names)

    def crashed(k: int, then: list[int]) -> None:
        """Die at act k, then at act m of each replay in `then`; a last replay must give the clean result."""
        server = Server(_copy(tmp_path / "template", tmp_path / f"crash-{k}-{'-'.join(map(str, then))}"))
        with monkeypatch.context() as patch, pytest.raises(Crash):
            Acts(patch, crash_at=k)
            interrupt(server, old)
        assert digest in _global_digests(server, old), f"round {held} lost after a crash at act {k}"
        # Died before the site's restart was journaled: the server's restart is what interrupted the job.
        journaled = any((Lineage(p).read() or {}).get("step") for p in (server.root / RESUME_ROOT).iterdir())
        expected = reason if journaled or _continuations_of(server, old) else CASES["server-restart-mid-round"][2]
        for m in then:
            with monkeypatch.context() as patch, contextlib.suppress(Crash):
                Acts(patch, crash_at=m)
                _server_died(server, old)
            assert digest in _global_digests(server, old), f"round {held} lost after crashes at {k}, {m}"
        _server_died(server, old)
        try:
            _check_continued(server, old, held, digest, expected)
        except AssertionError as exc:
            raise AssertionError(f"crash at act {k} ({acts.names[k - 1]}), then in replays at {then}: {exc}") from exc
        shutil.rmtree(server.root)

    for k in range(1, acts.count + 1):
        crashed(k, [])
    # The replay of a step cut short where the continuation is half made, cut short itself at each of its acts.
    cloning = acts.names.index("journal:cloning") + 1
    replay = Server(_copy(tmp_path / "template", tmp_path / "replay"))
    with monkeypatch.context() as patch, pytest.raises(Crash):
        Acts(patch, crash_at=cloning)
        interrupt(replay, old)
    with monkeypatch.context() as patch:
        replay_acts = Acts(patch)
        _server_died(replay, old)
    for m in range(1, replay_acts.count + 1):
        crashed(cloning, [m])


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _site_flaps(server: Server, job_id: str, site: str = "site-3") -> str | None:
    """`site` re-registers while `job_id` runs; NVFlare ends the aborted job. Returns its continuation, if any."""
    server.runner.running_jobs[job_id] = server.job_manager.get_job(job_id, server.new_context())
    server.resumer.site_restarted(server, job_id, site)
    server.end(job_id, RunStatus.FINISHED_ABORTED)
    following = server.meta(job_id)[CONTINUED_AS_META]
    return following or None


def test_a_flapping_site_continues_the_job_a_bounded_number_of_times_per_hour(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")  # max_site_restarts_per_hour=2
    job = server.submit()
    server.run(job, range(0, 1))
    first = _site_flaps(server, job)
    server.run(first, range(1, 2))
    second = _site_flaps(server, first)
    assert server.meta(second)[CONTINUATION_META]["attempt"] == 2
    server.run(second, range(2, 3))
    assert _site_flaps(server, second, site="site-1"), "another site's restarts count on their own"
    third = _continuations_of(server, second)[0]
    server.run(third, range(3, 4))
    assert _site_flaps(server, third) is None, "the third restart of site-3 within the hour"
    why = server.meta(third)[NOT_CONTINUED_META]
    assert why.startswith("site site-3 restarted 3 times within an hour") and "limit 2 per hour" in why
    lineage = Lineage(server.root / RESUME_ROOT / job)
    assert lineage.read()["ended"] == why and lineage.read()["head"] == third
    kept = next(p for p in lineage.path.iterdir() if p.is_dir())
    assert str(kept) in why and folder_progress(kept) == 3, (
        "the completed rounds' models stay, and the message says where"
    )
    # It stays until the job is deleted; then the next start prunes it.
    server.restart()
    server.start()
    assert lineage.path.is_dir()
    server.job_manager.delete(third, server.new_context())
    server.start()
    assert not lineage.path.exists()


def test_restarts_older_than_an_hour_do_not_count_and_a_job_sets_its_own_bound(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")
    job = server.submit({resume.MAX_SITE_RESTARTS_PROP: 1})
    server.run(job, range(0, 1))
    first = _site_flaps(server, job)
    server.run(first, range(1, 2))
    hour_later = time.time() + resume.RESTART_WINDOW_S + 1
    monkeypatch.setattr(resume.time, "time", lambda: hour_later)
    second = _site_flaps(server, first)
    assert second, "the restart an hour ago no longer counts"
    server.run(second, range(2, 3))
    assert _site_flaps(server, second) is None, "the job's own bound: 1 per hour"
    assert "limit 1 per hour" in server.meta(second)[NOT_CONTINUED_META]


def test_a_chain_that_completes_no_round_stops(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")
    job = server.submit()
    server.run(job, range(0, 2))
    for _ in range(resume.MAX_STALLED_CONTINUATIONS):
        server.restart()
        server.start()
        job = server.meta(job)[CONTINUED_AS_META] or job
        server.run(job, range(0))  # dies as it deploys, every time
    server.restart()
    server.start()
    meta = server.meta(job)
    assert meta[CONTINUED_AS_META] == "" and "3 times in a row without completing a round" in meta[NOT_CONTINUED_META]
    assert meta[JobMetaKey.STATUS.value] == "FINISHED:ABANDONED"


def test_a_job_that_finished_before_the_abort_reached_it_is_not_continued(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")
    job = server.submit()
    server.run(job, range(0, 2))
    server.resumer.site_restarted(server, job, "site-1")
    server.end(job, RunStatus.FINISHED_COMPLETED)
    assert server.meta(job)[CONTINUED_AS_META] == "" and not _continuations_of(server, job)
    assert not (server.root / RESUME_ROOT / job).exists()


def test_a_completed_lineage_is_removed_and_an_aborted_one_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")
    job = server.submit()
    server.run(job, range(0, 1))
    server.restart()
    server.start()
    following = server.meta(job)[CONTINUED_AS_META]
    server.run(following, range(1, 2))
    server.end(following, RunStatus.FINISHED_ABORTED)  # an admin's abort_job
    lineage = Lineage(server.root / RESUME_ROOT / job)
    assert lineage.read()["ended"] == f"job {following} ended FINISHED:ABORTED"
    assert (lineage.folder(following) / GLOBAL).is_file(), "the completed rounds' models stay"

    other = server.submit()
    server.run(other, range(0, 1))
    server.restart()
    server.start()
    continued = server.meta(other)[CONTINUED_AS_META]
    server.run(continued, range(1, 2))
    server.end(continued, RunStatus.FINISHED_COMPLETED)
    assert not (server.root / RESUME_ROOT / other).exists(), "its own result holds the models"


def test_a_job_that_is_not_resumable_is_abandoned_at_start(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")
    meta = {"name": "plain", "deploy_map": {"app": ["@ALL"]}, "min_clients": 1}
    job = server.job_manager.create(meta, b"job content", server.new_context())["job_id"]
    server.run(job, range(0, 1))
    server.restart()
    server.start()
    assert server.meta(job)[JobMetaKey.STATUS.value] == "FINISHED:ABANDONED" and not _continuations_of(server, job)
    assert not Path(server.workspace.get_run_dir(job)).exists(), "archived into the store, as NVFlare does"


def test_a_malformed_bound_in_the_job_falls_back_to_the_servers(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "server")  # the server's bound: 2
    job = server.submit({resume.MAX_SITE_RESTARTS_PROP: "three"})
    server.run(job, range(0, 1))
    first = _site_flaps(server, job)
    server.run(first, range(1, 2))
    second = _site_flaps(server, first)
    server.run(second, range(2, 3))
    assert _site_flaps(server, second) is None and "limit 2 per hour" in server.meta(second)[NOT_CONTINUED_META]
    assert f"custom_props.{resume.MAX_SITE_RESTARTS_PROP} is 'three', not an integer" in caplog.text
