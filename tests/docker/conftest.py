"""Docker tests: a real engine, Compose v2 and fedllm's image built on the local test base.

They never skip silently: on a machine without docker they install it (scripts/ci-docker-setup.sh,
as CI does) and fail with the script's output if that does not work. Set FEDLLM_SKIP_DOCKER=1 to
skip them deliberately on a workstation.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.support.compose import HEAVY_LOCK, REPO, TEST_BASE, TEST_IMAGE, run


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEDLLM_SKIP_DOCKER") == "1":
        skip = pytest.mark.skip(reason="FEDLLM_SKIP_DOCKER=1")
        for item in items:
            if "docker" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Docker engine + Compose v2, installed and started by the repository's own script when missing."""
    t0 = time.monotonic()
    run(["bash", str(REPO / "scripts" / "ci-docker-setup.sh")], timeout=900)
    print(f"docker setup: {time.monotonic() - t0:.1f}s")


@pytest.fixture(scope="session")
def fedllm_image(docker_engine) -> str:
    """fedllm's image from docker/Dockerfile on the local test base (the same Dockerfile as production)."""
    t0 = time.monotonic()
    run(["flock", HEAVY_LOCK, "bash", str(REPO / "scripts" / "build-test-base.sh")], timeout=1200)
    t1 = time.monotonic()
    run(
        [
            "flock", HEAVY_LOCK,
            "docker", "build", "-q", "--network", "host",
            "-f", str(REPO / "docker" / "Dockerfile"),
            "--build-arg", f"BASE_IMAGE={TEST_BASE}",
            "-t", TEST_IMAGE, str(REPO),
        ],
        timeout=1200,
    )  # fmt: skip
    print(f"test base: {t1 - t0:.1f}s, image: {time.monotonic() - t1:.1f}s")
    return TEST_IMAGE
