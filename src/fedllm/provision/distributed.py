"""Distributed provisioning: every participant makes its own key, the project admin only signs.

Beside the central `fedllm provision` (one operator makes every kit, keys included), for federations
that span organizations. Built on NVFlare's own commands (`nvflare cert init | request | approve`,
`nvflare package`, run in this process through their Python handlers); fedllm adds what the site
config knows:

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

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from fedllm.config.problems import clip
from fedllm.config.site_config import SiteConfig
from fedllm.errors import FedllmError
from fedllm.fileio import atomic_path, write_text
from fedllm.provision.certificates import check_kit_certificate
from fedllm.provision.provisioner import Kits, fedllm_builders

PROFILE_NAME = "project_profile.yaml"
# NVFlare's scheme for every kit fedllm makes (StaticFileBuilder's `scheme` in provision/templates).
SCHEME = "tcp"
# The admin roles NVFlare's distributed provisioning certifies; a project_admin can do anything on
# every site, and NVFlare issues that role only through central provisioning.
DISTRIBUTED_ROLES = ("org_admin", "lead", "member")
_MAX_REQUEST_JSON = 1 << 20
# What may name a participant (a site, the server's host name, an admin's e-mail): also a folder name.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,253}")

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
    """Run one of NVFlare's `cert` / `package` commands in this process; its result, or its error as ours.

    NVFlare 2.9's Python entry points for distributed provisioning are the handlers its CLI dispatches
    to (`handle_cert_cmd`, `handle_package_cmd`), given the arguments its own parsers make. They report
    only through `nvflare.tool.cli_output`: in JSON mode one envelope (`status`, `data` or `error_code`,
    `message`, `hint`), and `sys.exit` on an error. So they run with JSON output into memory, and
    anything they raise becomes the same kind of refusal (as `nvflare`'s own `INTERNAL_ERROR`).
    """
    from nvflare.tool import cli_output
    from nvflare.tool.cert.cert_cli import def_cert_cli_parser, handle_cert_cmd
    from nvflare.tool.package.package_cli import def_package_cli_parser, handle_package_cmd

    parser = argparse.ArgumentParser(prog="nvflare")
    commands = parser.add_subparsers(dest="sub_command")
    def_cert_cli_parser(commands)
    def_package_cli_parser(commands)
    handlers = {"cert": handle_cert_cmd, "package": handle_package_cmd}
    out, err = io.StringIO(), io.StringIO()
    output_format = "json" if cli_output.is_json_mode() else "jsonl" if cli_output.is_jsonl_mode() else "txt"
    argv, status, failure = sys.argv, None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            namespace = parser.parse_args(args)
            sys.argv = ["nvflare", *args]  # the handlers look there for --schema
            cli_output.set_output_format("json")
            status = handlers[args[0]](namespace)
    except SystemExit as exc:
        status = exc.code
    except FedllmError:
        raise
    except Exception as exc:  # NVFlare raised instead of reporting: still its refusal, not a crash
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        sys.argv = argv
        cli_output.set_output_format(output_format)
    envelope = _envelope(out.getvalue())
    if failure is None and status in (0, None) and envelope.get("status") == "ok":
        return envelope.get("data") or {}
    message = failure or envelope.get("message") or _last_line(err.getvalue()) or f"exit status {status}"
    detail = envelope.get("detail") or (envelope.get("data") or {}).get("detail")
    if envelope.get("error_code") == "BUILD_FAILED":  # a Builder raised; NVFlare printed its traceback
        detail = detail or _last_line(err.getvalue())
    hint = envelope.get("hint")
    code = envelope.get("error_code") or ("INTERNAL_ERROR" if failure else f"exit {status}")
    raise DistributedProvisionError(
        f"{what}: NVFlare refused ({code}): {message}"
        + (f" ({detail})" if detail else "")
        + (f" Fix: {hint}" if hint else "")
    )


def _envelope(output: str) -> dict[str, Any]:
    """The last JSON envelope in what an NVFlare handler printed (Builders may print lines of their own)."""
    for line in reversed(output.strip().splitlines()):
        try:
            envelope = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(envelope, dict) and "status" in envelope:
            return envelope
    return {}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


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
    try:
        fingerprint = json.loads(meta.read_bytes())["rootCA_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fingerprint = f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(fingerprint, str) or not fingerprint.startswith("SHA256:"):
        raise DistributedProvisionError(
            f"{meta} names no root CA fingerprint ({str(fingerprint)[:80]}). Fix: restore the CA folder from its "
            "backup; `fedllm cert init` made it"
        )
    return fingerprint


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


def _zip_json(archive: Path, member: str) -> Any:
    """One small JSON member of a zip, read without extracting anything; ValueError for anything wrong with it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(member)
            if info.file_size > _MAX_REQUEST_JSON:
                raise ValueError(f"{member} is {info.file_size} bytes")
            return json.loads(zf.read(info))
    except KeyError:
        raise ValueError(f"it holds no {member}") from None
    # A damaged zip fails in many ways: bad headers, CRCs, compression data, encryption, truncation.
    except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None


def read_request(request_zip: Path) -> dict[str, Any]:
    """The metadata of a request zip (NVFlare's request.json), read without extracting anything."""
    try:
        meta = _zip_json(request_zip, "request.json")
    except ValueError as exc:
        raise DistributedProvisionError(
            f"{request_zip} is not a certificate request ({exc}). Fix: pass the <name>.request.zip that "
            "`fedllm cert request` wrote at the participant"
        ) from None
    if not isinstance(meta, dict):
        raise DistributedProvisionError(f"{request_zip}: request.json is not a mapping; not a certificate request")
    return meta


def signed_participant(signed_zip: Path) -> str | None:
    """The participant name a signed zip's signed.json gives, if it is a name at all (NVFlare checks the rest)."""
    try:
        meta = _zip_json(signed_zip, "signed.json")
    except ValueError:
        return None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and _NAME_RE.fullmatch(name) and ".." not in name else None


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
    if signed_zip.exists() and not force:
        raise DistributedProvisionError(
            f"{signed_zip} exists: '{who.name}' was signed before. Fix: pass --force to sign again and replace it "
            "(a new certificate for a renewed request), or --out another path"
        )
    # NVFlare writes beside it; the signed zip appears whole and checked, or not at all (an older one stays).
    with atomic_path(signed_zip) as staged:
        args = ["cert", "approve", str(request_zip), "-c", str(ca_dir), "--profile", str(profile)]
        args += ["--out", str(staged), "--valid-days", str(valid_days)]
        data = _nvflare(args, f"signing the request of '{who.name}'")
        if data.get("rootca_fingerprint_sha256") != fingerprint:  # NVFlare signed with the CA it found in ca_dir
            raise DistributedProvisionError(f"{ca_dir}: ca.json does not match rootCA.pem; restore the CA folder")
        with zipfile.ZipFile(staged) as zf:
            valid_until = json.loads(zf.read("signed.json"))["certificate"]["valid_until"]
    return Signed(who.name, signed_zip, fingerprint, valid_until)


def normalize_fingerprint(value: str) -> str:
    """A root CA fingerprint as pasted, in NVFlare's form (`SHA256:AA:BB:…`); an error naming the forms taken.

    NVFlare's own normalization takes `SHA256:AA:BB:…`, `SHA256=…`, OpenSSL's `sha256 Fingerprint=AA:BB:…`
    and 64 hex digits, in either case; whitespace a terminal or an e-mail put inside it is dropped.
    """
    from nvflare.tool.cert.fingerprint import normalize_sha256_fingerprint

    normalized = normalize_sha256_fingerprint(value) or normalize_sha256_fingerprint("".join(value.split()))
    if not normalized:
        raise DistributedProvisionError(
            f"--fingerprint {clip(repr(value), 100)} is not a SHA-256 fingerprint. Fix: paste the root CA fingerprint the project "
            "admin gave you, as `fedllm cert init` printed it (SHA256:AA:BB:… with 32 pairs; lower case, no colons "
            "or OpenSSL's `sha256 Fingerprint=…` are taken too)"
        )
    return normalized


def package_kit(signed_zip: Path, request_dir: Path, workspace: Path, fingerprint: str, *, force: bool = False) -> Path:
    """At the participant: its startup kit from its own key and the signed zip (NVFlare's `nvflare package`)."""
    args = ["package", str(signed_zip.resolve()), "--request-dir", str(request_dir.resolve())]
    args += ["-w", str(workspace.resolve()), f"--fingerprint={normalize_fingerprint(fingerprint)}"]
    data = _nvflare([*args, *(["--force"] if force else [])], f"packaging {signed_zip.name}")
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
