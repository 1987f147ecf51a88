"""Submit a job folder with the admin kit, follow it, download its result, explain failures."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.fuel.flare_api.api_spec import AuthenticationError, AuthorizationError, JobNotFound

from fedllm.errors import FedllmError
from fedllm.flare.resume import CONTINUED_AS_META, NOT_CONTINUED_META, PENDING
from fedllm.provision import Kits
from fedllm.runtime.admin import AdminError, AdminKit, admin_session

COMPLETED = "FINISHED:COMPLETED"
# The last line of a Python traceback: "pkg.SomeError: message" (or just the qualified name).
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(?::\s.*)?$")
# An external-process trainer's (torchrun) output, relayed line by line into the site's log by NVFlare.
_RELAYED = re.compile(r"^\S+ \S+ - ExternalProcessBackend - \w+ - (.*)$")


class JobFailed(FedllmError):
    """The job ended in a state other than FINISHED:COMPLETED; str() names the failing sites."""

    def __init__(self, job_id: str, status: str, site_errors: dict[str, str], result_dir: Path | None):
        self.job_id, self.status, self.site_errors, self.result_dir = job_id, status, site_errors, result_dir
        lines = [f"job {job_id} ended {status}"]
        lines += [f"  {site}: {err}" for site, err in site_errors.items()]
        if result_dir:
            lines.append(f"  logs and partial results: {result_dir}")
        super().__init__("\n".join(lines))


@dataclass
class JobResult:
    job_id: str
    status: str
    duration_s: float
    result_dir: Path | None = None
    site_errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def first_error(log_text: str) -> str | None:
    """The most telling error in a log: the first exception of a traceback (the root cause), else the last ERROR line."""
    in_traceback = relayed_traceback = False
    for raw in log_text.splitlines():
        relayed = _RELAYED.match(raw)
        line = relayed.group(1) if relayed else raw
        if "Traceback (most recent call last):" in line:
            in_traceback, relayed_traceback = True, bool(relayed)
        elif in_traceback and relayed_traceback and not relayed:
            continue  # the site's own log lines interleave with the trainer's relayed traceback
        elif in_traceback and line and not line[0].isspace():
            if _EXC_LINE.match(line):
                return line.strip()
            in_traceback = False
    errors = [ln.strip() for ln in log_text.splitlines() if " - ERROR - " in ln]
    return errors[-1] if errors else None


def _site_logs(session, job_id: str, sites: list[str]) -> dict[str, str]:
    """Each site's log of this job, read through admin commands (works for native, compose and remote sites)."""
    logs: dict[str, str] = {}
    for site in sites:
        with contextlib.suppress(Exception):  # a site that is gone has no log to give
            text = session.cat_target(site, file=f"{job_id}/log.txt")
            if isinstance(text, str) and text.strip():
                logs[site] = text
    if len(logs) < len(sites):  # fall back to logs the sites streamed to the server
        with contextlib.suppress(Exception):
            payload = session.get_job_logs(job_id, target="all")
            for site, text in (payload.get("logs") or {}).items():
                if isinstance(text, str) and site not in logs:
                    logs[site] = text
    return logs


