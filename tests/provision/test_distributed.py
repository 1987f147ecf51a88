"""Distributed provisioning with NVFlare's real `nvflare cert` / `nvflare package`: what each step makes and refuses."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import stat
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fedllm.config import load_site_config
from fedllm.config.site_config import SiteConfig
from fedllm.provision import ProvisionError, latest_kits
from fedllm.provision.certificates import CertificateError, check_kit_certificate, read_certificate
from fedllm.provision.distributed import (
    CertificateAuthority,
    DistributedProvisionError,
    ca_fingerprint,
    init_ca,
    package_kit,
    participant_definition,
    request_certificate,
    sign_request,
)
from tests.support.sites import local_config_dict, write_yaml
from tests.support.trust import cert_public_key, csr_public_key, private_keys_under, sign_with_validity


def _config(root: Path, edit=None, name: str = "site.yaml") -> SiteConfig:
    data = local_config_dict(project="fedsplit")
    data["sites"][1]["org"] = "orgb"
    data["admins"].append({"name": "viewer@orgb.com", "org": "orgb", "role": "member"})
    if edit:
        edit(data)
    return load_site_config(write_yaml(root / name, data))


@dataclass
class Made:
    root: Path
    config: SiteConfig
    ca: CertificateAuthority
    kits: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Iterator[Made]:
    root = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))  # NVFlare's audit records (~/.nvflare)
        config = _config(root)
        yield Made(root, config, init_ca(config, root / "admin" / "ca"))


def _round_trip(made: Made, name: str) -> Path:
    """`name`'s kit, made once: request at its home, signature at the admin, packaging at its home."""
    if name not in made.kits:
        home = made.root / name
        req = request_certificate(made.config, name, home / "request", source="site.yaml", data_root=made.root)
        out = made.root / "admin" / f"{name}.signed.zip"
        signed = sign_request(made.config, req.request_zip, made.ca.ca_dir, out=out)
        made.kits[name] = package_kit(signed.signed_zip, req.request_dir, home / "ws", made.ca.fingerprint)
    return made.kits[name]


def test_ca_folder_is_private_and_its_fingerprint_is_the_root_certificates(made: Made) -> None:
    assert stat.S_IMODE(made.ca.ca_dir.stat().st_mode) == 0o700
    meta = json.loads((made.ca.ca_dir / "ca.json").read_text())
    assert made.ca.fingerprint == meta["rootCA_fingerprint"] and made.ca.fingerprint.startswith("SHA256:")
    profile = (made.ca.ca_dir / "project_profile.yaml").read_text()
    assert f"fed_learn_port: {made.config.server.fed_learn_port}" in profile and "scheme: tcp" in profile


