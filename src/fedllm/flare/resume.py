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
  `JobResumeBuilder` puts it there), notices the interruption and continues the job: at server start,
  every job still RUNNING/DISPATCHED in the store was interrupted (nothing can run yet); when a site
  registers while a running job counts it as a participant, that site lost its job process, so the job
  is aborted and continued with every site.
- The continuation's persistor loads the checkpoint from its `ResumeFolder` and its controller starts
  at the next round, with the metrics of the completed rounds carried over: every round exactly once.

A job and its continuations are one *lineage*, named by the first job's id (`origin_job`), with one
folder `<server workspace>/fedllm-resume/<origin job>/`: `journal.json` and, per job that continues it,
the folder that job starts from. Continuing job J as job N is a sequence of steps, each journaled
(written atomically and fsynced) before it acts and idempotent when replayed, so a server that dies at
any point finishes the same continuation at its next start, never a second one:

  intent     N's id is chosen; J is marked `fedllm_continued_as: pending` and, if it still runs
             (a site restarted), aborted; the steps below wait until it has ended
  collected  N's folder holds the lineage's newest completed rounds: the better of J's own (its run
             dir, or the workspace NVFlare archived) and what J started from (J's folder), never a
             run that completed fewer rounds; every file is listed with its size and sha256
  cloning    N is being created in the job store (replayed: N is used if it exists, else a fresh id)
  cloned     N exists; J is marked (`fedllm_continued_as: N`, FINISHED:ABANDONED if it was left
             RUNNING) and its run dir archived into the store
  marked     N's folder is checked against the journal by content (sizes, sha256, round read back);
             only then is J's folder deleted and N becomes the lineage's head

What a site was training in the interrupted round is redone by every site in the continuation, never
counted twice: the interrupted server job's partial aggregate died with it, or was discarded by the abort.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
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
from nvflare.apis.storage import WORKSPACE

from fedllm.fileio import atomic_directory, atomic_path, fsync_path, write_text
from fedllm.flare.faults import crash_point

# The job meta fedllm's FedAvg recipe sets (under custom_props) on jobs this module may continue.
RESUMABLE_PROP = "fedllm_resumable"
# Job-level override (custom_props) of how often a site restart may continue the job per hour.
MAX_SITE_RESTARTS_PROP = "fedllm_max_site_restarts_per_hour"
DEFAULT_MAX_SITE_RESTARTS_PER_HOUR = 3
RESTART_WINDOW_S = 3600.0
# Meta of a continuation: {"origin_job", "from_job", "reason", "cause", "site", "attempt", "from_round", ...}.
CONTINUATION_META = "fedllm_resume"
# Meta set on the interrupted job: the id of the job that continues it; PENDING while that job is prepared
# (the interrupted job may show FINISHED meanwhile), "" when it will not be continued after all.
CONTINUED_AS_META = "fedllm_continued_as"
PENDING = "pending"
# Meta set on an interrupted job that is not continued: why, naming the site, and what to do.
NOT_CONTINUED_META = "fedllm_not_continued"
# Key of RoundProgress inside a global checkpoint (beside PTFileModelPersistor's "model", "meta_props").
PROGRESS_KEY = "fedllm_progress"

RESUME_ROOT = "fedllm-resume"  # under the server's workspace root, beside the job run dirs
JOURNAL_FILE = "journal.json"
INFO_FILE = "resume.json"
APP_DIR = "app_server"  # the server app's folder in a run dir (deploy_map {"app": ["@ALL"]})
METRICS_FILE = Path("metrics") / "round_metrics.jsonl"  # NVFlare's MetricsArtifactWriter, run-dir relative
# A chain of continuations that completes no round stops after this many (e.g. a server that dies every start).
MAX_STALLED_CONTINUATIONS = 3

SERVER_RESTART = "server restart"
SITE_RESTART = "site restart"

# Journal phases, in order (module doc).
INTENT, ABORTED, COLLECTED, CLONING, CLONED, MARKED = "intent", "aborted", "collected", "cloning", "cloned", "marked"


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s bytes at `target` atomically: a hard link when the filesystem allows, else a verified copy.

    A link costs nothing for a multi-GB checkpoint and is safe because fedllm never writes a checkpoint
    in place (every new one is a new file renamed over the name): the link holds the source's bytes.
    """
    with atomic_path(target) as temp:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
            fsync_path(temp)
            if sha256_of(temp) != sha256_of(source):
                raise OSError(f"copying {source} to {target} changed its content") from None


def _rank(round_number: int | None) -> int:
    """Order of progress: a run that completed no round (None) is behind one that completed round 0."""
    return -1 if round_number is None else round_number


def _wanted(relative: str) -> bool:
    """The parts of a run dir a continuation needs: the server app's checkpoints and the round metrics.

    Never a temp file (dot-named): a checkpoint being written when the server died is not one.
    """
    parts = Path(relative).parts
    if len(parts) == 2 and parts[0] == APP_DIR:
        return parts[1].endswith(".pt") and not parts[1].startswith(".")
    return Path(relative) == METRICS_FILE


@dataclass(frozen=True)
class ResumeFolder:
    """What one continuation job starts from: `<server workspace>/fedllm-resume/<origin job>/<job id>/`.

    Laid out like a run dir: `resume.json` (which job it continues, why, from which round),
    `app_server/*.pt` (the global and best checkpoints) and `metrics/round_metrics.jsonl`.
    """

    path: Path

    @classmethod
    def of_job(cls, fl_ctx) -> ResumeFolder | None:
        """The folder of the job `fl_ctx` runs, if that job continues another (None otherwise)."""
        try:
            root = fl_ctx.get_engine().get_workspace().get_root_dir()
        except AttributeError:  # no workspace: not a server job process
            return None
        found = sorted((Path(root) / RESUME_ROOT).glob(f"*/{fl_ctx.get_job_id()}/{INFO_FILE}"))
        return cls(found[0].parent) if found else None

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.path / INFO_FILE).read_text())

    def checkpoint(self, name: str) -> Path | None:
        path = self.path / APP_DIR / name
        return path if path.is_file() else None

    def metrics_text(self) -> str:
        path = self.path / METRICS_FILE
        return path.read_text(errors="replace") if path.is_file() else ""


def folder_progress(folder: Path) -> int | None:
    """The last completed round a run dir's (or resume folder's) checkpoints hold (None: it holds none).

    The global checkpoint holds the latest progress; the best model's file an earlier round's, so the
    largest wins whatever the files are called. A checkpoint that does not read back raises.
    """
    checkpoints = sorted(p for p in (folder / APP_DIR).glob("*.pt") if not p.name.startswith("."))
    rounds = [p.round for p in map(read_progress, checkpoints) if p is not None]
    return max(rounds, default=None)


def write_info(folder: Path, info: Mapping[str, Any]) -> None:
    write_text(folder / INFO_FILE, json.dumps(dict(info), indent=2) + "\n", durable=True)


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in a resume folder: what `verify_manifest` checks before its source goes."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def verify_manifest(folder: Path, files: Mapping[str, Mapping[str, Any]], held: int | None) -> str | None:
    """Why `folder` does not hold what the journal says it does (None: it does, by content)."""
    for relative, want in files.items():
        path = folder / relative
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"] or sha256_of(path) != want["sha256"]:
            return f"{path} is not the file that was collected (size or sha256 differs)"
    try:
        got = folder_progress(folder)
    except Exception as exc:
        return f"{folder}: a checkpoint does not read back ({exc})"
    return None if got == held else f"{folder} holds round {got}, not round {held}"


def _fill_from_dir(source: Path, staging: Path) -> None:
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_file() and _wanted(relative):
            link_or_copy(path, staging / relative)  # atomic_path makes the parent folder


def _fill_from_archive(archive: Path, staging: Path) -> None:
    """Extract only the wanted members (zipfile checks each one's CRC as it reads it)."""
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            if member.is_dir() or not _wanted(member.filename):
                continue
            with atomic_path(staging / member.filename) as temp, zipped.open(member) as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())


