"""The native runtime refuses to start when it cannot work, saying why and what to do."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedllm.config import load_site_config
from fedllm.provision import provision
from fedllm.runtime import native
from tests.support.sites import local_config_dict, write_yaml


def _kits(tmp_path: Path, **server):
    data = local_config_dict()
    data["server"].update(server)
    return provision(load_site_config(write_yaml(tmp_path / "s.yaml", data)), tmp_path / "ws", source="s.yaml")


def test_port_in_use(tmp_path: Path) -> None:
    kits = _kits(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", kits.config.server.fed_learn_port))
        busy.listen()
        with pytest.raises(
            native.NativeRuntimeError, match=f"port {kits.config.server.fed_learn_port} is already in use"
        ):
            native.up(kits, echo=lambda _m: None)
    assert native.read_state(kits) == []


def test_port_held_by_a_connection_to_itself_is_explained(tmp_path: Path) -> None:
    """What a same-machine site can do to a stopped server's port in the ephemeral range (seen in CI):
    its retry picks the server's port as its source port and connects to itself. The error says so."""
    import os

    kits = _kits(tmp_path)
    port = kits.config.server.fed_learn_port
    with socket.socket() as dialer:
        dialer.bind(("127.0.0.1", port))
        dialer.connect(("127.0.0.1", port))  # TCP simultaneous open: a connection to itself
        with pytest.raises(native.NativeRuntimeError) as raised:
            native.up(kits, echo=lambda _m: None)
    assert f"port {port} is already in use by a connection of pid {os.getpid()} (" in str(raised.value)
    assert "to itself" in str(raised.value) and "below the ephemeral range" in str(raised.value)


def test_test_federations_take_ports_below_the_ephemeral_range() -> None:
    from tests.support.sites import free_port_range, free_ports

    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = free_ports(6)
    assert len(set(ports)) == 6 and max(ports) < low
    first, last = map(int, free_port_range(avoiding=ports).split("-"))
    assert last < low and not any(first <= p <= last for p in ports)


def test_server_name_that_does_not_resolve(tmp_path: Path) -> None:
    kits = _kits(tmp_path, name="fl-server.invalid")
    with pytest.raises(native.NativeRuntimeError, match="does not resolve"):
        native.up(kits, echo=lambda _m: None)


def test_down_when_nothing_runs(tmp_path: Path) -> None:
    messages: list[str] = []
    kits = _kits(tmp_path)
    native.down(kits, echo=messages.append)
    assert messages == [f"nothing runs natively from {kits.prod_dir.parent}"]


def test_a_site_whose_certificate_another_ca_signed_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from fedllm.provision.certificates import CertificateError

    kits = _kits(tmp_path / "here")
    foreign = _kits(tmp_path / "elsewhere")  # the same names, another root CA
    for name in ("client.crt", "client.key"):
        (kits.site("site-2") / "startup" / name).write_bytes((foreign.site("site-2") / "startup" / name).read_bytes())
    with pytest.raises(CertificateError, match=r"certificate of 'site-2' .* is not signed by the kit's root CA"):
        native.up(kits, echo=lambda _m: None)
    assert native.read_state(kits) == []
