"""The README's native flow, run as written: its own command lines, in a folder laid out like the repository.

The commands are read from the README's code block (section "From a site config to a finished job",
"Run the federation"), so README and test cannot drift apart: each runs as a `fedllm` subprocess with its
relative paths, in a folder that holds `site_configs/local.yaml` as the repository does; what each prints,
and the job's downloaded result, are checked.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.results.metrics import read_round_metrics

pytestmark = pytest.mark.federation

REPO = Path(__file__).resolve().parents[2]
FEDLLM = str(Path(sys.executable).parent / "fedllm")
SECTION = "## From a site config to a finished job"
# What the flow is made of, in order; a README edit that changes it changes this test too.
FLOW = ["provision", "up", "status", "data demo", "job create", "job submit", "down"]


def _code_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block (comments and blank lines dropped), in order."""
    blocks, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if current is None and stripped == "```bash":
                current = []
            elif current is not None:
                blocks.append(current)
                current = None
            continue
        if current is not None and (command := stripped.split("  #", 1)[0].strip()):
            current.append(command)
    return blocks


def readme_flow() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = _code_blocks(section)
    (flow,) = [b for b in blocks if b and b[0] == "fedllm provision -c site_configs/local.yaml"]
    # The section's other blocks that run fedllm (step 4's job lines) repeat lines of the flow, never others.
    for block in blocks:
        if block is not flow and all(line.startswith("fedllm ") for line in block):
            assert set(block) <= set(flow), f"README lines not in the tested flow: {set(block) - set(flow)}"
    return flow


def _subcommand(line: str) -> str:
    words = shlex.split(line)[1:]
    return " ".join(words[:2]) if words[0] in ("job", "data") else words[0]


def test_the_readme_flow_is_what_this_test_runs() -> None:
    flow = readme_flow()
    assert all(line.startswith("fedllm ") for line in flow), flow
    assert [_subcommand(line) for line in flow] == FLOW


def _busy_ports(config: Path) -> list[int]:
    server = load_site_config(config).server
    first, last = map(int, server.job_ports.split("-"))
    busy = []
    for port in [server.fed_learn_port, server.admin_port, *range(first, last + 1)]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def test_the_readme_native_flow_runs_as_written(tmp_path: Path) -> None:
    flow = readme_flow()
    (tmp_path / "site_configs").mkdir()
    shutil.copy(REPO / "site_configs" / "local.yaml", tmp_path / "site_configs" / "local.yaml")
    busy = _busy_ports(tmp_path / "site_configs" / "local.yaml")
    assert not busy, (
        f"site_configs/local.yaml's ports {busy} are in use on this machine, so its federation cannot start: "
        "stop what holds them (another `fedllm up` of local.yaml: `fedllm down` in its folder)"
    )
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    outputs: dict[str, str] = {}
    took: dict[str, float] = {}
    up_ran = False
    try:
        for line in flow:
            step = _subcommand(line)
            up_ran = up_ran or step == "up"
            t0 = time.monotonic()
            proc = subprocess.run(
                [FEDLLM, *shlex.split(line)[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
            )
            took[step] = time.monotonic() - t0
            assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
            outputs[step] = proc.stdout
    finally:
        if up_ran and "down" not in outputs:
            subprocess.run([FEDLLM, "down"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    print("README flow: " + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in took.items()))

    assert "provisioned 3 sites, 1 admin(s) → workspace/fedllm-local/prod_00" in outputs["provision"]
    assert "all 3 sites registered in" in outputs["up"]
    rows = {line.split()[0]: line for line in outputs["status"].splitlines()[1:] if line.startswith("  ")}
    assert "running (pid" in rows["localhost"] and "admin port localhost:18003 reachable" in rows["localhost"]
    for site in ("site-1", "site-2", "site-3"):
        assert "running (pid" in rows[site] and rows[site].endswith(" registered"), outputs["status"]
        assert (tmp_path / "data" / site / "train.npz").is_file()
    # `job create` prints the very `job submit` line the README has next.
    submit_line = next(line for line in flow if line.startswith("fedllm job submit"))
    assert f"  {submit_line}\n" in outputs["job create"], outputs["job create"]
    assert "FINISHED:COMPLETED" in outputs["job submit"]
    (result,) = (tmp_path / "runs" / "results").iterdir()
    rounds = read_round_metrics(result)
    assert [r["round"] for r in rounds] == list(range(5))
    assert all(set(r["sites"]) == {"site-1", "site-2", "site-3"} for r in rounds)
    assert "federation stopped" in outputs["down"]
    assert not any(p.info["cwd"] and p.info["cwd"].startswith(str(tmp_path)) for p in _processes()), (
        "processes of the README's federation outlived `fedllm down`"
    )


def _processes():
    import psutil

    return psutil.process_iter(["cwd"])