def _empty(folder: Path) -> None:
    for entry in list(folder.iterdir()):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _fsync_tree(folder: Path) -> None:
    """The folder's renames and links on disk: each directory in it, and the folder itself."""
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def collect(
    target: Path, *, own_run: Path | None, own_archive: Path | None, started_from: Path | None, info: Mapping[str, Any]
) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """Fill `target` (atomically: complete or absent) with the lineage's newest completed rounds.

    Candidates: the interrupted job's own rounds (its archived workspace if NVFlare archived it, which is
    complete even when the run dir is half deleted; else its run dir) and what it started from (its
    resume folder). The one holding the later round wins; on a tie, what it started from (complete by
    construction). A candidate whose checkpoint does not read back is not used. `info` (with
    `from_round` added) is written as resume.json. Returns the round it holds and its manifest.
    """
    with atomic_directory(target, replace=True) as staging:
        own: int | None = None
        usable = False
        if own_archive is not None or own_run is not None:
            try:
                if own_archive is not None:
                    _fill_from_archive(own_archive, staging)
                else:
                    _fill_from_dir(own_run, staging)
                own, usable = folder_progress(staging), True
            except Exception:
                own, usable = None, False
        base = folder_progress(started_from) if started_from is not None else None
        if not usable or (started_from is not None and _rank(base) >= _rank(own)):
            _empty(staging)
            if started_from is not None:
                _fill_from_dir(started_from, staging)
            held = base
        else:
            held = own
        write_info(staging, {**info, "from_round": held})
        files = manifest(staging)
        _fsync_tree(staging)
    fsync_path(target.parent)
    return held, files