def test_a_site_kit_holds_its_own_key_the_signed_certificate_and_fedllms_runtime_facts(made: Made) -> None:
    kit = _round_trip(made, "site-2")
    request_dir = made.root / "site-2" / "request"
    # The kit's key is the one made at the site; the certificate certifies it, for site-2 of orgb, as a client.
    assert (kit / "startup" / "client.key").read_bytes() == (request_dir / "site-2.key").read_bytes()
    cert = check_kit_certificate(kit)
    assert (cert.common_name, cert.org, cert.role) == ("site-2", "orgb", "client")
    assert cert.public_key_sha256 == csr_public_key(request_dir / "site-2.csr")
    assert cert.not_after - cert.not_before > dt.timedelta(days=1000)
    assert stat.S_IMODE((kit / "startup" / "client.key").stat().st_mode) & 0o077 == 0
    # The server's details came with the project admin's signature.
    target = json.loads((kit / "startup" / "fed_client.json").read_text())["servers"][0]["service"]
    assert target == {"target": f"localhost:{made.config.server.fed_learn_port}", "scheme": "tcp"}
    # fedllm's Builders ran: the site's runtime facts, the component allow-list, its own compose bundle.
    facts = json.loads((kit / "local" / "fedllm_site.json").read_text())
    assert facts["name"] == "site-2" and facts["data_dir"] == str(made.root / "data" / "site-2")
    assert "fedllm." in json.loads((kit / "local" / "resources.json.default").read_text())["class_allow_list"]
    compose = yaml.safe_load((kit / "compose" / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    assert list(compose["services"]) == ["site-2"] and "depends_on" not in service
    kit_mount, data_mount = service["volumes"][:2]
    assert (kit_mount["source"], kit_mount["target"], kit_mount["read_only"]) == ("..", "/fedllm/kit", True)
    assert data_mount["source"].endswith("/data/site-2") and data_mount["target"] == "/fedllm/data"
    assert service["labels"]["fedllm.kit-digest"]  # recreated by `up -d` exactly when this kit changes
    assert not (kit / "local" / "comm_config.json").exists(), "job ports are the server's alone"
    # What travelled carries no key.
    for zipped in (request_dir / "site-2.request.zip", made.root / "admin" / "site-2.signed.zip"):
        with zipfile.ZipFile(zipped) as zf:
            assert not any(n.endswith(".key") or b"PRIVATE KEY" in zf.read(n) for n in zf.namelist()), zipped
    # The key exists twice, both at the site: where it was made and in the kit made from it.
    keys = sorted(k.path for k in private_keys_under(made.root / "site-2"))
    assert keys == sorted([kit / "startup" / "client.key", request_dir / "site-2.key"])


def test_the_server_kit_gets_the_servers_settings(made: Made) -> None:
    kit = _round_trip(made, "localhost")
    server = json.loads((kit / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server["heart_beat_timeout"] == made.config.server.heartbeat_timeout_s
    comm = json.loads((kit / "local" / "comm_config.json").read_text())
    assert comm["allow_adhoc_conns"] is True and comm["adhoc"]["resources"]["ports"] == made.config.server.job_ports
    assert read_certificate(kit / "startup" / "server.crt").role == "server"
    assert "authorization.json.default" in {p.name for p in (kit / "local").iterdir()}


def test_an_admin_kit_carries_the_role_of_the_site_config(made: Made) -> None:
    kit = _round_trip(made, "viewer@orgb.com")
    cert = check_kit_certificate(kit)
    assert (cert.common_name, cert.org, cert.role) == ("viewer@orgb.com", "orgb", "member")
    assert (kit / "startup" / "fed_admin.json").is_file()


def test_a_request_for_a_name_outside_the_site_config_is_refused_at_signing(made: Made) -> None:
    # The requester's copy of the config lists a site-9; the project admin's does not.
    rogue = _config(made.root, lambda d: d["sites"].append({"name": "site-9", "org": "orgb"}), name="rogue.yaml")
    req = request_certificate(
        rogue, "site-9", made.root / "site-9" / "request", source="rogue.yaml", data_root=made.root
    )
    out = made.root / "admin" / "site-9.signed.zip"
    with pytest.raises(DistributedProvisionError) as info:
        sign_request(made.config, req.request_zip, made.ca.ca_dir, out=out, source="site.yaml")
    message = str(info.value)
    assert "refused, nothing was signed" in message and "'site-9' is not in site.yaml" in message
    assert "sites: site-1, site-2, site-3" in message and "Fix: if 'site-9' is to join, add it" in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("who", "edit", "expected"),
    [
        (
            "site-1",
            lambda d: d["sites"][0].update(org="orgb"),
            "asks for org 'orgb', but site.yaml gives it org 'nvidia'",
        ),
        (
            "viewer@orgb.com",
            lambda d: d["admins"][1].update(role="lead"),
            "asks for role lead, but site.yaml gives it role member",
        ),
        ("site-3", lambda d: d["server"].update(name="site-3") or d["sites"].pop(2), "asks for a server certificate"),
    ],
)
def test_signing_refuses_another_org_role_or_kind_than_the_site_config_gives(made: Made, who, edit, expected) -> None:
    rogue = _config(made.root, edit, name=f"rogue-{who}.yaml")
    req = request_certificate(rogue, who, made.root / "rogue" / who, source="rogue.yaml", data_root=made.root)
    with pytest.raises(DistributedProvisionError, match="refused, nothing was signed") as info:
        sign_request(
            made.config, req.request_zip, made.ca.ca_dir, out=made.root / "rogue" / "x.zip", source="site.yaml"
        )
    assert expected in str(info.value)


def test_requests_name_a_participant_of_the_site_config(made: Made, tmp_path: Path) -> None:
    with pytest.raises(DistributedProvisionError, match=r"'site-9' is not a participant of project 'fedsplit'.*Fix:"):
        request_certificate(made.config, "site-9", tmp_path, source="site.yaml", data_root=tmp_path)
    # NVFlare's distributed provisioning certifies no project_admin: say so, and what to do.
    with pytest.raises(DistributedProvisionError, match=r"role project_admin.*Fix: give this admin role lead"):
        participant_definition(made.config, "admin@nvidia.com", "site.yaml", tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written for a refused request"


def test_packaging_checks_the_root_ca_fingerprint(made: Made, tmp_path: Path) -> None:
    home = made.root / "site-3"
    req = request_certificate(made.config, "site-3", home / "request", source="site.yaml", data_root=made.root)
    signed = sign_request(made.config, req.request_zip, made.ca.ca_dir)
    assert signed.signed_zip == req.request_zip.with_name("site-3.signed.zip")
    other = init_ca(made.config, tmp_path / "other-ca").fingerprint
    with pytest.raises(DistributedProvisionError, match="ROOTCA_FINGERPRINT_MISMATCH"):
        package_kit(signed.signed_zip, req.request_dir, home / "ws", other)
    assert not (home / "ws" / "fedsplit" / "prod_00" / "site-3").exists()


def test_an_expired_or_foreign_certificate_is_refused_before_anything_starts(made: Made, tmp_path: Path) -> None:
    kit = tmp_path / "site-1"
    shutil.copytree(_round_trip(made, "site-1"), kit)
    csr = made.root / "site-1" / "request" / "site-1.csr"
    now = dt.datetime.now(dt.timezone.utc)
    pem = sign_with_validity(
        made.ca.ca_dir, csr, "nvidia", "client", now - dt.timedelta(days=9), now - dt.timedelta(hours=1)
    )
    (kit / "startup" / "client.crt").write_bytes(pem)
    assert cert_public_key(kit / "startup" / "client.crt") == csr_public_key(csr)  # the same key, re-certified
    with pytest.raises(CertificateError) as info:
        check_kit_certificate(kit)
    assert "certificate of 'site-1'" in str(info.value) and "expired at" in str(info.value)
    assert "Fix: at the participant, `fedllm cert request --name site-1 --force`" in str(info.value)

    foreign = init_ca(made.config, tmp_path / "foreign-ca")
    pem = sign_with_validity(foreign.ca_dir, csr, "nvidia", "client", now, now + dt.timedelta(days=1))
    (kit / "startup" / "client.crt").write_bytes(pem)
    with pytest.raises(CertificateError, match="is not signed by the kit's root CA"):
        check_kit_certificate(kit)


def test_a_packaged_kit_stays_good_when_others_join_and_not_when_its_own_entry_changes(made: Made) -> None:
    _round_trip(made, "site-2")
    workspace = made.root / "site-2" / "ws"
    assert latest_kits(workspace, made.config).site("site-2") == made.kits["site-2"]

    def edited(edit, name: str) -> SiteConfig:
        data = made.config.model_dump(mode="json")
        edit(data)
        return load_site_config(write_yaml(made.root / name, data))

    grown = edited(lambda d: d["sites"].append({"name": "site-4", "org": "orgb"}), "grown.yaml")
    assert latest_kits(workspace, grown).site("site-2") == made.kits["site-2"]
    moved = edited(lambda d: d["sites"][1].update(gpus=[3]), "moved.yaml")
    with pytest.raises(ProvisionError, match=r"kit of 'site-2' .* packaged from a different site config.*--force"):
        latest_kits(workspace, moved)


def test_nvflare_runs_in_this_process(made: Made, tmp_path: Path, monkeypatch) -> None:
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    ca = init_ca(made.config, tmp_path / "ca")
    req = request_certificate(made.config, "site-1", tmp_path / "request", source="site.yaml", data_root=tmp_path)
    signed = sign_request(made.config, req.request_zip, ca.ca_dir, out=tmp_path / "site-1.signed.zip")
    kit = package_kit(signed.signed_zip, req.request_dir, tmp_path / "ws", ca.fingerprint)
    assert check_kit_certificate(kit).common_name == "site-1"


def test_a_ca_folder_whose_ca_json_names_another_root_signs_nothing(made: Made, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    shutil.copytree(made.ca.ca_dir, ca_dir)
    meta = json.loads((ca_dir / "ca.json").read_text())
    meta["rootCA_fingerprint"] = "SHA256:" + ":".join(["AB"] * 32)
    (ca_dir / "ca.json").write_text(json.dumps(meta))
    req = request_certificate(made.config, "site-3", tmp_path / "request", source="site.yaml", data_root=tmp_path)
    out = tmp_path / "outbox" / "site-3.signed.zip"
    with pytest.raises(DistributedProvisionError, match=r"ca\.json does not match rootCA\.pem"):
        sign_request(made.config, req.request_zip, ca_dir, out=out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], list(out.parent.iterdir())


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"rootCA_fingerprint": 7}'])
def test_a_damaged_ca_json_is_named(made: Made, tmp_path: Path, content: bytes) -> None:
    ca_dir = tmp_path / "ca"
    shutil.copytree(made.ca.ca_dir, ca_dir)
    (ca_dir / "ca.json").write_bytes(content)
    with pytest.raises(DistributedProvisionError, match=r"ca\.json names no root CA fingerprint .*Fix: restore"):
        ca_fingerprint(ca_dir)
