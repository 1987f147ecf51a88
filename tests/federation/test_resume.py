"""A FedAvg job survives the server and its sites dying at any step: continued from its last completed round.

On a real loopback federation (mTLS kits, NVFlare processes), the server is SIGKILLed, with its job
processes, at named steps (fedllm.flare.faults: FEDLLM_FAULT set in its environment when a test starts
it) or at a moment the test picks, and started again from its kit; sites are SIGKILLed mid-round and
started again. Each chain of crashes hits one job; `fedllm job submit`, run as a user runs it, follows
the job through every restart into its continuations and must exit 0 with a result that holds every
round exactly once and the same final and best models as an uninterrupted run of the same deterministic
job (seeded initial model, seeded site rounds). A site that restarts every round fails the job once its
bound is used, with a message naming the site.

One federation serves the module; the chains run in sequence against it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedllm.apps.local_federation import LocalFederation, local_federation
from fedllm.config import load_site_config
from fedllm.flare.faults import FAULT_ENV
from fedllm.flare.resume import (
    CONTINUATION_META,
    CONTINUED_AS_META,
    MAX_SITE_RESTARTS_PROP,
    NOT_CONTINUED_META,
    RESUME_ROOT,
)
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.template import load_template
from fedllm.results.metrics import ROUND_METRICS, load_global_state, read_round_metrics
from fedllm.runtime import native
from fedllm.runtime.admin import AdminError
from fedllm.runtime.native import NativeRuntimeError
from fedllm.training.toy.demo_mlp import write_demo_data
from tests.support.sites import environment, local_config_dict, write_yaml

pytestmark = pytest.mark.federation

ROUNDS = 4
# FedAvg adds the sites' updates in the order they arrive (NVFlare's streaming aggregation), and float
# addition is not associative: two runs of the same job differ in the last bits, which later rounds of SGD
# carry on. Measured: ≤ 1.5e-7 (2026-12, 2 cores); one round more or less moves this model's weights by
# ≥ 0.03 (rounds 3 and 4 of the demo job replayed offline), so a lost or repeated round cannot pass.
ATOL = 1e-5
SERVER_RESTARTED = "the server restarted"


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> LocalFederation:
    root = tmp_path_factory.mktemp("resume")
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="resume")))
    write_demo_data([root / "data" / s for s in cfg.site_names], root / "data" / "val.npz")
    with local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=_quiet) as federation:
        yield federation


def _job(tmp_path: Path, name: str, **props) -> Path:
    job = create_job(resolve_spec(load_template("demo-mlp"), "fedavg", rounds=ROUNDS, name=name), tmp_path / "jobs")
    if props:  # a job's own settings for the server's JobResumer (custom_props in its meta.json)
        meta = json.loads((job / "meta.json").read_text())
        meta["custom_props"] |= props
        (job / "meta.json").write_text(json.dumps(meta, indent=2))
    return job


@pytest.fixture(scope="module")
def reference(fed, tmp_path_factory) -> Path:
    """The same job, never interrupted: its result folder."""
    tmp = tmp_path_factory.mktemp("reference")
    return fed.submit(_job(tmp, "demo-reference"), download=tmp / "results", timeout=600, echo=_quiet).result_dir


_SUBMITTED: list[Submitted] = []


@pytest.fixture(autouse=True)
def _show_what_job_submit_said():
    """On a failure, what `fedllm job submit` printed (its process ended with the test)."""
    _SUBMITTED.clear()
    yield
    for submitted in _SUBMITTED:
        if submitted.process.poll() is None:
            submitted.process.kill()
        print(f"fedllm job submit said:\n{submitted.output()}")


class Submitted:
    """`fedllm job submit JOB --download DIR` in its own process, as a user runs it; its output, line by line."""

    def __init__(self, fed: LocalFederation, job_dir: Path, download: Path):
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        workspace = fed.kits.prod_dir.parents[1]  # <workspace>/<project>/prod_NN; the site config beside it
        command = [sys.executable, "-m", "fedllm.cli.main", "job", "submit", str(job_dir)]
        command += ["-c", str(workspace.parent / "site.yaml"), "-w", str(workspace)]
        command += ["--download", str(download), "--timeout", "900"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "300"}
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _SUBMITTED.append(self)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(f"[{time.monotonic() - self.t0:6.1f}s] {line.rstrip()}")

    def wait(self, timeout: float = 900) -> int:
        rc = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)

    def jobs(self) -> list[str]:
        """The job it submitted, then each continuation it followed, in order."""
        found = []
        for line in list(self.lines):
            if " as job " in line or "continued as job " in line:
                found.append(line.rsplit(" ", 1)[1])
        return found


def _wait_for(what: str, condition, timeout: float = 300, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _round_started(fed: LocalFederation, round_number: int) -> Path:
    """Wait until round `round_number` runs in a server job; its run dir.

    Only the running job has a run dir: NVFlare archives a job's when it ends, the resumer an
    interrupted one's at the server's start.
    """

    def started():
        for log in fed.kits.server().glob("*/log.txt"):
            if f"Round {round_number} started" in log.read_text(errors="replace"):
                return log.parent
        return None

    return _wait_for(f"round {round_number} to start", started, poll=0.2)


def _training(fed: LocalFederation, round_number: int, site: str | None = None) -> str:
    """Wait until `site` (or any site) has received round `round_number`'s task: it trains now. The job's id.

    A demo round trains for well under a second, so the sites' logs are polled at once and often.
    """
    job = _round_started(fed, round_number).name
    sites = [site] if site else fed.config.site_names

    def now_training() -> bool:
        started = len(re.findall(r"Round \d+ started\.", _log(fed.kits.server() / job)))
        return any(_log(fed.kits.site(s) / job).count("got task assignment: name=train") >= started for s in sites)

    _wait_for(f"{site or 'a site'} to train round {round_number}", now_training, timeout=120, poll=0.01)
    return job


def _log(run_dir: Path) -> str:
    path = run_dir / "log.txt"
    return path.read_text(errors="replace") if path.is_file() else ""


def _died(fed: LocalFederation, name: str, timeout: float = 300) -> None:
    _wait_for(f"{name} to die at its fault point", lambda: not native.status(fed.kits).get(name, False), timeout)


def _port_waits(message: str) -> None:
    """`up`'s messages, quiet but for a wait for a killed server's port (shown with -s, and on failure)."""
    if "still held" in message:
        print(message, flush=True)


def _start(fed: LocalFederation, fault: str | None = None, *, dies_soon: bool = False) -> None:
    """`fedllm up` again: start what is not running (the server with FEDLLM_FAULT=`fault`, if given).

    `dies_soon`: the fault fires before every site has registered again, so `up` reports that the server
    exited during start-up (and stops what it started); the test goes on from that crash.
    """
    env = {FAULT_ENV: fault} if fault else {}
    with environment(env):
        try:
            native.up(fed.kits, echo=_port_waits)
        except (NativeRuntimeError, AdminError) as exc:
            # Only the crash the fault makes is expected: anything else (a port still held...) fails the test.
            expected = isinstance(exc, AdminError) or "exited during start-up" in str(exc)
            if not (dies_soon and expected):
                raise


def _start_server_that_dies_at_once(fed: LocalFederation, fault: str) -> None:
    """Start the server alone from its kit (as `fedllm up` does) with a fault it reaches within its first
    seconds, before `up` could even log in to wait for the sites; the sites are still running."""
    with environment({FAULT_ENV: fault}):
        server = native._start(fed.kits, fed.config.server.name, echo=_quiet)
    native._write_state(fed.kits, [server, *(p for p in native.read_state(fed.kits) if p.name != server.name)])


def _restart_server(fed: LocalFederation, fault: str | None = None) -> None:
    """Between chains: the server again, with the fault the next chain starts with (no job runs).

    A chain that failed may have left the server dead: then it is only started, so the next chain runs.
    """
    if native.status(fed.kits).get(fed.config.server.name, False):
        native.kill(fed.kits, fed.config.server.name)
    _start(fed, fault)


def _faults_fired(fed: LocalFederation) -> list[str]:
    """The fault points at which the server was SIGKILLed so far (each says so on its stderr first)."""
    log = fed.log(fed.config.server.name)
    return [
        line.split(": ", 1)[0]
        for line in log.read_text(errors="replace").splitlines()
        if "SIGKILL of the server" in line
    ]


def _meta(fed: LocalFederation, job_id: str) -> dict:
    with fed.admin() as session:
        return session.get_job_meta(job_id)


def _chain(fed: LocalFederation, first: str) -> list[str]:
    """The job and each continuation its meta names, in order."""
    chain = [first]
    with fed.admin() as session:
        while following := session.get_job_meta(chain[-1]).get(CONTINUED_AS_META):
            if following == "pending":
                break
            chain.append(following)
    return chain


def _assert_lineage(fed: LocalFederation, name: str, chain: list[str], reasons: list[str]) -> list[dict]:
    """One job per interruption, no more: every job under the name is in the chain, and each continuation's
    meta says what it continues and why (list_jobs -d and get_job_meta show it). Their `fedllm_resume`."""
    with fed.admin() as session:
        listed = session.list_jobs(detailed=True, name_prefix=name)
    assert sorted(j["job_id"] for j in listed) == sorted(chain), "exactly one continuation per interruption"
    by_id = {j["job_id"]: j for j in listed}
    resumed = [by_id[job][CONTINUATION_META] for job in chain[1:]]
    assert [r["from_job"] for r in resumed] == chain[:-1]
    assert [r["reason"] for r in resumed] == reasons
    assert all(r["origin_job"] == chain[0] for r in resumed), "the lineage, for whoever keys state by it"
    assert all(by_id[job]["status"] in ("FINISHED:ABANDONED", "FINISHED:ABORTED") for job in chain[:-1])
    return resumed


def _assert_same_models(result: Path, reference: Path) -> None:
    for best in (False, True):
        got = load_global_state(result, best=best)
        want = load_global_state(reference, best=best)
        assert got.keys() == want.keys()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f"{'best' if best else 'final'} model: max |difference| from the uninterrupted run {worst:.3g}")
        assert worst <= ATOL, f"{'best' if best else 'final'} model differs from the uninterrupted run's by {worst}"


def _assert_completed(fed: LocalFederation, submitted: Submitted, reference: Path, download: Path) -> list[str]:
    rc = submitted.wait()
    assert rc == 0, f"fedllm job submit exited {rc}:\n{submitted.output()}"
    chain = submitted.jobs()
    assert chain == _chain(fed, chain[0]), "job submit followed every continuation"
    result = download / chain[-1]
    rounds = read_round_metrics(result)
    assert [r["round"] for r in rounds] == list(range(ROUNDS)), "every round exactly once, in order"
    assert all(set(r["sites"]) == set(fed.config.site_names) for r in rounds), "every site counted in every round"
    assert rounds[-1]["aggregated"]["global_val_accuracy"] > 0.8
    _assert_same_models(result, reference)
    # What the lineage's continuations started from goes once the last one has completed.
    lineage = fed.kits.server() / RESUME_ROOT / chain[0]
    _wait_for(f"{lineage} to go", lambda: not lineage.exists(), timeout=30, poll=0.2)
    return chain


def test_server_killed_at_round_start_then_as_the_continuation_deploys_then_before_marking(
    fed, reference, tmp_path: Path
) -> None:
    """Three crashes of one job: as round 2 starts; as its continuation's server job starts, before it has
    taken over the checkpoint (its successor must start from that checkpoint, not from round 0); and after
    the next continuation was submitted but before the one it continues was marked (one continuation, not two)."""
    server, fired = fed.config.server.name, len(_faults_fired(fed))
    _restart_server(fed, "round-start:2")
    submitted = Submitted(fed, _job(tmp_path, "demo-chain-a"), tmp_path / "results")
    _died(fed, server)
    _start(fed, "continuation-deploy", dies_soon=True)
    _died(fed, server)
    _start_server_that_dies_at_once(fed, "journal:cloned")
    _died(fed, server)
    _start(fed)
    chain = _assert_completed(fed, submitted, reference, tmp_path / "results")
    assert _faults_fired(fed)[fired:] == [
        f"{FAULT_ENV}={f}" for f in ("round-start:2", "continuation-deploy", "journal:cloned")
    ]
    # The third crash, between the second continuation's submit and the marking of the job it continues,
    # made no third continuation: the next start finished the journaled step.
    first, second = (r["from_round"] for r in _assert_lineage(fed, "demo-chain-a", chain, [SERVER_RESTARTED] * 2))
    # Killed as round 2 started: round 1's checkpoint was on disk (or, if its background write had not landed
    # yet, round 0's). The continuation killed as it deployed completed no round: its successor starts from
    # the same round, never from round 0.
    assert first in (0, 1) and second == first
    with fed.admin() as session:  # the completed rounds' records are the first job's own, carried over
        own = Path(session.download_job_result(chain[0])) / ROUND_METRICS
    carried = (tmp_path / "results" / chain[-1] / ROUND_METRICS).read_text().splitlines()[: first + 1]
    assert carried == own.read_text().splitlines()[: first + 1]


def test_server_killed_in_aggregation_then_writing_the_checkpoint_then_with_a_site_mid_training(
    fed, reference, tmp_path: Path
) -> None:
    """Three crashes of one job: once the first site's result of round 1 is aggregated; while round 2's
    global checkpoint is written (it must not count); and while the sites train round 3, together with a
    site (as when their machine goes down)."""
    server, fired = fed.config.server.name, len(_faults_fired(fed))
    _restart_server(fed, "aggregation:1")
    submitted = Submitted(fed, _job(tmp_path, "demo-chain-b"), tmp_path / "results")
    _died(fed, server)
    _start(fed, "checkpoint-write:2")
    _died(fed, server)
    _start(fed)
    _training(fed, 3)
    native.kill(fed.kits, server)
    native.kill(fed.kits, "site-3")
    _start(fed)
    chain = _assert_completed(fed, submitted, reference, tmp_path / "results")
    assert _faults_fired(fed)[fired:] == [f"{FAULT_ENV}={f}" for f in ("aggregation:1", "checkpoint-write:2")]
    resumed = _assert_lineage(fed, "demo-chain-b", chain, [SERVER_RESTARTED] * 3)
    aggregating, writing, training = (r["from_round"] for r in resumed)
    assert aggregating == 0, "round 1 was being aggregated: round 0 is the last completed"
    assert writing == 1, "round 2's checkpoint was not yet renamed into place: round 2 did not happen"
    assert training in (1, 2)


def test_site_killed_mid_round_then_again_with_the_server_killed_handling_its_return(
    fed, reference, tmp_path: Path
) -> None:
    """site-2 dies mid-round and comes back: the server aborts the job and continues it. Then again in the
    continuation, and this time the server dies right after it journaled the abort and sent it: at its next
    start it continues the job all the same."""
    server, fired = fed.config.server.name, len(_faults_fired(fed))
    _restart_server(fed, "journal:aborted:2")  # the job's second continuation
    submitted = Submitted(fed, _job(tmp_path, "demo-chain-c"), tmp_path / "results")
    _training(fed, 1, "site-2")
    native.kill(fed.kits, "site-2")
    _start(fed)
    _training(fed, 2, "site-2")
    native.kill(fed.kits, "site-2")
    _start(fed, dies_soon=True)  # site-2 registers again; the server dies handling it
    _died(fed, server)
    _start(fed)
    chain = _assert_completed(fed, submitted, reference, tmp_path / "results")
    assert _faults_fired(fed)[fired:] == [f"{FAULT_ENV}=journal:aborted:2"]
    resumed = _assert_lineage(fed, "demo-chain-c", chain, ["site site-2 restarted"] * 2)
    assert all(r["cause"] == "site restart" and r["site"] == "site-2" for r in resumed)
    assert resumed[0]["from_round"] == 0 and resumed[1]["from_round"] in (0, 1)
    assert _meta(fed, chain[0])["status"] == "FINISHED:ABORTED", "aborted by the live server"


def test_a_site_that_restarts_every_round_fails_the_job_after_its_bound(fed, tmp_path: Path) -> None:
    """site-3 restarts in every round; the job allows one continuation per site and hour (its own setting),
    so the second restart fails it, and `fedllm job submit` says which site and why."""
    submitted = Submitted(fed, _job(tmp_path, "demo-flapping", **{MAX_SITE_RESTARTS_PROP: 1}), tmp_path / "results")
    for round_number in (1, 2):
        _training(fed, round_number, "site-3")
        native.kill(fed.kits, "site-3")
        _start(fed)
    rc = submitted.wait()
    assert rc == 1, submitted.output()
    output = submitted.output()
    assert "not continued: site site-3 restarted 2 times within an hour" in output and "limit 1 per hour" in output
    chain = _chain(fed, submitted.jobs()[0])
    assert len(chain) == 2
    (resumed,) = _assert_lineage(fed, "demo-flapping", chain, ["site site-3 restarted"])
    last = _meta(fed, chain[-1])
    assert last[CONTINUED_AS_META] == "" and last[NOT_CONTINUED_META].startswith("site site-3 restarted 2 times")
    assert resumed["attempt"] == 1
