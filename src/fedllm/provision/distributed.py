"""Distributed provisioning: every participant makes its own key, the project admin only signs.

Beside the central `fedllm provision` (one operator makes every kit, keys included), for federations
that span organizations. Built on NVFlare's own commands (`nvflare cert init | request | approve`,
`nvflare package`); fedllm adds what the site config knows:

    project admin  fedllm cert init -c site.yaml                 root CA + NVFlare's project profile
    participant    fedllm cert request -c site.yaml --name site-1
                       key + CSR from the participant's entry in the site config, in its request folder;
                       NVFlare's participant definition lists fedllm's Builders for its kit
    project admin  fedllm cert sign site-1.request.zip -c site.yaml
                       refuses any name, kind, org or role the site config does not hold; NVFlare signs
    participant    fedllm package site-1.signed.zip --request-dir … --fingerprint …
                       NVFlare builds the kit from the participant's own key, the signed certificate
                       and the server's details (from the profile the project admin signed with)

The private key never leaves the request folder and the kit made from it: the request zip carries
the CSR, the signed zip the certificate and the root CA.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from fedllm.config.site_config import SiteConfig
from fedllm.errors import FedllmError
from fedllm.fileio import write_text
from fedllm.provision.certificates import check_kit_certificate
from fedllm.provision.provisioner import Kits, fedllm_builders

PROFILE_NAME = "project_profile.yaml"
# NVFlare's scheme for every kit fedllm makes (StaticFileBuilder's `scheme` in provision/templates).
SCHEME = "tcp"
# The admin roles NVFlare's distributed provisioning certifies; a project_admin can do anything on
# every site, and NVFlare issues that role only through central provisioning.
DISTRIBUTED_ROLES = ("org_admin", "lead", "member")
_MAX_REQUEST_JSON = 1 << 20

Kind = Literal["server", "site", "user"]


class DistributedProvisionError(FedllmError):
    """A step of distributed provisioning was refused; the message names what and the fix."""


@dataclass(frozen=True)
class Participant:
    """One entry of the site config as NVFlare's distributed provisioning names it."""

    name: str
    kind: Kind  # NVFlare's request kinds: the server, a site (client), or a user (admin)
    org: str
    role: str | None = None  # users only


@dataclass(frozen=True)
class CertificateAuthority:
    ca_dir: Path
    fingerprint: str  # SHA-256 of rootCA.pem, to hand to every participant out of band


@dataclass(frozen=True)
class Request:
    name: str
    request_dir: Path  # holds the private key: it stays with the participant
    request_zip: Path  # CSR and metadata only: what goes to the project admin


@dataclass(frozen=True)
class Signed:
    name: str
    signed_zip: Path  # certificate, root CA, server details: what goes back to the participant
    fingerprint: str
    valid_until: str


def _names(config: SiteConfig) -> str:
    admins = ", ".join(f"{a.name} ({a.role})" for a in config.admins)
    return f"server: {config.server.name}; sites: {', '.join(config.site_names)}; admins: {admins}"


def participant(config: SiteConfig, name: str) -> Participant:
    """The site config's participant `name`, or an error listing the names it holds."""
    if name == config.server.name:
        return Participant(name, "server", config.server.org)
    for site in config.sites:
        if site.name == name:
            return Participant(name, "site", site.org)
    for admin in config.admins:
        if admin.name == name:
            return Participant(name, "user", admin.org, admin.role)
    raise DistributedProvisionError(
        f"'{name}' is not a participant of project '{config.project}' ({_names(config)}). "
        "Fix: use one of those names, or add it to the site config (sites[] or admins[]) and share the new config"
    )


def project_profile(config: SiteConfig) -> dict[str, Any]:
    """NVFlare's project profile: what the project admin's signature tells every kit about the server."""
    server = config.server
    return {
        "name": config.project,
        "scheme": SCHEME,
        "connection_security": "mtls",
        "server": {"host": server.name, "fed_learn_port": server.fed_learn_port, "admin_port": server.admin_port},
    }


