"""CI proof: the federation as containers — `docker compose up` (CPU overlay), a real demo job
submitted from the admin container, its result downloaded, `docker compose down -v`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedllm.results.metrics import read_round_metrics
from tests.support.compose import HEAVY_LOCK, compose, compose_config_dict, provision_compose, run

# The image build pip-installs NVFlare and fedllm's dependencies from PyPI.
pytestmark = [pytest.mark.docker, pytest.mark.network]

ROUNDS = 2


def _wait_registered(kits, sites: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        logs = compose(kits, "logs", "--no-color", *sites, accelerator="cpu").stdout
        done = [s for s in sites if "Successfully registered client" in _service_log(logs, s)]
        if len(done) == len(sites):
            return
        if time.monotonic() > deadline:
            ps = compose(kits, "ps", "-a", accelerator="cpu", check=False).stdout
            pytest.fail(f"sites not registered after {timeout}s (registered: {done})\n{ps}\n{logs[-6000:]}")
        time.sleep(2)


def _service_log(logs: str, service: str) -> str:
    return "\n".join(
        line for line in logs.splitlines() if line.startswith(f"{service} ") or line.startswith(f"{service}-")
    )


def test_compose_federation_runs_the_demo_job_from_the_admin_container(fedllm_image, tmp_path: Path):
    # Three sites "on GPUs" 0..2; the CPU overlay runs the same services without them.
    kits = provision_compose(tmp_path, compose_config_dict(gpus=[[0], [1], [2]]), with_demo_data=True)
    sites = kits.config.site_names
    t0 = time.monotonic()
    try:
        with open(HEAVY_LOCK, "w") as lock:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # three site containers + one job process each: take turns
            compose(kits, "up", "-d", "--wait", "server", accelerator="cpu", image=fedllm_image, timeout=180)
            compose(kits, "up", "-d", accelerator="cpu", image=fedllm_image, timeout=180)
            _wait_registered(kits, sites)
            t_up = time.monotonic() - t0

            # Every site container mounts its own kit and data, read-only, and nothing of another participant.
            for site in sites:
                cid = compose(kits, "ps", "-q", site, accelerator="cpu").stdout.strip()
                mounts = json.loads(run(["docker", "inspect", "-f", "{{json .Mounts}}", cid]).stdout)
                binds = {m["Destination"]: m for m in mounts if m["Type"] == "bind"}
                assert set(binds) == {"/fedllm/kit", "/fedllm/data"}
                assert Path(binds["/fedllm/kit"]["Source"]).resolve() == (kits.prod_dir / site).resolve()
                assert Path(binds["/fedllm/data"]["Source"]) == kits.config.site(site).data_path(tmp_path)
                assert not binds["/fedllm/kit"]["RW"] and not binds["/fedllm/data"]["RW"]
                user = run(["docker", "exec", cid, "id", "-u"]).stdout.strip()
                assert user != "0", f"{site} runs as root"

            # The admin container, non-interactively: create the job from the image's template, submit, download.
            admin = ["run", "--rm", "-T", "admin"]
            compose(kits, *admin, "job", "create", "demo-mlp", "--mode", "fedavg", "--rounds", str(ROUNDS),
                    "--out", "/fedllm/workspace/jobs", accelerator="cpu", image=fedllm_image)  # fmt: skip
            t_job = time.monotonic()
            submitted = compose(
                kits, *admin, "job", "submit", "/fedllm/workspace/jobs/demo-mlp-fedavg-3sites",
                "--download", "/fedllm/results", "--timeout", "600",
                accelerator="cpu", image=fedllm_image, timeout=700,
            )  # fmt: skip
            t_job = time.monotonic() - t_job
            assert "FINISHED:COMPLETED" in submitted.stdout, submitted.stdout

            # The downloaded result on the host: every round aggregated from all three sites, and the global model.
            results = kits.prod_dir.parent / "results"
            (result_dir,) = [p for p in results.iterdir() if p.is_dir()]
            rounds = read_round_metrics(result_dir)
            assert [r["round"] for r in rounds] == list(range(ROUNDS))
            assert all(set(r["sites"]) == set(sites) for r in rounds)
            assert (result_dir / "workspace" / "app_server" / "FL_global_model.pt").stat().st_size > 0
            print(f"compose up + 3 sites registered: {t_up:.1f}s; job (submit → downloaded): {t_job:.1f}s")
    finally:
        down = compose(kits, "--profile", "admin", "down", "-v", "--timeout", "20", accelerator="cpu", check=False)
    assert down.returncode == 0, down.stderr
    left = compose(kits, "ps", "-a", "-q", accelerator="cpu").stdout.strip()
    assert left == "", "containers survived `docker compose down -v`"