def follow_job(
    kits: Kits | AdminKit, job_id: str, *, timeout: float, echo=print, t0: float | None = None, poll_s: float = 1.0
) -> tuple[str, dict]:
    """Follow a job until it finishes, through server restarts and into the jobs that continue it.

    A job a server or site restart interrupted is carried on by a continuation job (fedllm.flare.resume);
    its meta names it. While the server is down, this keeps reconnecting. Returns the id and meta of the
    job that ended the chain, or of the one still running when `timeout` ran out.
    """
    t0 = time.monotonic() if t0 is None else t0
    deadline = time.monotonic() + timeout
    shown = None
    while True:
        try:
            with admin_session(kits) as session:
                if shown == "lost":
                    echo(f"  {time.monotonic() - t0:6.1f}s  server is back")
                while True:
                    meta = session.get_job_meta(job_id)
                    status = meta.get("status", "UNKNOWN")
                    if status != shown:
                        echo(f"  {time.monotonic() - t0:6.1f}s  {status}")
                        shown = status
                    following = meta.get(CONTINUED_AS_META)
                    if status.startswith("FINISHED") and following != PENDING:
                        if not following:
                            return job_id, meta
                        echo(f"  {time.monotonic() - t0:6.1f}s  continued as job {following}")
                        job_id, shown = following, None
                        continue
                    if time.monotonic() > deadline:
                        return job_id, meta
                    time.sleep(poll_s)
        except (JobNotFound, AuthenticationError, AuthorizationError):
            raise
        except Exception as exc:  # the server went away (FLARE raises several types for it); it may come back
            if time.monotonic() > deadline:
                raise AdminError(
                    f"lost the server while following job {job_id} and it did not come back: {exc}"
                ) from exc
            if shown != "lost":
                echo(f"  {time.monotonic() - t0:6.1f}s  lost the server ({exc}); waiting for it to come back")
                shown = "lost"
            time.sleep(2.0)


def submit_job(
    kits: Kits | AdminKit,
    job_dir: Path,
    *,
    wait: bool = True,
    download: Path | None = None,
    timeout: float = 3600.0,
    echo=print,
) -> JobResult:
    """Submit `job_dir`; with `wait`, follow it to the end, download into `download`, raise JobFailed on failure."""
    job_dir = job_dir.resolve()
    if not (job_dir / "meta.json").is_file():
        raise AdminError(f"{job_dir} is not an NVFlare job folder (no meta.json); create one with `fedllm job create`")
    t0 = time.monotonic()
    with admin_session(kits) as session:
        job_id = session.submit_job(str(job_dir))
    echo(f"submitted {job_dir.name} as job {job_id}")
    if not wait:
        return JobResult(job_id, "SUBMITTED", 0.0)
    job_id, meta = follow_job(kits, job_id, timeout=timeout, echo=echo, t0=t0)
    status = meta.get("status", "UNKNOWN")
    with admin_session(kits) as session:
        if not status.startswith("FINISHED"):
            session.abort_job(job_id)
            raise JobFailed(job_id, f"TIMED OUT after {timeout:.0f}s (was {status}; aborted)", {}, None)

        logs = _site_logs(session, job_id, [c.name for c in session.get_connected_client_list()])
        result_dir = None
        if download is not None:
            fetched = Path(session.download_job_result(job_id))
            result_dir = download.resolve() / job_id
            if result_dir.exists():
                shutil.rmtree(result_dir)
            result_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(fetched), result_dir)
            for site, text in logs.items():
                (result_dir / "site_logs").mkdir(exist_ok=True)
                (result_dir / "site_logs" / f"{site}.log").write_text(text)
        duration = time.monotonic() - t0

    result = JobResult(job_id, status, duration, result_dir)
    if not result.ok:
        found = {site: err for site, text in logs.items() if (err := first_error(text))}
        # Sites that only report being aborted are the consequence; the cause goes first.
        errors = dict(sorted(found.items(), key=lambda item: "abort" in item[1].lower()))
        if result_dir and not errors:
            server_log = result_dir / "workspace" / "log.txt"
            if server_log.is_file() and (err := first_error(server_log.read_text(errors="replace"))):
                errors["server"] = err
        deploy = [d for d in meta.get("job_deploy_detail", []) if not d.endswith(": OK")]
        for detail in deploy:
            site, _, why = detail.partition(": ")
            errors.setdefault(site, why)
        if meta.get(NOT_CONTINUED_META):  # interrupted, and why it was not continued (e.g. a flapping site)
            errors = {"not continued": str(meta[NOT_CONTINUED_META]), **errors}
        raise JobFailed(job_id, status, errors, result_dir)
    return result
