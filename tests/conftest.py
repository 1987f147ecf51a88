"""Fixtures every test folder may use; helpers live in tests/support/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.nemo_tier import pytest_sessionfinish  # noqa: F401  (a hook: -m nemo runs every NeMo test)
from tests.support.sites import local_config_dict, write_yaml


@pytest.fixture
def local_config(tmp_path: Path) -> Path:
    """A valid 3-site, one-machine site config file with free ports."""
    return write_yaml(tmp_path / "site.yaml", local_config_dict())


@pytest.fixture(scope="session")
def nemo_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny Megatron-GPT NeMo builds (legacy and mcore layouts), once per session for every NeMo test."""
    from tests.support.nemo_runs import tiny_gpts

    return tiny_gpts(tmp_path_factory.mktemp("nemo-models"))
