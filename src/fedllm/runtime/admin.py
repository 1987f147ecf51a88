"""The admin's side of a federation, through NVFlare's FLARE API and the admin startup kit.

One place opens admin sessions so that every caller closes them: an unclosed FLARE API
session keeps non-daemon threads alive and the process never exits.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nvflare.fuel.flare_api.flare_api import Session, new_secure_session

from fedllm.errors import FedllmError
from fedllm.provision import Kits
from fedllm.provision.certificates import check_kit_certificate

# How long to keep trying to reach the admin port before declaring the server unreachable.
CONNECT_TIMEOUT_S = 30.0


class AdminError(FedllmError):
    """The admin session could not do what was asked; the message says what to check."""


@dataclass(frozen=True)
class AdminKit:
    """One admin's startup kit on its own, without the site config (e.g. in the admin container)."""

    path: Path
    username: str

    @classmethod
    def open(cls, path: Path, username: str | None = None) -> AdminKit:
        """The kit at `path`; the user name defaults to the kit certificate's CN (what the server checks)."""
        conf = path / "startup" / "fed_admin.json"
        if not conf.is_file():
            raise AdminError(
                f"{path} is not an admin startup kit (no startup/fed_admin.json); pass the admin's kit folder"
            )
        return cls(path, username or _cert_common_name(path / "startup" / "client.crt"))

    def server_address(self) -> str:
        admin = json.loads((self.path / "startup" / "fed_admin.json").read_text()).get("admin", {})
        return f"{admin.get('host', '?')}:{admin.get('port', '?')}"


def _cert_common_name(cert: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if not cert.is_file():
        raise AdminError(f"{cert} is missing; pass the admin's kit folder or its user name (FEDLLM_ADMIN_USER)")
    names = x509.load_pem_x509_certificate(cert.read_bytes()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value)


def _admin_kit(kits: Kits | AdminKit) -> tuple[AdminKit, str]:
    if isinstance(kits, AdminKit):
        return kits, kits.server_address()
    kit = AdminKit(kits.admin(kits.config.admin.name), kits.config.admin.name)
    return kit, f"{kits.config.server.name}:{kits.config.server.admin_port}"


@contextlib.contextmanager
def _quiet_flare() -> Iterator[None]:
    """NVFlare's prints and log records while a session connects: what fails is said in AdminError instead."""
    flare = logging.getLogger("nvflare")
    level = flare.level
    flare.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        flare.setLevel(level)


@contextlib.contextmanager
def admin_session(kits: Kits | AdminKit, timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Session]:
    """Open an mTLS admin session with the project admin's kit (or the given admin kit) and always close it."""
    kit, address = _admin_kit(kits)
    admin = kit.username
    if not (kit.path / "startup" / "fed_admin.json").is_file():
        raise AdminError(f"admin kit {kit.path} is incomplete (no startup/fed_admin.json); re-run `fedllm provision`")
    check_kit_certificate(kit.path)  # an expired one fails the login with no reason given
    try:
        with _quiet_flare():  # FLARE prints "Connecting to FLARE ..." and logs every failed connection attempt
            session = new_secure_session(admin, str(kit.path.absolute()), timeout=timeout)
    except Exception as exc:  # FLARE raises several unrelated types for "cannot reach / cannot log in"
        raise AdminError(
            f"cannot open an admin session to {address} as {admin} ({exc}); "
            "is the federation up (`fedllm up` / `docker compose up`) and was it provisioned from this config?"
        ) from exc
    try:
        yield session
    finally:
        with contextlib.suppress(Exception):
            session.close()


def connected_sites(session: Session) -> set[str]:
    return {c.name for c in session.get_connected_client_list()}


def wait_for_sites(
    session: Session,
    sites: list[str],
    timeout: float,
    check: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> set[str]:
    """Poll the server until every site in `sites` is registered; `check()` may raise early."""
    deadline = time.monotonic() + timeout
    wanted = set(sites)
    while True:
        present = connected_sites(session)
        if wanted <= present:
            return present
        if check is not None:
            check()
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(wanted - present))
            raise AdminError(f"sites not registered after {timeout:.0f}s: {missing}; see their logs")
        time.sleep(poll_s)
