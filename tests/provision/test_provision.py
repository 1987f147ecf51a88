"""Provisioning: NVFlare's provisioner produces complete mTLS kits from the site config."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID

from fedllm.config import load_site_config
from fedllm.flare.resume import DEFAULT_MAX_SITE_RESTARTS_PER_HOUR, JobResumer
from fedllm.provision import ProvisionError, latest_kits, provision
from fedllm.provision.builders import JobResumeBuilder
from fedllm.runtime.site_env import site_environment
from tests.support.sites import local_config_dict, write_yaml


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _assert_signed_by(cert: x509.Certificate, root: x509.Certificate) -> None:
    assert cert.issuer == root.subject
    root.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
    )


@pytest.fixture
def kits(tmp_path: Path):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(gpus=[[0, 1], [2, 3], [4, 5]])))
    return provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)


def test_every_participant_gets_certificate_key_and_root_ca(kits) -> None:
    cfg = kits.config
    expected = {
        kits.server(): ("server.crt", "server.key", "fed_server.json"),
        **{kits.site(s): ("client.crt", "client.key", "fed_client.json") for s in cfg.site_names},
        kits.admin(): ("client.crt", "client.key", "fed_admin.json"),
    }
    root = _cert(kits.server() / "startup" / "rootCA.pem")
    for kit, (crt, key, conf) in expected.items():
        startup = kit / "startup"
        for name in (crt, key, conf, "rootCA.pem"):
            assert (startup / name).is_file(), f"{startup / name} missing"
        # Every kit carries the same root CA, and its own certificate chains to it.
        assert (startup / "rootCA.pem").read_bytes() == (kits.server() / "startup" / "rootCA.pem").read_bytes()
        _assert_signed_by(_cert(startup / crt), root)
        assert stat.S_IMODE((startup / key).stat().st_mode) & 0o077 == 0, (
            "private keys must not be group/world readable"
        )
        assert _cn(_cert(startup / crt)) == kit.name


def test_server_cn_is_the_host_sites_dial(kits) -> None:
    server_cn = _cn(_cert(kits.server() / "startup" / "server.crt"))
    assert server_cn == kits.config.server.name
    for site in kits.config.site_names:
        client = json.loads((kits.site(site) / "startup" / "fed_client.json").read_text())
        target = client["servers"][0]["service"]["target"]
        assert target == f"{server_cn}:{kits.config.server.fed_learn_port}"
        assert client["client"]["connection_security"] == "mtls"
    admin = json.loads((kits.admin() / "startup" / "fed_admin.json").read_text())["admin"]
    assert (admin["host"], admin["port"]) == (server_cn, kits.config.server.admin_port)


def test_project_yml_is_rendered_from_the_site_config(kits) -> None:
    project = yaml.safe_load((kits.prod_dir.parent / "project.yml").read_text())
    names = {p["name"]: p["type"] for p in project["participants"]}
    assert names == {
        "localhost": "server",
        "site-1": "client",
        "site-2": "client",
        "site-3": "client",
        "admin@nvidia.com": "admin",
    }
    assert any(b["path"] == "fedllm.provision.builders.SiteRuntimeBuilder" for b in project["builders"])


def test_site_kits_know_only_their_own_gpus_and_data(kits, tmp_path: Path) -> None:
    env = site_environment(kits.site("site-2"))
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["FEDLLM_DATA_DIR"] == str((tmp_path / "data" / "site-2").resolve())
    # A site's kit holds no other participant's key.
    keys = sorted(p.name for p in kits.site("site-2").rglob("*.key"))
    assert keys == ["client.key"]


def test_reprovisioning_after_a_gpu_edit_keeps_the_root_ca(tmp_path: Path) -> None:
    data = local_config_dict(gpus=[[0, 1], [2, 3], [4, 5]])
    path = write_yaml(tmp_path / "site.yaml", data)
    first = provision(load_site_config(path), tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    data["sites"][0]["gpus"] = [6, 7]
    write_yaml(path, data)
    cfg = load_site_config(path)
    with pytest.raises(ProvisionError, match="different site config"):
        latest_kits(tmp_path / "ws", cfg)
    second = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    assert second.prod_dir != first.prod_dir
    assert latest_kits(tmp_path / "ws", cfg).prod_dir == second.prod_dir
    assert site_environment(second.site("site-1"))["CUDA_VISIBLE_DEVICES"] == "6,7"
    root = "startup/rootCA.pem"
    assert (first.server() / root).read_bytes() == (second.server() / root).read_bytes()


def test_old_kits_are_pruned_so_reprovisioning_never_hits_nvflares_limit(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    ws = tmp_path / "ws"
    (ws / cfg.project / "prod_99").mkdir(parents=True)  # as if provisioned 100 times
    kits = provision(cfg, ws, source="site.yaml")
    assert (kits.server() / "startup" / "server.crt").is_file()
    assert sorted(p.name for p in (ws / cfg.project).glob("prod_*")) == ["prod_00", "prod_01"]


def test_latest_kits_without_provisioning_says_what_to_do(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    with pytest.raises(ProvisionError, match="run `fedllm provision"):
        latest_kits(tmp_path / "ws", cfg)


def test_server_heartbeat_timeout_comes_from_the_site_config(tmp_path: Path) -> None:
    # NVFlare's server reads it from startup/fed_server.json; its own default (600 s) stalls a round
    # for 10 minutes when a site dies.
    def timeout_in_kit(kits) -> int:
        return json.loads((kits.server() / "startup" / "fed_server.json").read_text())["servers"][0][
            "heart_beat_timeout"
        ]

    data = local_config_dict()
    assert (
        timeout_in_kit(provision(load_site_config(write_yaml(tmp_path / "a.yaml", data)), tmp_path / "a", "a.yaml"))
        == 120
    )
    data["server"]["heartbeat_timeout_s"] = 900
    assert (
        timeout_in_kit(provision(load_site_config(write_yaml(tmp_path / "b.yaml", data)), tmp_path / "b", "b.yaml"))
        == 900
    )


def test_server_jobs_listen_on_the_job_ports_and_sites_never_do(tmp_path: Path) -> None:
    """Only the server's kit allows ad-hoc connections: its jobs listen (mTLS) on the site config's job ports."""
    data = local_config_dict()
    data["server"]["job_ports"] = "21000-21003"
    kits = provision(load_site_config(write_yaml(tmp_path / "a.yaml", data)), tmp_path / "a", "a.yaml")
    comm = json.loads((kits.server() / "local" / "comm_config.json").read_text())
    assert comm["allow_adhoc_conns"] is True
    assert comm["adhoc"] == {
        "scheme": "tcp",
        "resources": {"host": "localhost", "ports": "21000-21003", "secure": True, "connection_security": "mtls"},
    }
    for site in kits.config.site_names:
        assert not (kits.site(site) / "local" / "comm_config.json").exists()

    data["server"]["job_ports"] = None
    off = provision(load_site_config(write_yaml(tmp_path / "b.yaml", data)), tmp_path / "b", "b.yaml")
    assert not (off.server() / "local" / "comm_config.json").exists()


def test_only_the_server_runs_the_job_resumer(kits) -> None:
    """The server parent's JobResumer continues FedAvg jobs a server or site restart interrupted."""

    def components(kit: Path) -> list[str]:
        resources = json.loads((kit / "local" / "resources.json.default").read_text())
        return [c["path"] for c in resources["components"]]

    assert components(kits.server()).count("fedllm.flare.resume.JobResumer") == 1
    assert "nvflare.apis.impl.job_def_manager.SimpleJobDefManager" in components(kits.server())
    for site in kits.config.site_names:
        assert "fedllm.flare.resume.JobResumer" not in components(kits.site(site))
    # Its bound on a flapping site, as NVFlare builds it from the resources.
    resources = json.loads((kits.server() / "local" / "resources.json.default").read_text())
    args = next(c["args"] for c in resources["components"] if c["path"] == "fedllm.flare.resume.JobResumer")
    assert args == {"max_site_restarts_per_hour": DEFAULT_MAX_SITE_RESTARTS_PER_HOUR}
    assert JobResumer(**args).max_site_restarts_per_hour == DEFAULT_MAX_SITE_RESTARTS_PER_HOUR == 3


@pytest.mark.parametrize("bound", [-1, 1.5, True, "3"])
def test_the_site_restart_bound_is_a_count(bound) -> None:
    with pytest.raises(ValueError, match="max_site_restarts_per_hour"):
        JobResumeBuilder(max_site_restarts_per_hour=bound)
