"""What a startup kit's certificate says: who it names, for which org and role, until when, signed by whom.

NVFlare checks certificates during the TLS handshake and at registration, where an expired one shows
up as a retried connection; fedllm reads them first so that a kit whose certificate has expired, or
does not chain to the kit's root CA, is refused before anything starts, with the fix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fedllm.errors import FedllmError

# The certificate file in a kit's startup/ folder, by kind of kit (NVFlare's names).
CERT_FILES = ("server.crt", "client.crt")


class CertificateError(FedllmError):
    """A kit's certificate cannot be used; the message names the kit, the problem and the fix."""


@dataclass(frozen=True)
class KitCertificate:
    path: Path
    common_name: str
    org: str
    role: str
    not_before: dt.datetime
    not_after: dt.datetime
    public_key_sha256: str
    issuer: str


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def public_key_sha256(key) -> str:
    """SHA-256 of a public key's DER form: the same for a private key, its CSR and its certificate."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def kit_certificate_path(kit: Path) -> Path:
    for name in CERT_FILES:
        if (kit / "startup" / name).is_file():
            return kit / "startup" / name
    raise CertificateError(
        f"{kit}/startup has no certificate ({' or '.join(CERT_FILES)}); it is not a startup kit. "
        "Fix: point at the kit folder `fedllm provision` or `fedllm package` wrote"
    )


def read_certificate(path: Path) -> KitCertificate:
    return _describe(path, x509.load_pem_x509_certificate(path.read_bytes()))


def _describe(path: Path, cert: x509.Certificate) -> KitCertificate:
    return KitCertificate(
        path=path,
        common_name=_attr(cert.subject, NameOID.COMMON_NAME),
        org=_attr(cert.subject, NameOID.ORGANIZATION_NAME),
        role=_attr(cert.subject, NameOID.UNSTRUCTURED_NAME),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        public_key_sha256=public_key_sha256(cert.public_key()),
        issuer=_attr(cert.issuer, NameOID.COMMON_NAME),
    )


def check_kit_certificate(kit: Path, now: dt.datetime | None = None) -> KitCertificate:
    """The kit's certificate if it can be used now; CertificateError naming the kit and the fix otherwise."""
    path = kit_certificate_path(kit)
    leaf = x509.load_pem_x509_certificate(path.read_bytes())
    cert = _describe(path, leaf)
    now = now or dt.datetime.now(dt.timezone.utc)
    renew = (
        f"Fix: at the participant, `fedllm cert request --name {cert.common_name} --force`; at the project admin, "
        "`fedllm cert sign`; at the participant, `fedllm package --force` (distributed kits), or re-run "
        "`fedllm provision` (central kits)"
    )
    if cert.not_after <= now:
        raise CertificateError(
            f"the certificate of '{cert.common_name}' ({path}) expired at {cert.not_after:%Y-%m-%d %H:%M:%S} UTC; "
            f"the server refuses it. {renew}"
        )
    if cert.not_before > now:
        raise CertificateError(
            f"the certificate of '{cert.common_name}' ({path}) is valid only from "
            f"{cert.not_before:%Y-%m-%d %H:%M:%S} UTC; check this machine's clock. {renew}"
        )
    root_path = kit / "startup" / "rootCA.pem"
    root = x509.load_pem_x509_certificate(root_path.read_bytes())
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            f"the certificate of '{cert.common_name}' ({path}) is not signed by the kit's root CA ({root_path}): "
            f"{str(exc) or type(exc).__name__}. Fix: package the kit again from the signed zip the project admin returned"
        ) from None
    return cert
