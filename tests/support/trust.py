"""Test helpers for certificates and identities: where private keys are, a TLS probe, an expired certificate,
NVFlare's admin console driven through its stdin."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nvflare.lighter.utils import Identity, generate_cert

from fedllm.provision.certificates import public_key_sha256

_KEY_MARKER = b"PRIVATE KEY-----"
# Bigger files are job results and logs, not PEM keys.
_MAX_SCANNED = 4 << 20


@dataclass(frozen=True)
class FoundKey:
    path: Path
    public_key_sha256: str


def private_keys_under(root: Path) -> list[FoundKey]:
    """Every file under `root` holding a PEM private key, with the fingerprint of the key it holds."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_SCANNED:
                continue
            data = path.read_bytes()
            if _KEY_MARKER not in data:
                continue
            start = data.index(b"-----BEGIN")
            key = serialization.load_pem_private_key(data[start:], password=None)
            found.append(FoundKey(path, public_key_sha256(key.public_key())))
    return found


def cert_public_key(path: Path) -> str:
    return public_key_sha256(x509.load_pem_x509_certificate(path.read_bytes()).public_key())


def csr_public_key(path: Path) -> str:
    return public_key_sha256(x509.load_pem_x509_csr(path.read_bytes()).public_key())


def sign_with_validity(
    ca_dir: Path, csr_path: Path, org: str, role: str, not_before: dt.datetime, not_after: dt.datetime
) -> bytes:
    """A certificate for a CSR, signed by the project's root CA with the given validity (e.g. one in the past).

    NVFlare's `cert approve` signs for at least a day from now; this is the project admin's CA key
    signing the same request with an older validity, to get a genuinely expired certificate.
    """
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "rootCA.key").read_bytes(), password=None)
    root = x509.load_pem_x509_certificate((ca_dir / "rootCA.pem").read_bytes())
    cn = csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    issuer = root.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    cert = generate_cert(
        Identity(cn, org, role),
        Identity(issuer),
        ca_key,
        csr.public_key(),
        not_valid_before=not_before,
        not_valid_after=not_after,
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def tls_outcome(root_ca: Path, cert: Path | None, key: Path | None, server_name: str, port: int) -> str:
    """Connect to a server port (NVFlare's tcp driver behind TLS) with a client certificate, or none.

    The server speaks only after a framed request, so an accepted client sees silence: "open".
    TLS 1.3 checks the client certificate after the client's side of the handshake, so a refused
    client learns it on its first read, as an alert ("refused: <reason>") or a closed connection.
    """
    ctx = ssl.create_default_context(cafile=str(root_ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("localhost", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.settimeout(5)
                data = tls.recv(200)
        except TimeoutError:
            return "open"
        except ssl.SSLError as exc:
            return f"refused: {exc.reason}"
        except ConnectionError as exc:
            return f"refused: {exc!r}"
        return "refused: connection closed" if data == b"" else f"answered: {data!r}"


def admin_console(kit: Path, lines: list[str], timeout: float = 90) -> str:
    """NVFlare's admin console (the kit's startup/fl_admin.sh) fed `lines` on stdin; everything it printed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(kit / "startup" / "fl_admin.sh")],
        input="\n".join([*lines, "bye", ""]),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=kit,
    )
    return proc.stdout + proc.stderr