def is_resumable(meta: Mapping[str, Any]) -> bool:
    props = meta.get(JobMetaKey.CUSTOM_PROPS.value)
    return isinstance(props, Mapping) and bool(props.get(RESUMABLE_PROP))


def participants(meta: Mapping[str, Any]) -> set[str]:
    """Names of the sites a running job was started on (NVFlare's `job_clients`)."""
    return {c.get("name") for c in meta.get(JobMetaKey.JOB_CLIENTS.value) or [] if isinstance(c, Mapping)}


def origin_of(job: Job) -> str:
    """The lineage a job belongs to: the id of the first job of its chain of continuations."""
    previous = job.meta.get(CONTINUATION_META)
    return previous.get("origin_job", job.job_id) if isinstance(previous, Mapping) else job.job_id


@dataclass(frozen=True)
class Lineage:
    """`<server workspace>/fedllm-resume/<origin job>/`: the journal of one job and its continuations."""

    path: Path

    @classmethod
    def of(cls, workspace_root: str | os.PathLike[str], origin: str) -> Lineage:
        return cls(Path(workspace_root) / RESUME_ROOT / origin)

    @property
    def origin(self) -> str:
        return self.path.name

    def folder(self, job_id: str) -> Path:
        return self.path / job_id

    def read(self) -> dict[str, Any] | None:
        path = self.path / JOURNAL_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, journal: Mapping[str, Any]) -> None:
        """Atomically and durably: once this returns, a crash replays from here."""
        created = not self.path.is_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / JOURNAL_FILE, json.dumps(dict(journal), indent=2) + "\n", durable=True)
        if created:
            fsync_path(self.path.parent)


def _new_journal(origin: str) -> dict[str, Any]:
    return {"origin": origin, "head": origin, "history": [], "step": None, "ended": None}


def _remove(path: Path) -> None:
    """Remove a folder so that a crash half way leaves no half folder under its name (rename, then delete)."""
    if not path.exists():
        return
    retired = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.old")
    os.replace(path, retired)
    fsync_path(path.parent)
    shutil.rmtree(retired, ignore_errors=True)


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
_LEFT_RUNNING = (RunStatus.RUNNING.value, RunStatus.DISPATCHED.value)


