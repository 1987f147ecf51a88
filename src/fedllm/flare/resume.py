"""A FedAvg job that outlives a server restart or a site restart: continued from its last completed round.

NVFlare 2.9 resumes nothing: its snapshot persistence is a no-op (`ServerEngine.persist_components`),
a job the server was running when it died stays RUNNING in the job store for good, and a site that is
restarted mid-job re-registers under a new token while the job waits for it forever (tested in
tests/federation/test_resume.py). fedllm continues such a job as a *continuation job*: a clone of the
job (same name, content and deploy map, meta `fedllm_resume`) that starts from the last completed
round's global checkpoint, under NVFlare's own scheduler.

Who does what:

- `LeanFedAvg` (fedavg.py) writes a `RoundProgress` into every round's global checkpoint (the file the
  persistor already writes atomically): the round it completes, the job's rounds, the best-model
  selector's state. The checkpoint is the one source of truth: a round whose checkpoint is not on disk
  did not happen and is redone; nothing else can disagree with it.
- `JobResumer`, a component of the server's parent process (the server kit's resources.json; the
  `JobResumeBuilder` puts it there), notices the interruption and submits the continuation:
  at server start, every job still RUNNING/DISPATCHED in the store was interrupted (nothing can run
  yet); when a site registers while a running job counts it as a participant, that site lost its job
  process, so the job is aborted and continued with every site. Before submitting, it copies what the
  continuation needs (the interrupted run's checkpoints and round metrics) into
  `<server workspace>/fedllm-resume/<continuation id>/` (`ResumeFolder`).
- The continuation's persistor loads the checkpoint from that folder and its controller starts at the
  next round, with the metrics of the completed rounds carried over: every round exactly once.

What a site was training in the interrupted round is redone by every site in the continuation, never
counted twice: the interrupted server job's partial aggregate died with it, or was discarded by the abort.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, SystemComponents
from nvflare.apis.job_def import Job, JobMetaKey, RunStatus, new_job_id

from fedllm.fileio import atomic_directory, atomic_path, fsync_path, write_text

# The job meta fedllm's FedAvg recipe sets (under custom_props) on jobs this module may continue.
RESUMABLE_PROP = "fedllm_resumable"
# Meta of a continuation: {"from_job", "origin_job", "reason", "attempt"}.
CONTINUATION_META = "fedllm_resume"
# Meta set on the interrupted job: the id of the job that continues it; PENDING while that job is prepared
# (the interrupted job may show FINISHED meanwhile), "" when it will not be continued after all.
CONTINUED_AS_META = "fedllm_continued_as"
PENDING = "pending"
# Key of RoundProgress inside a global checkpoint (beside PTFileModelPersistor's "model", "meta_props").
PROGRESS_KEY = "fedllm_progress"

RESUME_ROOT = "fedllm-resume"  # under the server's workspace root, beside the job run dirs
INFO_FILE = "resume.json"
APP_DIR = "app_server"  # the server app's folder in a run dir (deploy_map {"app": ["@ALL"]})
METRICS_FILE = Path("metrics") / "round_metrics.jsonl"  # NVFlare's MetricsArtifactWriter, run-dir relative
# A chain of continuations that completes no round stops after this many (e.g. a site that dies every start).
MAX_STALLED_CONTINUATIONS = 3


@dataclass(frozen=True)
class RoundProgress:
    """What the controller must know, beside the weights, to go on after `round` as if never stopped."""

    round: int  # the last completed round: the checkpoint holds its aggregate
    num_rounds: int  # the job's configured rounds
    best_val_metric: float | None = None  # IntimeModelSelector's best so far (negated for min-metrics)
    best_raw_val_metric: float | None = None
    best_target_metric_value: float | None = None  # FedAvg's early-stopping state
    rounds_without_improvement: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundProgress:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_progress(checkpoint: Path) -> RoundProgress | None:
    """The RoundProgress in a global checkpoint, or None if it holds none (written before any round ended)."""
    # This server's own file; the full unpickler, as the persistor's metadata may hold numpy values.
    data = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
    found = data.get(PROGRESS_KEY) if isinstance(data, dict) else None
    return RoundProgress.from_dict(found) if isinstance(found, Mapping) else None


def completed_round_lines(text: str, last_round: int) -> tuple[list[str], list[int]]:
    """The metric lines of rounds 0..last_round, once each, in round order; and the rounds missing.

    Rounds after `last_round` were aggregated but never checkpointed: the continuation redoes them,
    so their lines go. A torn last line (the server died while appending) belongs to such a round.
    """
    by_round: dict[int, str] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] <= last_round:
            by_round[record["round"]] = line
    missing = [r for r in range(last_round + 1) if r not in by_round]
    return [by_round[r] for r in sorted(by_round)], missing


def sync_file(path: Path) -> None:
    """fsync a file another component appends to (so it is on disk before a checkpoint that follows it)."""
    with contextlib.suppress(FileNotFoundError):
        fsync_path(path)


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s bytes at `target` atomically: a hard link when the filesystem allows, else a durable copy.

    A link costs nothing for a multi-GB checkpoint and is safe because fedllm never writes a checkpoint
    in place (every new one is a new file renamed over the name).
    """
    with atomic_path(target) as temp:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
            fsync_path(temp)


