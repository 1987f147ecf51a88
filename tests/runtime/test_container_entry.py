"""The image's entrypoint stages a read-only kit into the writable workspace (no docker needed)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
from tests.support.trust import private_keys_under


def test_stage_workspace_links_startup_copies_local_and_keeps_the_kit_untouched(tmp_path: Path):
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(gpus=[[0, 1], [2], []])))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    kit = kits.site("site-1")
    before = sorted(p.relative_to(kit) for p in kit.rglob("*"))
    ws = stage_workspace(kit, tmp_path / "run")
    # The key is read through the link into the (read-only) kit: the writable workspace never holds a copy.
    assert all((ws / "startup" / f.name).resolve() == f.resolve() for f in (kit / "startup").iterdir())
    assert all(f.is_symlink() for f in (ws / "startup").iterdir())
    assert (ws / "startup" / "client.key").read_bytes() == (kit / "startup" / "client.key").read_bytes()
    assert private_keys_under(ws) == []
    assert not (ws / "local").is_symlink() and (ws / "local" / "resources.json.default").is_file()
    assert (ws / "transfer").is_dir()
    assert sorted(p.relative_to(kit) for p in kit.rglob("*")) == before
    # Staging again (a container restart) replaces what is there instead of failing, and removes a copy of
    # the key that an older entry point left in the volume.
    shutil.rmtree(ws / "startup")
    shutil.copytree(kit / "startup", ws / "startup")
    assert private_keys_under(ws) != []
    stage_workspace(kit, tmp_path / "run")
    assert (ws / "startup" / "client.key").is_symlink() and private_keys_under(ws) == []
    facts = site_facts(kit)
    assert facts["gpus"] == [0, 1] and facts["name"] == "site-1" and facts["workload"] == "none"


def test_the_admin_consoles_copy_is_its_own(tmp_path: Path):
    """The console edits its fed_admin.json: it gets a copy (in the admin container's tmpfs), never the kit's file."""
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kit = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path).admin()
    ws = stage_workspace(kit, tmp_path / "run", copy_startup=True)
    assert not any(f.is_symlink() for f in (ws / "startup").iterdir())
    assert stat.S_IMODE(os.stat(ws / "startup").st_mode) == 0o700
    configure_console(ws, tmp_path / "jobs", tmp_path / "results")
    assert (kit / "startup" / "fed_admin.json").read_bytes() != (ws / "startup" / "fed_admin.json").read_bytes()


def test_stage_workspace_without_a_kit_says_what_to_mount(tmp_path: Path):
    with pytest.raises(ContainerEntryError, match="mount the participant's kit"):
        stage_workspace(tmp_path / "nothing", tmp_path / "run")


def test_the_console_logs_in_by_certificate_and_uses_the_shared_folders(tmp_path: Path):
    """What NVFlare's own admin-config loader makes of the staged kit (the console reads the same)."""
    from nvflare.apis.workspace import Workspace
    from nvflare.fuel.hci.client.config import secure_load_admin_config

    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict()))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    staged = stage_workspace(kits.admin(), tmp_path / "run" / "admin-kit", copy_startup=True)
    jobs, results = tmp_path / "runs" / "jobs", tmp_path / "runs" / "results"
    configure_console(staged, jobs, results)

    admin = secure_load_admin_config(Workspace(root_dir=str(staged))).get_admin_config()
    assert admin["uid_source"] == "cert"  # NVFlare's AdminClient asks for no user name
    assert (admin["upload_dir"], admin["download_dir"]) == (str(jobs), str(results))
    # The kit itself keeps NVFlare's defaults.
    assert json.loads((kits.admin() / "startup" / "fed_admin.json").read_text())["admin"]["uid_source"] == "user_input"

    # Folders that are not mounted: the kit's own transfer/ stays.
    other = stage_workspace(kits.admin(), tmp_path / "run2", copy_startup=True)
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


@pytest.mark.federation
def test_the_entry_point_runs_nvflare_from_the_volume_with_the_key_only_in_the_kit(tmp_path: Path):
    """`fedllm container-entry server|site` as the image runs them (here as processes): NVFlare starts from a
    workspace whose startup/ is the kit's, registers, and writes only into the workspace; no key is copied."""
    import signal
    import subprocess
    import sys
    import time

    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", local_config_dict(sites=1)))
    kits = provision(cfg, tmp_path / "ws", source="site.yaml", data_root=tmp_path)
    kit_files = {k: sorted(p.relative_to(k) for p in k.rglob("*")) for k in (kits.server(), kits.site("site-1"))}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FEDLLM_SKIP_GPU_PREFLIGHT": "1",
        "FEDLLM_DATA_DIR": str(tmp_path / "data"),
    }
    volumes = {"server": tmp_path / "server-volume", "site": tmp_path / "site-volume"}
    procs = []
    try:
        for role, kit in (("server", kits.server()), ("site", kits.site("site-1"))):
            log = open(tmp_path / f"{role}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [str(Path(sys.executable).parent / "fedllm"), "container-entry", role],
                    env={**env, "FEDLLM_KIT": str(kit), "FEDLLM_RUN_DIR": str(volumes[role])},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        while not (volumes["site"] / "fedllm_registered").is_file():
            for role, proc in zip(volumes, procs, strict=True):
                assert proc.poll() is None, (tmp_path / f"{role}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "site.log").read_text()[-3000:]
            time.sleep(0.5)
        for role, volume in volumes.items():
            assert all(f.is_symlink() for f in (volume / "startup").iterdir()), role
            assert (volume / "log.txt").is_file(), f"NVFlare's {role} log is not in its workspace"
            assert private_keys_under(volume) == [], f"a private key was copied into the {role}'s volume"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for kit, files in kit_files.items():
        assert sorted(p.relative_to(kit) for p in kit.rglob("*")) == files, f"NVFlare wrote into the kit {kit}"