class JobResumer(FLComponent):
    """Server parent process: continues resumable FedAvg jobs that a server or site restart interrupted.

    Listed in the server kit's resources.json (`fedllm.provision.builders.JobResumeBuilder`).
    `max_site_restarts_per_hour`: how many times restarts of one site may continue one job (lineage)
    within an hour; the next one fails the job with a message naming the site. A job overrides it with
    `custom_props.fedllm_max_site_restarts_per_hour` in its meta.json.
    """

    def __init__(self, max_site_restarts_per_hour: int = DEFAULT_MAX_SITE_RESTARTS_PER_HOUR) -> None:
        super().__init__()
        if not isinstance(max_site_restarts_per_hour, int) or max_site_restarts_per_hour < 0:
            raise ValueError(f"max_site_restarts_per_hour must be an integer ≥ 0, not {max_site_restarts_per_hour!r}")
        self.max_site_restarts_per_hour = max_site_restarts_per_hour
        # One continuation step at a time: the journal of a lineage has one writer.
        self._lock = threading.RLock()

    def handle_event(self, event_type: str, fl_ctx) -> None:
        if event_type == EventType.SYSTEM_START:
            engine = fl_ctx.get_engine()
            # Taken now, before NVFlare's scheduler can dispatch anything: these died with the last server.
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            interrupted = [
                job.job_id for job in job_manager.get_jobs_by_status(list(map(RunStatus, _LEFT_RUNNING)), fl_ctx)
            ]
            self._in_background(self.recover, engine, interrupted)
        elif event_type == EventType.CLIENT_REGISTER_PROCESSED:
            self._site_registered(fl_ctx)
        elif event_type == EventType.JOB_COMPLETED:
            data = fl_ctx.get_prop(FLContextKey.EVENT_DATA) or {}
            job_id = data.get(JobMetaKey.JOB_ID.value)
            if job_id:
                self._in_background(self.job_ended, fl_ctx.get_engine(), job_id)

    def _in_background(self, work, *args) -> None:
        # Copying a multi-GB checkpoint must hold up neither the server's start nor its event threads.
        def run():
            try:
                work(*args)
            except Exception as exc:  # a failed continuation must not take the server down
                self.logger.exception(f"fedllm job resume failed: {exc}")

        threading.Thread(target=run, name="fedllm-resume", daemon=True).start()

    @staticmethod
    def _root(engine) -> Path:
        return Path(engine.get_workspace().get_root_dir()) / RESUME_ROOT

    def _lineage(self, engine, job: Job) -> Lineage:
        return Lineage(self._root(engine) / origin_of(job))

    # ---- events --------------------------------------------------------------------------------------
    def recover(self, engine, interrupted: list[str]) -> None:
        """At server start: finish every journaled step, then continue the jobs the last server was running."""
        with self._lock, engine.new_context() as fl_ctx:
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            root = self._root(engine)
            for path in sorted(root.iterdir()) if root.is_dir() else []:
                lineage = Lineage(path)
                try:
                    journal = lineage.read() if not path.name.startswith(".") else None
                    if journal and journal.get("step"):
                        self._advance(engine, lineage, fl_ctx)
                except Exception as exc:
                    self.logger.exception(f"could not finish continuing the jobs of lineage {path.name}: {exc}")
            for job_id in interrupted:
                try:
                    job = job_manager.get_job(job_id, fl_ctx)
                    if job is None or job.meta.get(JobMetaKey.STATUS.value) not in _LEFT_RUNNING:
                        continue  # a replayed step above has marked it
                    lineage = self._lineage(engine, job)
                    journal = lineage.read() or _new_journal(lineage.origin)
                    if journal.get("step"):  # its lineage's step did not finish above: the next start retries
                        self.logger.error(
                            f"job {job_id} not continued yet: its lineage {lineage.path} has a step pending"
                        )
                    elif is_resumable(job.meta) and journal["head"] == job_id:
                        self._begin(lineage, journal, job, "the server restarted", SERVER_RESTART, None)
                        self._advance(engine, lineage, fl_ctx)
                    else:  # not resumable, or already continued by a job that superseded it
                        self._abandon(engine, job, fl_ctx)
                except Exception as exc:
                    self.logger.exception(f"could not continue job {job_id}: {exc}")
            self._prune(engine, fl_ctx)

    def _site_registered(self, fl_ctx) -> None:
        """A site that registers while a running job counts it lost that job's process (NVFlare never notices)."""
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default=None) if peer else None
        engine = fl_ctx.get_engine()
        job_runner = engine.get_component(SystemComponents.JOB_RUNNER)
        if not site or job_runner is None:
            return
        for job_id, job in list(job_runner.running_jobs.items()):
            if is_resumable(job.meta) and site in participants(job.meta):
                self._in_background(self.site_restarted, engine, job_id, site)

    def site_restarted(self, engine, job_id: str, site: str) -> None:
        with self._lock, engine.new_context() as fl_ctx:
            job_runner = engine.get_component(SystemComponents.JOB_RUNNER)
            job = job_runner.running_jobs.get(job_id)
            if job is None:
                return  # it ended meanwhile
            lineage = self._lineage(engine, job)
            journal = lineage.read() or _new_journal(lineage.origin)
            if journal.get("step") or journal["head"] != job_id:
                return  # already being continued (another site, or the same one registering twice)
            self.logger.warning(
                f"site {site} registered again while job {job_id} runs on it: its job process is gone; "
                "aborting the job to continue it from its last completed round with every site"
            )
            self._begin(lineage, journal, job, f"site {site} restarted", SITE_RESTART, site)
            self._advance(engine, lineage, fl_ctx)

    def job_ended(self, engine, job_id: str) -> None:
        with self._lock, engine.new_context() as fl_ctx:
            job = engine.get_component(SystemComponents.JOB_MANAGER).get_job(job_id, fl_ctx)
            if job is None:
                return
            lineage = self._lineage(engine, job)
            journal = lineage.read()
            if journal is None:
                return  # never interrupted
            step = journal.get("step")
            if step and step["from_job"] == job_id:
                self._advance(engine, lineage, fl_ctx)  # it was aborted to be continued: go on
            elif not step and journal["head"] == job_id:
                self._lineage_ended(lineage, journal, job)

    # ---- the steps -----------------------------------------------------------------------------------
    def _begin(self, lineage: Lineage, journal: dict, job: Job, reason: str, cause: str, site: str | None) -> None:
        """Journal the intent to continue `job` (step 1); decide now whether a restarting site has used its turns."""
        failure = self._site_restart_limit(journal, job, site) if site else None
        journal["step"] = {
            "phase": INTENT,
            "from_job": job.job_id,
            "new_job": new_job_id(),
            "reason": reason,
            "cause": cause,
            "site": site,
            "at": time.time(),
            "fail": failure,
        }
        lineage.write(journal)
        crash_point(f"journal:{INTENT}", len(journal["history"]) + 1)  # a test hook, inert unless set

    def _site_restart_limit(self, journal: Mapping, job: Job, site: str) -> str | None:
        props = job.meta.get(JobMetaKey.CUSTOM_PROPS.value) or {}
        limit = props.get(MAX_SITE_RESTARTS_PROP, self.max_site_restarts_per_hour)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            self.logger.warning(
                f"job {job.job_id}: custom_props.{MAX_SITE_RESTARTS_PROP} is {limit!r}, not an integer ≥ 0; "
                f"using the server's {self.max_site_restarts_per_hour}"
            )
            limit = self.max_site_restarts_per_hour
        since = time.time() - RESTART_WINDOW_S
        used = sum(1 for h in journal["history"] if h.get("site") == site and h.get("at", 0) >= since)
        if used < limit:
            return None
        return (
            f"site {site} restarted {used + 1} times within an hour while job {journal['origin']} ran (limit "
            f"{limit} per hour: custom_props.{MAX_SITE_RESTARTS_PROP} in the job's meta.json, default "
            f"{self.max_site_restarts_per_hour}), so it is not continued again. Find out why {site} keeps "
            "restarting (its log), then submit the job again"
        )

    def _advance(self, engine, lineage: Lineage, fl_ctx) -> None:
        """Carry the lineage's journaled step on from where it stands, to its end or until the old job has ended."""
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        job_runner = engine.get_component(SystemComponents.JOB_RUNNER)
        while True:
            journal = lineage.read()
            step = journal and journal.get("step")
            if not step:
                return
            old_id, phase = step["from_job"], step["phase"]
            job = job_manager.get_job(old_id, fl_ctx)
            if job is None:  # deleted from the store meanwhile: nothing to continue
                self.logger.warning(f"job {old_id} is gone from the job store; not continuing it")
                journal["step"], journal["ended"] = None, f"job {old_id} was deleted"
                lineage.write(journal)
                return
            if phase in (INTENT, ABORTED):
                job_manager.update_meta(old_id, {CONTINUED_AS_META: PENDING}, fl_ctx)
                if job_runner is not None and old_id in job_runner.running_jobs:
                    if phase == INTENT:
                        job_runner.stop_run(old_id, fl_ctx)
                        self._journal(lineage, journal, ABORTED)
                    return  # its end (JOB_COMPLETED, or the next server start) carries on
                if job.meta.get(JobMetaKey.STATUS.value) == RunStatus.FINISHED_COMPLETED.value:
                    # It finished its last round before the abort reached it: nothing is left to do.
                    job_manager.update_meta(old_id, {CONTINUED_AS_META: ""}, fl_ctx)
                    journal["step"] = None
                    lineage.write(journal)
                    self._lineage_ended(lineage, journal, job)
                    return
                self._collect(engine, lineage, journal, job, fl_ctx)
            elif phase == COLLECTED:
                if step["fail"]:
                    self._journal(lineage, journal, CLONED)  # nothing to clone: the old job is marked failed
                    continue
                self._journal(lineage, journal, CLONING)
                self._clone(lineage, journal, job, job_manager, fl_ctx)
            elif phase == CLONING:
                if job_manager.get_job(step["new_job"], fl_ctx) is not None:
                    self._journal(lineage, journal, CLONED)
                    continue
                moving_from = step.get("folder_from")
                if not (moving_from and lineage.folder(moving_from).is_dir()):
                    # A clone cut short may have left part of an object under that id: go on under a fresh one,
                    # journaled before the folder moves to its name.
                    step["folder_from"], step["new_job"] = step["new_job"], new_job_id()
                    self._journal(lineage, journal, CLONING)
                os.replace(lineage.folder(step["folder_from"]), lineage.folder(step["new_job"]))
                fsync_path(lineage.path)
                self._clone(lineage, journal, job, job_manager, fl_ctx)
            elif phase == CLONED:
                self._mark(engine, job, step, fl_ctx)
                self._journal(lineage, journal, MARKED)
            elif phase == MARKED:
                self._finish(lineage, journal, job)
                return

    def _journal(self, lineage: Lineage, journal: dict, phase: str) -> None:
        journal["step"]["phase"] = phase
        lineage.write(journal)
        crash_point(f"journal:{phase}", len(journal["history"]) + 1)  # a test hook, inert unless set

    def _collect(self, engine, lineage: Lineage, journal: dict, job: Job, fl_ctx) -> None:
        """Step 2: the continuation's folder, with the newest completed rounds; then whether to continue at all."""
        step = journal["step"]
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        workspace = engine.get_workspace()
        previous = job.meta.get(CONTINUATION_META) if isinstance(job.meta.get(CONTINUATION_META), Mapping) else {}
        started_from = lineage.folder(job.job_id)
        info = {
            "origin_job": lineage.origin,
            "from_job": job.job_id,
            "reason": step["reason"],
            "cause": step["cause"],
            "site": step["site"],
            "at": step["at"],
            "attempt": len(journal["history"]) + 1,
        }
        run_dir = Path(workspace.get_run_dir(job.job_id))
        with tempfile.TemporaryDirectory(prefix=".download-", dir=lineage.path) as tmp:
            archive = None
            if WORKSPACE in (job_manager.list_components(job.job_id, fl_ctx) or []):
                # NVFlare archived the run (the job ended): complete even if the run dir is half deleted.
                # The filesystem store hands out a link to its file, so only the members read are copied.
                job_manager.get_storage_for_download(job.job_id, tmp, WORKSPACE, WORKSPACE, fl_ctx)
                archive = Path(tmp) / job.job_id / WORKSPACE
            held, files = collect(
                lineage.folder(step["new_job"]),
                own_run=run_dir if run_dir.is_dir() else None,
                own_archive=archive if archive is not None and archive.exists() else None,
                started_from=started_from if (started_from / INFO_FILE).is_file() else None,
                info=info,
            )
        # Runs in a row (ending with this one) that completed no round: e.g. a server that dies at every start.
        made_progress = _rank(held) > _rank(previous.get("from_round")) if previous else held is not None
        stalled = 0 if made_progress else int(previous.get("stalled", 0)) + 1
        if stalled >= MAX_STALLED_CONTINUATIONS and not step["fail"]:
            step["fail"] = (
                f"job {lineage.origin} was interrupted {stalled} times in a row without completing a round "
                f"(last: {step['reason']}), so it is not continued again. Fix the failing site or server, then "
                "submit the job again"
            )
        step |= {"held": held, "files": files, "stalled": stalled, "info": {**info, "from_round": held}}
        if step["fail"]:
            step["fail"] += f"; its completed rounds' models stay in {lineage.folder(step['new_job'])}"
        self._journal(lineage, journal, COLLECTED)

    def _clone(self, lineage: Lineage, journal: dict, job: Job, job_manager, fl_ctx) -> None:
        """Step 3: the continuation job in NVFlare's store (it runs when the scheduler gets to it)."""
        step = journal["step"]
        meta = {k.value: job.meta[k.value] for k in _KEPT_META if k.value in job.meta}
        meta |= {k: job.meta[k] for k in _KEPT_EXTRA if k in job.meta}
        meta |= {
            JobMetaKey.JOB_ID.value: step["new_job"],
            JobMetaKey.CLONED_FROM.value: job.job_id,
            CONTINUATION_META: {**step["info"], "stalled": step["stalled"]},
        }
        job_manager.clone(from_jid=job.job_id, meta=meta, fl_ctx=fl_ctx)
        self._journal(lineage, journal, CLONED)

    def _mark(self, engine, job: Job, step: Mapping, fl_ctx) -> None:
        """Step 4: the old job names its continuation (or why there is none) before it shows as ended."""
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        if step["fail"]:
            job_manager.update_meta(job.job_id, {CONTINUED_AS_META: "", NOT_CONTINUED_META: step["fail"]}, fl_ctx)
            self.logger.error(f"job {job.job_id} ({job.meta.get('name')}): {step['fail']}")
        else:
            job_manager.update_meta(job.job_id, {CONTINUED_AS_META: step["new_job"]}, fl_ctx)
            start = "round 0" if step["held"] is None else f"round {step['held'] + 1}"
            self.logger.info(
                f"job {job.job_id} ({job.meta.get('name')}) interrupted ({step['reason']}): continued as job "
                f"{step['new_job']} from {start}"
            )
        if job.meta.get(JobMetaKey.STATUS.value) in _LEFT_RUNNING:
            # NVFlare 2.9 would leave it RUNNING for good; ABANDONED is its own word for this.
            self._abandon(engine, job, fl_ctx)

    def _finish(self, lineage: Lineage, journal: dict, job: Job) -> None:
        """Step 5: once the new folder holds the completed rounds (checked by content), the old one goes."""
        step = journal["step"]
        kept = lineage.folder(step["new_job"])
        problem = verify_manifest(kept, step["files"], step["held"])
        if problem is not None:
            raise RuntimeError(f"not deleting what job {job.job_id} started from: {problem}")
        _remove(lineage.folder(job.job_id))
        if step["fail"]:
            journal["ended"] = step["fail"]
        else:
            journal["head"] = step["new_job"]
            journal["history"].append(
                {k: step[k] for k in ("new_job", "from_job", "reason", "cause", "site", "at", "held")}
            )
        journal["step"] = None
        lineage.write(journal)

    def _lineage_ended(self, lineage: Lineage, journal: dict, job: Job) -> None:
        """The head job ended for good. Completed: its own result holds the models, the lineage's folder goes.
        Otherwise (aborted by an admin, failed) the folder stays with the completed rounds' models until the
        job is deleted from the store (pruned at the next server start)."""
        status = job.meta.get(JobMetaKey.STATUS.value)
        if status == RunStatus.FINISHED_COMPLETED.value:
            _remove(lineage.path)
        elif not journal.get("ended"):
            journal["ended"] = f"job {job.job_id} ended {status}"
            lineage.write(journal)
            self.logger.info(
                f"job {job.job_id} ended {status}: the models of its completed rounds stay in {lineage.path} "
                "until the job is deleted"
            )

    def _abandon(self, engine, job: Job, fl_ctx) -> None:
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        job_manager.set_status(job.job_id, RunStatus.ABANDONED, fl_ctx)
        self.logger.info(f"job {job.job_id} was interrupted by the server's restart: now {RunStatus.ABANDONED}")
        self._archive_run(engine, job.job_id, fl_ctx)

    @staticmethod
    def _archive_run(engine, job_id: str, fl_ctx) -> None:
        """What NVFlare does when a job ends: its workspace into the job store (for download_job), then off disk.

        Never over an archive already there: a replay after a crash half way through the deletion would
        archive what is left.
        """
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        workspace = engine.get_workspace()
        dirs: list[str] = []
        for path in (
            workspace.get_run_dir(job_id),
            workspace.get_result_root(job_id),
            workspace.get_log_root(job_id),
            workspace.get_audit_root(job_id),
        ):
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
        if not dirs:
            return
        if WORKSPACE not in (job_manager.list_components(job_id, fl_ctx) or []):
            job_manager.save_workspace(job_id, dirs, fl_ctx)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)

    def _prune(self, engine, fl_ctx) -> None:
        """Drop lineage folders no job will read: of completed or deleted jobs, and what a crash left half made."""
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        root = self._root(engine)
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
                continue
            for leftover in path.glob(".*") if path.is_dir() else []:  # staging folders of a step cut short
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
            try:
                journal = Lineage(path).read()
            except ValueError:
                continue  # never written half (atomic): not ours to judge
            if journal is None:
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                continue
            if journal.get("step"):
                continue
            head = job_manager.get_job(journal["head"], fl_ctx)
            if head is None or head.meta.get(JobMetaKey.STATUS.value) == RunStatus.FINISHED_COMPLETED.value:
                _remove(path)