@dataclass(frozen=True)
class ResumeFolder:
    """`<server workspace>/fedllm-resume/<job id>/`: what a continuation job starts from.

    Holds `resume.json` (which job it continues, why) and, as the interrupted run dir had them,
    `app_server/*.pt` (the global and best checkpoints) and `metrics/round_metrics.jsonl`.
    """

    path: Path

    @classmethod
    def of(cls, workspace_root: str | os.PathLike[str], job_id: str) -> ResumeFolder:
        return cls(Path(workspace_root) / RESUME_ROOT / job_id)

    @classmethod
    def of_job(cls, fl_ctx) -> ResumeFolder | None:
        """The folder of the job `fl_ctx` runs, if that job continues another (None otherwise)."""
        try:
            root = fl_ctx.get_engine().get_workspace().get_root_dir()
        except AttributeError:  # no workspace: not a server job process
            return None
        folder = cls.of(root, fl_ctx.get_job_id())
        return folder if (folder.path / INFO_FILE).is_file() else None

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.path / INFO_FILE).read_text())

    def checkpoint(self, name: str) -> Path | None:
        path = self.path / APP_DIR / name
        return path if path.is_file() else None

    def metrics_text(self) -> str:
        path = self.path / METRICS_FILE
        return path.read_text(errors="replace") if path.is_file() else ""


def _wanted(relative: str) -> bool:
    """The parts of a run dir a continuation needs: the server app's checkpoints and the round metrics."""
    parts = Path(relative).parts
    return (len(parts) == 2 and parts[0] == APP_DIR and parts[1].endswith(".pt")) or Path(relative) == METRICS_FILE


def write_resume_folder(folder: ResumeFolder, *, run_dir: Path | None, archive: Path | None) -> None:
    """Fill `folder` (atomically: complete or absent) from an interrupted run dir, or from its archived workspace.

    `resume.json`, written last (`write_info`), is what makes it a continuation's folder.
    """
    with atomic_directory(folder.path, replace=True) as staging:
        if run_dir is not None:
            for path in sorted(run_dir.rglob("*")):
                relative = path.relative_to(run_dir).as_posix()
                if path.is_file() and _wanted(relative):
                    link_or_copy(path, staging / relative)  # atomic_path makes the parent folder
        elif archive is not None:
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.infolist():
                    if member.is_dir() or not _wanted(member.filename):
                        continue
                    target = staging / member.filename
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zipped.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
                    fsync_path(target)
    fsync_path(folder.path.parent)


def write_info(folder: ResumeFolder, info: Mapping[str, Any]) -> None:
    write_text(folder.path / INFO_FILE, json.dumps(dict(info), indent=2) + "\n", durable=True)


def folder_progress(folder: ResumeFolder) -> int | None:
    """The last completed round the folder's checkpoints hold (None: the run completed none).

    The global checkpoint holds the latest progress; the best model's file an earlier round's, so the
    largest wins whatever the files are called.
    """
    rounds = [p.round for p in map(read_progress, sorted((folder.path / APP_DIR).glob("*.pt"))) if p is not None]
    return max(rounds, default=None)


def is_resumable(meta: Mapping[str, Any]) -> bool:
    props = meta.get(JobMetaKey.CUSTOM_PROPS.value)
    return isinstance(props, Mapping) and bool(props.get(RESUMABLE_PROP))


def participants(meta: Mapping[str, Any]) -> set[str]:
    """Names of the sites a running job was started on (NVFlare's `job_clients`)."""
    return {c.get("name") for c in meta.get(JobMetaKey.JOB_CLIENTS.value) or [] if isinstance(c, Mapping)}


