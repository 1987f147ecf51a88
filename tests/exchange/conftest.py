"""A real loopback federation for exchange tests, plus echo jobs of any size."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.template import InitialModel, JobTemplate
from fedllm.provision import Kits, provision
from fedllm.runtime import native
from fedllm.training.echo import TENSOR_MIB
from tests.conftest import local_config_dict, write_yaml


def start_federation(root: Path, sites: int, heartbeat_timeout_s: int | None = None) -> Kits:
    """Provision mTLS kits (with fedllm's comm settings) for a server and `sites` sites, and start them."""
    data = local_config_dict(project="xtest", sites=sites)
    if heartbeat_timeout_s is not None:
        data["server"]["heartbeat_timeout_s"] = heartbeat_timeout_s
    cfg = load_site_config(write_yaml(root / "site.yaml", data))
    kits = provision(cfg, root / "ws", source="site.yaml", data_root=root)
    native.up(kits, timeout=120, echo=lambda _m: None)
    return kits


@pytest.fixture(scope="module")
def federation_2(tmp_path_factory) -> Kits:
    kits = start_federation(tmp_path_factory.mktemp("xfed"), sites=2)
    yield kits
    native.down(kits, echo=lambda _m: None)


def echo_job(
    out: Path,
    size_mib: float,
    *,
    sites: int,
    rounds: int = 1,
    dtype: str = "float32",
    exchange: ExchangeOptions | None = None,
    tolerance: float = 0.0,
    name: str | None = None,
    tensor_mib: float = TENSOR_MIB,
) -> Path:
    """An echo job folder: sites verify the weights they receive and send them back."""
    template = JobTemplate(
        name="echo",
        trainer="fedllm.training.echo",
        initial_model=InitialModel(
            class_path="fedllm.training.echo.EchoModel",
            args={"size_mib": size_mib, "dtype": dtype, "tensor_mib": tensor_mib},
        ),
        key_metric="val_accuracy",
        train_args={
            "size_mib": size_mib,
            "dtype": dtype,
            "tensor_mib": tensor_mib,
            "verify": True,
            "tolerance": tolerance,
        },
        exchange=exchange or ExchangeOptions(),
    )
    spec = resolve_spec(template, "fedavg", num_clients=sites, rounds=rounds, name=name)
    return create_job(spec, out)
