"""NeMo jobs through a real NVFlare server and site on CPU: what can be proven without NeMo and a GPU.

- the torchrun launch (2 processes for a 2-GPU site) with the Client API's rank 0 in the shared loop,
  the server's PromptEncoderWeights and the prompt-encoder keys the site sends (a CPU stand-in task);
- the real NeMo p-tuning trainer failing fast, with the file/field/fix, when the checkpoint's TP does
  not match the site's GPUs, and when NeMo is not installed (it is not, here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedllm.apps.local_federation import local_federation
from fedllm.config import load_site_config
from fedllm.jobs.create import create_job, resolve_spec
from fedllm.jobs.submit import COMPLETED, JobFailed, submit_job
from fedllm.jobs.template import load_template
from fedllm.results.metrics import read_round_metrics
from tests.support.nemo_files import gpt_config, gpt_shard, write_nemo
from tests.support.sites import local_config_dict, write_yaml

pytestmark = pytest.mark.federation
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def one_site(tmp_path_factory):
    """A server + 1 site on loopback; the site can import tests.support.ptuning_standin (PYTHONPATH)."""
    root = tmp_path_factory.mktemp("nemo-fed")
    cfg = load_site_config(write_yaml(root / "site.yaml", local_config_dict(project="nemotest", sites=1)))
    (root / "data" / "site-1").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))  # the sites inherit it when they start
        with local_federation(cfg, root / "ws", data_root=root, source="site.yaml", echo=lambda _m: None) as fed:
            yield fed.kits, root


def _template(tmp_path: Path, trainer: str, args: dict, devices: int) -> Path:
    base = yaml.safe_load((REPO / "jobs" / "nemo-ptuning-345m.yaml").read_text())
    base.update(name="nemo-launch", trainer=trainer, train_args=args)
    base["defaults"] = {**base["defaults"], "num_clients": 1, "devices": devices}
    return write_yaml(tmp_path / "nemo-launch.yaml", base)


def test_two_process_site_runs_rounds_and_sends_the_prompt_encoder(one_site, tmp_path):
    kits, _ = one_site
    template = _template(tmp_path, "tests.support.ptuning_standin", {"token_dim": 1024, "encoder_hidden": 2048}, 2)
    spec = resolve_spec(load_template(str(template)), "fedavg", rounds=2)
    result = submit_job(
        kits, create_job(spec, tmp_path / "jobs"), download=tmp_path / "res", timeout=600, echo=lambda _m: None
    )
    assert result.status == COMPLETED
    rounds = read_round_metrics(result.result_dir)
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        m = r["aggregated"]
        assert m["ranks"] == 2.0 and m["rank_loss_spread"] < 1e-6  # both processes ran, in step
        # Only the prompt encoder left the site: 10×1024 + 1024×2048 + 2048 + 2048×1024 + 1024 floats.
        assert m["bytes_sent"] == 4 * (10 * 1024 + 2 * 1024 * 2048 + 2048 + 1024)
    assert rounds[1]["aggregated"]["global_val_loss"] < rounds[0]["aggregated"]["global_val_loss"]


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
    assert error.split(":")[0].endswith("NemoUnavailableError") and "nemo_toolkit>=1.23,<2.5" in error
