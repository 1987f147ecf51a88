"""Echo jobs and loopback federations for the exchange tests (tests/exchange/)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from fedllm.apps.local_federation import LocalFederation, local_federation
from fedllm.config import load_site_config
from fedllm.flare.server_models import TENSOR_MIB
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.exchange import ExchangeOptions
from fedllm.jobs.template import InitialModel, JobTemplate
from tests.support.sites import local_config_dict, write_yaml


@contextlib.contextmanager
def echo_federation(root: Path, sites: int, heartbeat_timeout_s: int | None = None) -> Iterator[LocalFederation]:
    """A server and `sites` sites on loopback (mTLS kits with fedllm's comm settings), stopped afterwards."""
    data = local_config_dict(project="xtest", sites=sites)
    if heartbeat_timeout_s is not None:
        data["server"]["heartbeat_timeout_s"] = heartbeat_timeout_s
    cfg = load_site_config(write_yaml(root / "site.yaml", data))
    with local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=lambda _m: None) as fed:
        yield fed


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
    verify: bool = True,
) -> Path:
    """An echo job folder: sites verify the weights they receive and send them back.

    verify=False for a job that only has to keep running: FedAvg's mean of three equal float32
    models is not always bit-equal to the model, so verified rounds past the first need 1 or 2 sites.
    """
    template = JobTemplate(
        name="echo",
        trainer="fedllm.training.toy.echo",
        initial_model=InitialModel(
            class_path="fedllm.flare.server_models.EchoModel",
            args={"size_mib": size_mib, "dtype": dtype, "tensor_mib": tensor_mib},
        ),
        key_metric="global_val_accuracy",
        final_evaluation=False,  # the echo job checks the exchange, not a model
        train_args={
            "size_mib": size_mib,
            "dtype": dtype,
            "tensor_mib": tensor_mib,
            "verify": verify,
            "tolerance": tolerance,
        },
        exchange=exchange or ExchangeOptions(),
    )
    spec = resolve_spec(template, "fedavg", num_clients=sites, rounds=rounds, name=name)
    return create_job(spec, out)
