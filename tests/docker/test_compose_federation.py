"""CI proof: the operator's container workflow, as the README writes it, on one stack (CPU overlay).

From the repository root's compose.yaml: a site whose data dir is missing refuses to start; `fedllm data
demo` writes the data; `docker compose up -d --wait` returns once every site is registered; NVFlare's admin
console, driven in a pseudo-terminal, logs in without a prompt, submits a job created on the host, follows it
with `list_jobs` and downloads it into the host's runs/results; `job submit` from the admin container lands
there too, following its job through `docker compose kill server && docker compose up -d server` mid-round
into the job that continues it; a GPU edit + re-provision + `up -d` recreates exactly that site, on its new
kit; no named volume holds a private key; `docker compose down -v` leaves no container, volume or network.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import time
from pathlib import Path

import pexpect
import pytest

from fedllm.cli.main import main
from fedllm.results.metrics import read_round_metrics
from tests.support.compose import (
    HEAVY_LOCK,
    REPO,
    compose_config_dict,
    private_keys_in_volumes,
    project_resources,
    provision_compose,
    root_compose,
    root_compose_env,
    run,
)

# The image build pip-installs NVFlare and fedllm's dependencies from PyPI.
pytestmark = [pytest.mark.docker, pytest.mark.network]

ROUNDS = 2
RESUME_ROUNDS = 3  # the server is killed in round 1: one round completed before, one after
JOB = "demo-mlp-fedavg-3sites"
PROMPT = r"\n> "


def _container_ids(kits, services: list[str]) -> dict[str, str]:
    return {s: root_compose(kits, "ps", "-q", s).stdout.strip() for s in services}


def _check_result(result_dir: Path, sites: list[str], rounds: int = ROUNDS) -> None:
    """A downloaded job on the host: every round aggregated from all sites, once, and the global model."""
    records = read_round_metrics(result_dir)
    assert [r["round"] for r in records] == list(range(rounds))
    assert all(set(r["sites"]) == set(sites) for r in records)
    assert (result_dir / "workspace" / "app_server" / "FL_global_model.pt").stat().st_size > 0


def _console_session(kits, image: str, transcript: Path) -> str:
    """`docker compose run --rm admin` in a pseudo-terminal: the console as an operator types into it."""
    console = pexpect.spawn(
        "docker",
        ["compose", "-f", str(REPO / "compose.yaml"), "run", "--rm", "admin"],
        cwd=str(REPO),
        env=root_compose_env(kits, image),
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 220),
    )
    with open(transcript, "w") as log:
        console.logfile_read = log
        try:
            # Logged in as the kit's admin: no "User Name:" prompt before NVFlare's own.
            assert console.expect([r"User Name:", PROMPT]) == 1, "the console asked for a user name"
            assert "admin console as admin@nvidia.com" in console.before

            console.sendline("check_status server")
            console.expect(PROMPT)
            # `up --wait` has returned, so every site is healthy: each must be registered already.
            assert "Registered clients: 3" in console.before, console.before

            console.sendline(f"submit_job {JOB}")  # the name `fedllm job create` printed on the host
            console.expect(r"Submitted job: ([0-9a-f-]{36})")
            job_id = console.match.group(1)
            console.expect(PROMPT)

            deadline = time.monotonic() + 600
            while True:
                console.sendline("list_jobs")
                console.expect(PROMPT)
                status = re.search(rf"{job_id}\s*\|[^|]*\|\s*(\S+)", console.before)
                if status and status.group(1).startswith("FINISHED"):
                    assert status.group(1) == "FINISHED:COMPLETED", console.before
                    break
                assert time.monotonic() < deadline, f"job {job_id} not finished after 600 s"
                time.sleep(2)

            console.sendline(f"download_job {job_id}")
            console.expect(PROMPT, timeout=180)
            assert f"content downloaded to /fedllm/results/{job_id}" in console.before, console.before
            console.sendline("bye")
            console.expect(pexpect.EOF)
        finally:
            console.close(force=True)
    assert console.exitstatus == 0, transcript.read_text()[-4000:]
    return job_id


def test_operator_workflow_from_the_repository_root(fedllm_image, tmp_path: Path, monkeypatch, capsys):
    # Three sites "on GPUs" 0..2; the CPU overlay runs the same services without them.
    data = compose_config_dict(gpus=[[0], [1], [2]])
    kits = provision_compose(tmp_path, data)
    sites = kits.config.site_names
    project_name = f"fedllm-{kits.config.project}"
    results = tmp_path / "runs" / "results"
    monkeypatch.chdir(tmp_path)  # the operator's folder: site.yaml, data/, runs/ and workspace/ live here
    t0 = time.monotonic()
    try:
        with open(HEAVY_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # three site containers + one job process each: take turns

            # No data yet: the site refuses to start and names the folder; Docker does not create it.
            refused = root_compose(kits, "up", "-d", "--no-deps", "site-1", image=fedllm_image, check=False)
            assert refused.returncode != 0
            assert f"bind source path does not exist: {tmp_path / 'data' / 'site-1'}" in refused.stderr
            assert not (tmp_path / "data").exists()

            assert main(["data", "demo", "-c", "site.yaml"]) == 0
            root_compose(kits, "up", "-d", "--wait", "--wait-timeout", "240", image=fedllm_image, timeout=300)
            t_up = time.monotonic() - t0

            # Every site container mounts its own kit and data, read-only, and nothing of another participant.
            for site in sites:
                cid = root_compose(kits, "ps", "-q", site).stdout.strip()
                mounts = json.loads(run(["docker", "inspect", "-f", "{{json .Mounts}}", cid]).stdout)
                binds = {m["Destination"]: m for m in mounts if m["Type"] == "bind"}
                assert set(binds) == {"/fedllm/kit", "/fedllm/data"}
                assert Path(binds["/fedllm/kit"]["Source"]).resolve() == (kits.prod_dir / site).resolve()
                assert Path(binds["/fedllm/data"]["Source"]) == kits.config.site(site).data_path(tmp_path)
                assert not binds["/fedllm/kit"]["RW"] and not binds["/fedllm/data"]["RW"]
                user = run(["docker", "exec", cid, "id", "-u"]).stdout.strip()
                assert user != "0", f"{site} runs as root"

            # A job created on the host, in the folder the console reads; create prints what to type.
            job_args = ["job", "create", "demo-mlp", "--rounds", str(ROUNDS), "-c", "site.yaml", "-w", "workspace"]
            capsys.readouterr()
            assert main([*job_args, "--out", "runs/jobs"]) == 0
            assert f"submit_job {JOB}" in capsys.readouterr().out
            t_job = time.monotonic()
            job_id = _console_session(kits, fedllm_image, tmp_path / "console.txt")
            t_job = time.monotonic() - t_job
            _check_result(results / job_id, sites)  # download_job landed on the host

            # A wrong admin name: one clear line, no traceback, non-zero exit.
            wrong = root_compose(kits, "run", "--rm", "-T", "-e", "FEDLLM_ADMIN_USER=lead@other.org", "admin",
                                 image=fedllm_image, check=False)  # fmt: skip
            assert wrong.returncode == 1
            assert "FEDLLM_ADMIN_USER is 'lead@other.org' but the admin kit" in wrong.stdout + wrong.stderr
            assert "Traceback" not in wrong.stdout + wrong.stderr

            # Non-interactively, the admin container's `job submit --download` lands in the same host folder,
            # also when the server is SIGKILLed mid-round and started again: the job goes on from its last
            # completed round as a continuation job, which `job submit` follows and downloads.
            admin = ["run", "--rm", "-T", "admin"]
            created = root_compose(kits, *admin, "job", "create", "demo-mlp", "--rounds", str(RESUME_ROUNDS),
                                   "--name", "from-admin", "--out", "/fedllm/jobs", image=fedllm_image)  # fmt: skip
            assert "submit_job from-admin" in created.stdout
            assert f"on the host: {tmp_path / 'runs' / 'jobs'}/from-admin" in created.stdout
            t_resume = time.monotonic()
            submitted = subprocess.Popen(
                ["docker", "compose", "-f", str(REPO / "compose.yaml"), *admin, "job", "submit",
                 "/fedllm/jobs/from-admin", "--download", "/fedllm/results", "--timeout", "600"],
                cwd=REPO, env=root_compose_env(kits, fedllm_image), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            try:
                in_round_1 = ["exec", "-T", "server", "sh", "-c",
                              "grep -ls 'Round 1 started' /fedllm/workspace/*/log.txt"]  # fmt: skip
                deadline = time.monotonic() + 300
                while root_compose(kits, *in_round_1, check=False).returncode != 0:
                    assert submitted.poll() is None, submitted.communicate()[0]
                    assert time.monotonic() < deadline, "the job never reached round 1"
                    time.sleep(0.5)
                root_compose(kits, "kill", "server")  # as a crash or an OOM kill: no warning, no shutdown
                root_compose(kits, "up", "-d", "server", image=fedllm_image)
                output, _ = submitted.communicate(timeout=700)
            finally:
                if submitted.poll() is None:
                    submitted.kill()
            t_resume = time.monotonic() - t_resume
            assert submitted.returncode == 0, output
            assert "continued as job" in output and "FINISHED:COMPLETED" in output, output
            (second,) = [p for p in results.iterdir() if p.name != job_id]
            _check_result(second, sites, rounds=RESUME_ROUNDS)  # every round once, all sites in each

            # Move site-2 to another GPU: re-provision, `up -d`, and exactly site-2 is recreated, on its new kit.
            before = _container_ids(kits, ["server", *sites])
            data["sites"][1]["gpus"] = [5]
            kits = provision_compose(tmp_path, data)
            root_compose(kits, "up", "-d", "--wait", "--wait-timeout", "240", image=fedllm_image, timeout=300)
            after = _container_ids(kits, ["server", *sites])
            assert {s for s in before if before[s] != after[s]} == {"site-2"}
            kit_facts = json.loads(
                run(["docker", "exec", after["site-2"], "cat", "/fedllm/kit/local/fedllm_site.json"]).stdout
            )
            assert kit_facts["gpus"] == [5]
            # The kits' keys stayed in the kits: the workspaces' named volumes (kept by `down` without -v)
            # hold links to the read-only kit, never a copy of a key.
            keys = private_keys_in_volumes(project_name, fedllm_image)
            assert len(keys) == 1 + len(sites), keys  # the server's and each site's workspace
            assert keys == {volume: [] for volume in keys}, f"private keys in named volumes: {keys}"
            linked = run(["docker", "exec", after["site-1"], "readlink", "/fedllm/workspace/startup/client.key"])
            assert linked.stdout.strip() == "/fedllm/kit/startup/client.key"
            print(
                f"up --wait (3 sites registered): {t_up:.1f}s; console job (submit → downloaded): {t_job:.1f}s; "
                f"job through a server kill + up (submit → downloaded): {t_resume:.1f}s"
            )
    finally:
        down = root_compose(kits, "down", "-v", "--timeout", "20", check=False)  # as the README writes it
    assert down.returncode == 0, down.stderr
    assert project_resources(project_name) == {"containers": [], "volumes": [], "networks": []}