# What a continuation keeps of the interrupted job's meta: NVFlare's own `clone_job` list, plus who
# submitted it (the continuation runs on the original submitter's behalf) and its custom props.
_KEPT_META = (
    JobMetaKey.JOB_NAME,
    JobMetaKey.JOB_FOLDER_NAME,
    JobMetaKey.DEPLOY_MAP,
    JobMetaKey.RESOURCE_SPEC,
    JobMetaKey.CONTENT_LOCATION,
    JobMetaKey.RESULT_LOCATION,
    JobMetaKey.APPROVALS,
    JobMetaKey.MIN_CLIENTS,
    JobMetaKey.MANDATORY_CLIENTS,
    JobMetaKey.DATA_STORAGE_FORMAT,
    JobMetaKey.STUDY,
    JobMetaKey.SUBMITTER_NAME,
    JobMetaKey.SUBMITTER_ORG,
    JobMetaKey.SUBMITTER_ROLE,
    JobMetaKey.CUSTOM_PROPS,
    JobMetaKey.JOB_LAUNCHER_SPEC,
    JobMetaKey.SCOPE,
)
_KEPT_EXTRA = ("byoc",)  # NVFlare's AppValidationKey.BYOC: the job carries an entry script


class JobResumer(FLComponent):
    """Server parent process: continues resumable FedAvg jobs that a server or site restart interrupted.

    Listed in the server kit's resources.json (`fedllm.provision.builders.JobResumeBuilder`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._aborted: dict[str, str] = {}  # job id → why this component aborted it (continue it when it ends)

    def handle_event(self, event_type: str, fl_ctx) -> None:
        if event_type == EventType.SYSTEM_START:
            self._in_background(self._continue_interrupted_jobs, fl_ctx.get_engine())
        elif event_type == EventType.CLIENT_REGISTER_PROCESSED:
            self._site_registered(fl_ctx)
        elif event_type == EventType.JOB_COMPLETED:
            data = fl_ctx.get_prop(FLContextKey.EVENT_DATA) or {}
            job_id = data.get(JobMetaKey.JOB_ID.value)
            if job_id:
                self._in_background(self._job_ended, fl_ctx.get_engine(), job_id)

    def _in_background(self, work, *args) -> None:
        # Copying a multi-GB checkpoint must hold up neither the server's start nor its event threads.
        def run():
            try:
                work(*args)
            except Exception as exc:  # a failed continuation must not take the server down
                self.logger.exception(f"fedllm job resume failed: {exc}")

        threading.Thread(target=run, name="fedllm-resume", daemon=True).start()

    # ---- server restart ------------------------------------------------------------------------------
    def _continue_interrupted_jobs(self, engine) -> None:
        """At start no job can be running: those the store calls RUNNING/DISPATCHED died with the last server."""
        with engine.new_context() as fl_ctx:
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            workspace = engine.get_workspace()
            for job in job_manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
                run_dir = Path(workspace.get_run_dir(job.job_id))
                try:
                    if is_resumable(job.meta):
                        self._submit_continuation(
                            engine, job, "the server restarted", run_dir=run_dir if run_dir.is_dir() else None
                        )
                except Exception as exc:
                    self.logger.exception(f"could not continue job {job.job_id}: {exc}")
                # NVFlare 2.9 would leave it RUNNING for good; ABANDONED is its own word for this. Set after
                # the continuation exists, so whoever follows the job sees where it went as soon as it ends.
                job_manager.set_status(job.job_id, RunStatus.ABANDONED, fl_ctx)
                self.logger.info(f"job {job.job_id} was interrupted by the server's restart: now {RunStatus.ABANDONED}")
                self._archive_run(job_manager, workspace, job.job_id, fl_ctx)
                # If it was a continuation itself, what it started from is not needed any more.
                shutil.rmtree(ResumeFolder.of(workspace.get_root_dir(), job.job_id).path, ignore_errors=True)
            self._prune(job_manager, Path(workspace.get_root_dir()) / RESUME_ROOT, fl_ctx)

    @staticmethod
    def _prune(job_manager, root: Path, fl_ctx) -> None:
        """Drop resume folders no job will read: of jobs that ended without starting (e.g. FINISHED:CANT_SCHEDULE,
        which fires no event), of deleted jobs, and half-written ones a crash left (dot-named)."""
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                job = None if folder.name.startswith(".") else job_manager.get_job(folder.name, fl_ctx)
            except Exception:  # not a job id, or a job the store no longer reads
                job = None
            if job is None or str(job.meta.get(JobMetaKey.STATUS.value, "")).startswith("FINISHED"):
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _archive_run(job_manager, workspace, job_id: str, fl_ctx) -> None:
        """What NVFlare does when a job ends: its workspace into the job store (for download_job), then off disk."""
        dirs: list[str] = []
        for path in (
            workspace.get_run_dir(job_id),
            workspace.get_result_root(job_id),
            workspace.get_log_root(job_id),
            workspace.get_audit_root(job_id),
        ):
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
        if dirs:
            job_manager.save_workspace(job_id, dirs, fl_ctx)
            for path in dirs:
                shutil.rmtree(path, ignore_errors=True)

    # ---- site restart --------------------------------------------------------------------------------
    def _site_registered(self, fl_ctx) -> None:
        """A site that registers while a running job counts it lost that job's process (NVFlare never notices)."""
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default=None) if peer else None
        engine = fl_ctx.get_engine()
        job_runner = engine.get_component(SystemComponents.JOB_RUNNER)
        if not site or job_runner is None:
            return
        for job_id, job in list(job_runner.running_jobs.items()):
            if not is_resumable(job.meta) or site not in participants(job.meta):
                continue
            with self._lock:
                if job_id in self._aborted:
                    continue
                self._aborted[job_id] = f"site {site} restarted"
            self.logger.warning(
                f"site {site} registered again while job {job_id} runs on it: its job process is gone; "
                "aborting the job to continue it from its last completed round with every site"
            )
            self._in_background(self._abort, engine, job_runner, job_id)

    @staticmethod
    def _abort(engine, job_runner, job_id: str) -> None:
        with engine.new_context() as fl_ctx:
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            job_manager.update_meta(job_id, {CONTINUED_AS_META: PENDING}, fl_ctx)
            job_runner.stop_run(job_id, fl_ctx)

    def _job_ended(self, engine, job_id: str) -> None:
        with self._lock:
            reason = self._aborted.pop(job_id, None)
        with engine.new_context() as fl_ctx:
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            workspace = engine.get_workspace()
            # The job that ended no longer needs what it was continued from (its own workspace has it now).
            shutil.rmtree(ResumeFolder.of(workspace.get_root_dir(), job_id).path, ignore_errors=True)
            if reason is None:
                return
            job = job_manager.get_job(job_id, fl_ctx)
            continued = None
            try:
                # Not when it finished its last round before the abort reached it: nothing is left to do.
                if job is not None and job.meta.get(JobMetaKey.STATUS.value) != RunStatus.FINISHED_COMPLETED.value:
                    scratch = Path(workspace.get_root_dir()) / RESUME_ROOT
                    scratch.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(prefix=".download-", dir=scratch) as tmp:
                        # NVFlare archived the run dir into the job store when the job ended: read it there.
                        job_manager.get_storage_for_download(job_id, tmp, "workspace", "workspace", fl_ctx)
                        archive = Path(tmp) / job_id / "workspace"
                        continued = self._submit_continuation(
                            engine, job, reason, archive=archive if archive.exists() else None
                        )
            finally:
                if continued is None:  # whoever follows the job must not wait for a continuation
                    job_manager.update_meta(job_id, {CONTINUED_AS_META: ""}, fl_ctx)

    # ---- the continuation ----------------------------------------------------------------------------
    def _submit_continuation(
        self, engine, job: Job, reason: str, *, run_dir: Path | None = None, archive: Path | None = None
    ) -> str | None:
        with engine.new_context() as fl_ctx:
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            root = engine.get_workspace().get_root_dir()
            previous = job.meta.get(CONTINUATION_META) or {}
            new_id = new_job_id()
            folder = ResumeFolder.of(root, new_id)
            info = {
                "from_job": job.job_id,
                "origin_job": previous.get("origin_job", job.job_id),
                "reason": reason,
                "attempt": int(previous.get("attempt", 0)) + 1,
            }
            write_resume_folder(folder, run_dir=run_dir, archive=archive)
            progress = folder_progress(folder)
            # Runs in a row (ending with this one) that completed no round: a site failing every start.
            made_progress = progress != previous.get("from_round") if previous else progress is not None
            stalled = 0 if made_progress else int(previous.get("stalled", 0)) + 1
            if stalled >= MAX_STALLED_CONTINUATIONS:
                shutil.rmtree(folder.path, ignore_errors=True)
                self.logger.error(
                    f"job {job.job_id} ({job.meta.get('name')}) was interrupted {stalled} times in a row without "
                    f"completing a round; not continuing it. Fix the failing site or server, then clone the job "
                    f"(admin console: clone_job {job.job_id})"
                )
                return None
            info |= {"from_round": progress, "stalled": stalled}
            write_info(folder, info)
            meta = {k.value: job.meta[k.value] for k in _KEPT_META if k.value in job.meta}
            meta |= {k: job.meta[k] for k in _KEPT_EXTRA if k in job.meta}
            meta |= {JobMetaKey.JOB_ID.value: new_id, JobMetaKey.CLONED_FROM.value: job.job_id, CONTINUATION_META: info}
            job_manager.clone(from_jid=job.job_id, meta=meta, fl_ctx=fl_ctx)
            job_manager.update_meta(job.job_id, {CONTINUED_AS_META: new_id}, fl_ctx)
            start = "round 0" if progress is None else f"round {progress + 1}"
            self.logger.info(
                f"job {job.job_id} ({job.meta.get('name')}) interrupted ({reason}): continued as job {new_id} "
                f"from {start}"
            )
            return new_id
