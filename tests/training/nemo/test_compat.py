"""The NeMo version guard: which nemo_toolkit the backend accepts, and what it says otherwise."""

from __future__ import annotations

import pytest

from fedllm.training.nemo.compat import require_nemo_nlp
from fedllm.training.nemo.errors import NemoUnavailableError


def test_nemo_version_guard_messages():
    with pytest.raises(NemoUnavailableError, match="cannot read the NeMo version"):
        require_nemo_nlp("", nlp_present=True)
    with pytest.raises(NemoUnavailableError, match=r"2\.5\.3 is installed.*>=1\.23,<2\.5"):
        require_nemo_nlp("2.5.3", nlp_present=False)
    with pytest.raises(NemoUnavailableError, match=r"1\.22\.0"):
        require_nemo_nlp("1.22.0", nlp_present=True)
    with pytest.raises(NemoUnavailableError, match=r"without nemo\.collections\.nlp"):
        require_nemo_nlp("2.4.0", nlp_present=False)
    assert require_nemo_nlp("2.0.0rc1", nlp_present=True) == "2.0.0rc1"


def test_nemo_absent_in_this_environment_is_reported():
    try:
        import nemo  # noqa: F401
    except ImportError:
        with pytest.raises(NemoUnavailableError, match="not installed"):
            require_nemo_nlp()
    else:
        pytest.skip("NeMo is installed in this environment; the absent case cannot be shown here")