def participant_definition(config: SiteConfig, name: str, source: str, data_root: Path) -> dict[str, Any]:
    """NVFlare's participant definition for `nvflare cert request`: identity, and the Builders of its kit."""
    who = participant(config, name)
    entry: dict[str, Any] = {"name": who.name, "org": who.org}
    if who.kind == "server":
        entry |= {
            "type": "server",
            "fed_learn_port": config.server.fed_learn_port,
            "admin_port": config.server.admin_port,
        }
    elif who.kind == "site":
        entry["type"] = "client"
    else:
        if who.role not in DISTRIBUTED_ROLES:
            raise DistributedProvisionError(
                f"admin '{name}' has role {who.role}; NVFlare's distributed provisioning certifies only "
                f"{', '.join(DISTRIBUTED_ROLES)} (a project_admin may do anything on every site, so NVFlare issues "
                "that role only from central provisioning). Fix: give this admin role lead (submits jobs) or "
                "org_admin (operates its org's sites) in the site config, or use `fedllm provision` for a "
                "single-operator federation"
            )
        entry |= {"type": "admin", "role": who.role}
    # NVFlare's Builders as provision/templates/project.yml.j2 lists them, less SignatureBuilder: a kit
    # made from a signed zip carries no signature.json; its certificate and the root CA are the anchor.
    nvflare_builders = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
        {
            "path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
            "args": {"config_folder": "config", "scheme": SCHEME},
        },
        # `nvflare package` puts the participant's own key and signed certificate in its place.
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
    ]
    builders = nvflare_builders + fedllm_builders(config, source, data_root.resolve(), participant=name)
    return {"api_version": 3, "name": config.project, "participants": [entry], "builders": builders}


