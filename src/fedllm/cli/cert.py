"""`fedllm cert init | request | sign` and `fedllm package`: distributed provisioning (each site keeps its key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import DEFAULT_WORKSPACE, ConfigOpt, WorkspaceOpt, console, done, load_config
from fedllm.config.problems import display_path

app = typer.Typer(
    help="Distributed provisioning: participants make their own keys, the project admin signs (NVFlare's `nvflare cert`).",
    no_args_is_help=True,
)

CaDirOpt = Annotated[
    Path | None,
    typer.Option("--ca-dir", help="The project admin's CA folder (default: WORKSPACE/<project>/ca). Keep it private."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace what an earlier run wrote (key rotation).")]


def _ca_dir(ca_dir: Path | None, workspace: Path, project: str) -> Path:
    return ca_dir or workspace / project / "ca"


@app.command()
def init(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    ca_dir: CaDirOpt = None,
    valid_days: Annotated[int, typer.Option(min=1, help="Validity of the root CA in days.")] = 3650,
) -> None:
    """Project admin: create the project's root CA (once per federation)."""
    from fedllm.provision.distributed import init_ca

    cfg, _ = load_config(config)
    ca = init_ca(cfg, _ca_dir(ca_dir, workspace, cfg.project), valid_days=valid_days)
    done("root CA", f" for project '{cfg.project}' in {display_path(ca.ca_dir)} (keep rootCA.key private)")
    console.print(f"  fingerprint: {ca.fingerprint}")
    console.print("  give the fingerprint to every participant out of band (not with the signed zips)")


@app.command()
def request(
    name: Annotated[
        str,
        typer.Option("--name", "--site", "-n", help="The participant: a site, the server or an admin of the config."),
    ],
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    out: Annotated[
        Path | None, typer.Option(help="Request folder; holds the private key (default: WORKSPACE/requests/NAME).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Participant: make a private key and a certificate request from its entry in the site config."""
    from fedllm.provision.distributed import request_certificate

    cfg, path = load_config(config)
    req = request_certificate(
        cfg, name, out or workspace / "requests" / name, source=display_path(path), data_root=Path.cwd(), force=force
    )
    done("requested", f" a certificate for '{name}'")
    console.print(f"  private key: {display_path(req.request_dir / f'{name}.key')} (stays here)")
    console.print(f"  send {display_path(req.request_zip)} to the project admin")


@app.command()
def sign(
    request_zip: Annotated[Path, typer.Argument(help="A <name>.request.zip from `fedllm cert request`.")],
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    ca_dir: CaDirOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Signed zip (default: <name>.signed.zip next to the request).")
    ] = None,
    valid_days: Annotated[int, typer.Option(min=1, help="Validity of the certificate in days.")] = 1095,
    force: ForceOpt = False,
) -> None:
    """Project admin: sign a request, only for a name, kind, org and role the site config holds."""
    from fedllm.provision.distributed import sign_request

    cfg, path = load_config(config)
    signed = sign_request(
        cfg,
        request_zip,
        _ca_dir(ca_dir, workspace, cfg.project),
        out=out,
        valid_days=valid_days,
        force=force,
        source=display_path(path),
    )
    done("signed", f" '{signed.name}' until {signed.valid_until}")
    console.print(
        f"  return {display_path(signed.signed_zip)} to '{signed.name}'; root CA fingerprint {signed.fingerprint}"
    )


def _signed_name(signed_zip: Path) -> str:
    """The participant a signed zip is for (its request folder's name), read without trusting the zip."""
    from fedllm.provision.distributed import signed_participant

    return signed_participant(signed_zip) or signed_zip.name.removesuffix(".signed.zip")


def package(
    signed_zip: Annotated[Path, typer.Argument(help="The <name>.signed.zip the project admin returned.")],
    fingerprint: Annotated[
        str,
        typer.Option(
            help="The root CA's SHA-256 fingerprint, as the project admin gave it out of band "
            "(SHA256:AA:BB:…; lower case, without colons or OpenSSL's form are taken too)."
        ),
    ],
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
    request_dir: Annotated[
        Path | None, typer.Option(help="The request folder with the private key (default: WORKSPACE/requests/NAME).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Participant: build its startup kit from its own key, the signed certificate and the server's details."""
    from fedllm.provision.certificates import kit_certificate_path, read_certificate
    from fedllm.provision.distributed import package_kit

    name = _signed_name(signed_zip)
    kit = package_kit(signed_zip, request_dir or workspace / "requests" / name, workspace, fingerprint, force=force)
    cert = read_certificate(kit_certificate_path(kit))
    done("packaged", f" {display_path(kit)} (certificate valid until {cert.not_after:%Y-%m-%d})")
    if (kit / "compose" / "compose.yaml").is_file():
        console.print(f"  containers: cd {display_path(kit / 'compose')} && docker compose up -d")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="cert")
    root.command()(package)
