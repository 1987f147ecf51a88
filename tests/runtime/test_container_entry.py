"""The image's entrypoint stages a read-only kit into the writable workspace (no docker needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from nvflare.lighter.constants import CtxKey

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime.container import (
    ContainerEntryError,
    check_admin_user,
    configure_console,
    site_facts,
    stage_workspace,
)
from tests.support.sites import local_config_dict, write_yaml


def test_stage_workspace_copies_kit_and_keeps_the_kit_untouched(tmp_path: Path):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(gpus=[[0, 1], [2], []])))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    kit = kits.site("site-1")
    before = sorted(p.relative_to(kit) for p in kit.rglob("*"))
    ws = stage_workspace(kit, tmp_path / "run")
    assert (ws / "startup" / "client.key").read_bytes() == (kit / "startup" / "client.key").read_bytes()
    assert stat.S_IMODE(os.stat(ws / "startup").st_mode) == 0o700
    assert (ws / "local" / "resources.json.default").is_file() and (ws / "transfer").is_dir()
    assert sorted(p.relative_to(kit) for p in kit.rglob("*")) == before
    # Staging again (a container restart) replaces the copy instead of failing.
    stage_workspace(kit, tmp_path / "run")
    facts = site_facts(kit)
    assert facts["gpus"] == [0, 1] and facts["name"] == "site-1" and facts["workload"] == "none"


def test_stage_workspace_without_a_kit_says_what_to_mount(tmp_path: Path):
    with pytest.raises(ContainerEntryError, match="mount the participant's kit"):
        stage_workspace(tmp_path / "nothing", tmp_path / "run")


def test_the_console_logs_in_by_certificate_and_uses_the_shared_folders(tmp_path: Path):
    """What NVFlare's own admin-config loader makes of the staged kit (the console reads the same)."""
    from nvflare.apis.workspace import Workspace
    from nvflare.fuel.hci.client.config import secure_load_admin_config

    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    staged = stage_workspace(kits.admin(), tmp_path / "run" / "admin-kit")
    jobs, results = tmp_path / "runs" / "jobs", tmp_path / "runs" / "results"
    configure_console(staged, jobs, results)

    admin = secure_load_admin_config(Workspace(root_dir=str(staged))).get_admin_config()
    assert admin["uid_source"] == "cert"  # NVFlare's AdminClient asks for no user name
    assert (admin["upload_dir"], admin["download_dir"]) == (str(jobs), str(results))
    # The kit itself keeps NVFlare's defaults.
    assert json.loads((kits.admin() / "startup" / "fed_admin.json").read_text())["admin"]["uid_source"] == "user_input"

    # Folders that are not mounted: the kit's own transfer/ stays.
    other = stage_workspace(kits.admin(), tmp_path / "run2")
    configure_console(other, tmp_path / "absent", tmp_path / "absent")
    admin = secure_load_admin_config(Workspace(root_dir=str(other))).get_admin_config()
    assert admin["upload_dir"] == admin["download_dir"] == str(other / "transfer")


def test_a_wrong_admin_name_is_one_clear_error(tmp_path: Path, monkeypatch):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    monkeypatch.delenv("FEDLLM_ADMIN_USER", raising=False)
    assert check_admin_user(kits.admin()) == cfg.admin.name
    monkeypatch.setenv("FEDLLM_ADMIN_USER", "someone@else.org")
    with pytest.raises(ContainerEntryError, match=r"FEDLLM_ADMIN_USER is 'someone@else.org' but the admin kit"):
        check_admin_user(kits.admin())


def test_stage_workspace_refuses_a_kit_whose_certificate_expired(tmp_path: Path):
    import datetime as dt

    from fedllm.provision.certificates import CertificateError
    from tests.support.trust import sign_with_validity

    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kit = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path).site("site-2")
    # The project's own CA (central provisioning keeps it in the state dir), a validity that ended an hour ago.
    ca = tmp_path / "ca"
    ca.mkdir()
    state = json.loads((tmp_path / "ws" / cfg.project / "state" / "cert.json").read_text())
    (ca / "rootCA.key").write_text(state[CtxKey.ROOT_PRI_KEY])
    (ca / "rootCA.pem").write_text(state[CtxKey.ROOT_CERT])
    csr = _csr_for(kit / "startup" / "client.key", "site-2", tmp_path / "site-2.csr")
    now = dt.datetime.now(dt.timezone.utc)
    pem = sign_with_validity(ca, csr, "nvidia", "client", now - dt.timedelta(days=2), now - dt.timedelta(hours=1))
    (kit / "startup" / "client.crt").write_bytes(pem)
    with pytest.raises(CertificateError, match=r"certificate of 'site-2' .* expired at .* Fix:"):
        stage_workspace(kit, tmp_path / "run")


def _csr_for(key_path: Path, name: str, out: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    out.write_bytes(csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return out
