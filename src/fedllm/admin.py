"""The admin's side of a federation, through NVFlare's FLARE API and the admin startup kit.

One place opens admin sessions so that every caller closes them: an unclosed FLARE API
session keeps non-daemon threads alive and the process never exits.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator

from nvflare.fuel.flare_api.flare_api import Session, new_secure_session

from fedllm.errors import FedllmError
from fedllm.provision import Kits

# How long to keep trying to reach the admin port before declaring the server unreachable.
CONNECT_TIMEOUT_S = 30.0


class AdminError(FedllmError):
    """The admin session could not do what was asked; the message says what to check."""


@contextlib.contextmanager
def admin_session(kits: Kits, timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Session]:
    """Open an mTLS admin session with the project admin's kit and always close it."""
    admin = kits.config.admin.name
    kit = kits.admin(admin)
    if not (kit / "startup" / "fed_admin.json").is_file():
        raise AdminError(f"admin kit {kit} is incomplete (no startup/fed_admin.json); re-run `fedllm provision`")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # FLARE prints "Connecting to FLARE ..."
            session = new_secure_session(admin, str(kit), timeout=timeout)
    except Exception as exc:  # FLARE raises several unrelated types for "cannot reach / cannot log in"
        server = kits.config.server
        raise AdminError(
            f"cannot open an admin session to {server.name}:{server.admin_port} as {admin} ({exc}); "
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
