"""The real NeMo trainers failing fast through a real NVFlare server and site, before NeMo loads anything.

With the file/field/fix when the checkpoint's TP does not match the site's GPUs, and when NeMo is not
installed (the main test environment has none; tests/training/nemo/test_federation.py trains with it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedllm.apps.local_federation import local_federation
from fedllm.config import load_site_config
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import JobFailed, submit_job
from fedllm.jobs.template import load_template
from tests.support.nemo_files import gpt_config, gpt_shard, write_nemo
from tests.support.sites import local_config_dict, write_yaml

pytestmark = pytest.mark.federation
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def one_site(tmp_path_factory):
    """A server + 1 site on loopback."""
    root = tmp_path_factory.mktemp("nemo-fed")
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="nemotest", sites=1)))
    (root / "data" / "site-1").mkdir(parents=True)
    with local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=lambda _m: None) as fed:
        yield fed.kits, root


def test_real_trainer_stops_on_tp_mismatch_naming_file_field_and_fix(one_site, tmp_path):
    kits, _ = one_site
    ckpt = write_nemo(tmp_path / "gpt_tp2.nemo", gpt_config(tp=2), [gpt_shard(64, 128, 2)] * 2)
    # The admin's machine has no such file, so job creation cannot check; the site can (and must).
    spec = resolve_spec(
        load_template("nemo-ptuning-345m"), "fedavg", rounds=1, num_clients=1, model="/site-only/x.nemo"
    )
    spec = dataclasses.replace(spec, train_args={**spec.train_args, "model": str(ckpt)})
    with pytest.raises(JobFailed) as info:
        submit_job(
            kits, create_job(spec, tmp_path / "jobs"), download=tmp_path / "res", timeout=300, echo=lambda _m: None
        )
    (site, error), *_ = info.value.site_errors.items()
    assert site == "site-1" and error.split(":")[0].endswith("CheckpointError")
    assert "gpt_tp2.nemo: model_config.yaml field tensor_model_parallel_size is 2" in error and "--devices 2" in error


def test_real_trainer_without_nemo_says_what_to_install(one_site, tmp_path):
    pytest.importorskip("torch")
    try:
        import nemo  # noqa: F401

        pytest.skip("NeMo is installed here")
    except ImportError:
        pass
    kits, _ = one_site
    ckpt = write_nemo(tmp_path / "gpt_tp1.nemo", gpt_config(tp=1), [gpt_shard(64, 128, 1)])
    spec = resolve_spec(load_template("nemo-ptuning-345m"), "fedavg", rounds=1, num_clients=1, model=str(ckpt))
    with pytest.raises(JobFailed) as info:
        submit_job(
            kits, create_job(spec, tmp_path / "jobs"), download=tmp_path / "res", timeout=300, echo=lambda _m: None
        )
    (_, error), *_ = info.value.site_errors.items()
    assert error.split(":")[0].endswith("NemoUnavailableError") and "not installed" in error and "fedllm[nemo]" in error