def _nvflare(args: list[str], what: str) -> dict[str, Any]:
    """Run one `nvflare` command with JSON output; its data, or its error as a DistributedProvisionError."""
    cmd = [sys.executable, "-m", "nvflare.cli", "--format", "json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    envelope: dict[str, Any] = {}
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            envelope = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if proc.returncode == 0 and envelope.get("status") == "ok":
        return envelope.get("data") or {}
    message = envelope.get("message") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
    detail = envelope.get("detail") or (envelope.get("data") or {}).get("detail")
    hint = envelope.get("hint")
    raise DistributedProvisionError(
        f"{what}: NVFlare refused ({envelope.get('error_code', f'exit {proc.returncode}')}): {message}"
        + (f" ({detail})" if detail else "")
        + (f" Fix: {hint}" if hint else "")
    )


def write_profile(config: SiteConfig, ca_dir: Path) -> Path:
    path = ca_dir / PROFILE_NAME
    write_text(path, yaml.safe_dump(project_profile(config), sort_keys=False))
    return path


def ca_fingerprint(ca_dir: Path) -> str:
    meta = ca_dir / "ca.json"
    if not meta.is_file():
        raise DistributedProvisionError(
            f"{ca_dir} holds no project CA (no ca.json). Fix: create it with `fedllm cert init -c <site config> "
            f"--ca-dir {ca_dir}`, or pass the CA folder you created"
        )
    return json.loads(meta.read_text(encoding="utf-8"))["rootCA_fingerprint"]


def init_ca(config: SiteConfig, ca_dir: Path, valid_days: int = 3650) -> CertificateAuthority:
    """The project admin's root CA (NVFlare's `cert init`), and the profile every signature carries."""
    ca_dir = ca_dir.resolve()
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.chmod(0o700)  # the root CA's private key: whoever reads it can sign any name
    profile = write_profile(config, ca_dir)
    _nvflare(
        ["cert", "init", "--profile", str(profile), "-o", str(ca_dir), "--valid-days", str(valid_days)],
        f"creating the root CA in {ca_dir}",
    )
    return CertificateAuthority(ca_dir, ca_fingerprint(ca_dir))


def request_certificate(
    config: SiteConfig, name: str, out_dir: Path, *, source: str, data_root: Path, force: bool = False
) -> Request:
    """At the participant: a private key and a certificate request for its entry in the site config."""
    definition = participant_definition(config, name, source, data_root)
    out_dir = out_dir.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "participant.yaml"
        path.write_text(yaml.safe_dump(definition, sort_keys=False), encoding="utf-8")
        data = _nvflare(
            ["cert", "request", "-p", str(path), "--out", str(out_dir), *(["--force"] if force else [])],
            f"requesting a certificate for '{name}'",
        )
    return Request(name, out_dir, Path(data["request_zip"]))


def read_request(request_zip: Path) -> dict[str, Any]:
    """The metadata of a request zip (NVFlare's request.json), read without extracting anything."""
    try:
        with zipfile.ZipFile(request_zip) as zf:
            info = zf.getinfo("request.json")
            if info.file_size > _MAX_REQUEST_JSON:
                raise DistributedProvisionError(f"{request_zip}: request.json is {info.file_size} bytes; not a request")
            meta = json.loads(zf.read(info))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DistributedProvisionError(
            f"{request_zip} is not a certificate request ({exc}). Fix: pass the <name>.request.zip that "
            "`fedllm cert request` wrote at the participant"
        ) from None
    if not isinstance(meta, dict):
        raise DistributedProvisionError(f"{request_zip}: request.json is not a mapping; not a certificate request")
    return meta


def check_request(config: SiteConfig, request_zip: Path, source: str = "the site config") -> Participant:
    """The participant a request asks a certificate for, if the site config holds it exactly so."""
    meta = read_request(request_zip)
    name, kind, org = meta.get("name"), meta.get("kind"), meta.get("org")
    refused = f"{request_zip.name}: refused, nothing was signed:"
    if meta.get("project") != config.project:
        raise DistributedProvisionError(
            f"{refused} the request is for project '{meta.get('project')}', {source} is project '{config.project}'. "
            "Fix: sign it with that project's CA and site config, or ask the requester to use this site config"
        )
    try:
        expected = participant(config, str(name))
    except DistributedProvisionError:
        raise DistributedProvisionError(
            f"{refused} '{name}' is not in {source} ({_names(config)}). Fix: if '{name}' is to join, add it to the "
            "site config (sites[] or admins[]), share the new config with the participants, and sign again; "
            "otherwise turn the request down"
        ) from None
    if kind != expected.kind:
        raise DistributedProvisionError(
            f"{refused} '{name}' asks for a {kind} certificate, but in {source} it is the {expected.kind}. "
            f"Fix: the requester runs `fedllm cert request --name {name}` with this site config"
        )
    if org != expected.org:
        raise DistributedProvisionError(
            f"{refused} '{name}' asks for org '{org}', but {source} gives it org '{expected.org}' (the org in the "
            "certificate decides which admins may operate it). Fix: correct the org in the site config or "
            f"the requester's copy of it, and request again"
        )
    if expected.kind == "user" and meta.get("cert_role") != expected.role:
        raise DistributedProvisionError(
            f"{refused} '{name}' asks for role {meta.get('cert_role')}, but {source} gives it role {expected.role}. "
            "Fix: change the role in the site config if it is meant, then request again with that config"
        )
    return expected


def sign_request(
    config: SiteConfig,
    request_zip: Path,
    ca_dir: Path,
    *,
    out: Path | None = None,
    valid_days: int = 1095,
    force: bool = False,
    source: str = "the site config",
) -> Signed:
    """At the project admin: sign a request for a participant the site config holds (NVFlare's `cert approve`)."""
    request_zip = request_zip.resolve()
    who = check_request(config, request_zip, source)
    ca_dir = ca_dir.resolve()
    fingerprint = ca_fingerprint(ca_dir)
    profile = write_profile(config, ca_dir)
    signed_zip = (out or request_zip.with_name(f"{who.name}.signed.zip")).resolve()
    args = ["cert", "approve", str(request_zip), "-c", str(ca_dir), "--profile", str(profile)]
    args += ["--out", str(signed_zip), "--valid-days", str(valid_days), *(["--force"] if force else [])]
    data = _nvflare(args, f"signing the request of '{who.name}'")
    if data.get("rootca_fingerprint_sha256") != fingerprint:  # NVFlare signed with the CA it found in ca_dir
        raise DistributedProvisionError(f"{ca_dir}: ca.json does not match rootCA.pem; restore the CA folder")
    with zipfile.ZipFile(signed_zip) as zf:
        valid_until = json.loads(zf.read("signed.json"))["certificate"]["valid_until"]
    return Signed(who.name, signed_zip, fingerprint, valid_until)


def package_kit(signed_zip: Path, request_dir: Path, workspace: Path, fingerprint: str, *, force: bool = False) -> Path:
    """At the participant: its startup kit from its own key and the signed zip (NVFlare's `nvflare package`)."""
    args = ["package", str(signed_zip.resolve()), "--request-dir", str(request_dir.resolve())]
    args += ["-w", str(workspace.resolve()), "--fingerprint", fingerprint, *(["--force"] if force else [])]
    data = _nvflare(args, f"packaging {signed_zip.name}")
    kit = Path(data["output_dir"])
    check_kit_certificate(kit)
    return kit


def assemble_kits(config: SiteConfig, kit_dirs: Mapping[str, Path]) -> Kits:
    """A one-machine view of kits packaged in separate workspaces (tests, demos): each stays where it is."""
    needed = [config.server.name, *config.site_names, config.admin.name]
    missing = [n for n in needed if n not in kit_dirs]
    if missing:
        raise DistributedProvisionError(
            f"no kit given for {', '.join(missing)} (need the server, every site and {config.admin.name})"
        )
    for name, kit in kit_dirs.items():
        cert = check_kit_certificate(kit)
        if cert.common_name != name:
            raise DistributedProvisionError(f"{kit} is the kit of '{cert.common_name}', not of '{name}'")
    return Kits(kit_dirs[config.server.name].parent, config, elsewhere=dict(kit_dirs))
