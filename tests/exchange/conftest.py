"""A real loopback federation shared by the exchange tests of a module."""

from __future__ import annotations

import pytest

from fedllm.apps.local_federation import LocalFederation
from tests.support.exchange import echo_federation


@pytest.fixture(scope="module")
def federation_2(tmp_path_factory) -> LocalFederation:
    with echo_federation(tmp_path_factory.mktemp("xfed"), sites=2) as fed:
        yield fed
