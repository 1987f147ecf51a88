"""CI's NeMo tier (`pytest -m nemo`) fails when it runs no test or skips one (tests/support/nemo_tier.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPED_MODULE = """
import pytest
pytest.importorskip("a_module_that_is_not_installed", reason="NeMo is not installed")
pytestmark = pytest.mark.nemo

def test_trains():
    pass
"""
RUNNING_MODULE = """
import pytest
pytestmark = pytest.mark.nemo

def test_trains():
    pass

def test_on_a_gpu():
    pytest.skip("needs a GPU")
"""


def _tier(folder: Path, *marker: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.support.nemo_tier", "-p", "no:cacheprovider",
         *marker, "--rootdir", str(folder), "-c", os.devnull, str(folder)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "said", "main_tier"),
    [
        (SKIPPED_MODULE, "skipped: test_tier.py: NeMo is not installed", pytest.ExitCode.NO_TESTS_COLLECTED),
        (RUNNING_MODULE, "skipped: test_tier.py::test_on_a_gpu: needs a GPU", pytest.ExitCode.OK),
    ],
)
def test_the_nemo_tier_fails_when_a_test_skips_or_none_runs(
    tmp_path: Path, module: str, said: str, main_tier: pytest.ExitCode
) -> None:
    (tmp_path / "test_tier.py").write_text(module)
    done = _tier(tmp_path, "-m", "nemo")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert said in done.stdout
    if module is SKIPPED_MODULE:
        assert "no test passed under -m nemo" in done.stdout
    # Without -m nemo (the main tier) pytest decides as it always did.
    assert _tier(tmp_path).returncode == main_tier


def test_the_nemo_tier_passes_when_every_test_runs(tmp_path: Path) -> None:
    (tmp_path / "test_tier.py").write_text(RUNNING_MODULE.replace('pytest.skip("needs a GPU")', "pass"))
    done = _tier(tmp_path, "-m", "nemo")
    assert done.returncode == pytest.ExitCode.OK, done.stdout
