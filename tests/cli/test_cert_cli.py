"""`fedllm cert init | request | sign` and `fedllm package`: the distributed path as users type it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from fedllm.cli.main import main
from tests.support.sites import local_config_dict, write_yaml


def test_each_party_runs_its_own_step_and_a_foreign_name_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NVFlare's audit records
    config = write_yaml(tmp_path / "site.yaml", local_config_dict(project="fedcli"))
    admin_ws, site_ws = tmp_path / "project-admin", tmp_path / "site-1"

    assert main(["cert", "init", "-c", str(config), "-w", str(admin_ws)]) == 0
    fingerprint = json.loads((admin_ws / "fedcli" / "ca" / "ca.json").read_text())["rootCA_fingerprint"]
    assert fingerprint in "".join(capsys.readouterr().out.split())  # whatever the terminal width wrapped

    assert main(["cert", "request", "-c", str(config), "--site", "site-1", "-w", str(site_ws)]) == 0
    request_zip = site_ws / "requests" / "site-1" / "site-1.request.zip"
    assert f"send {request_zip}" in capsys.readouterr().out.replace("\n", "")

    signed_zip = admin_ws / "outbox" / "site-1.signed.zip"
    args = ["cert", "sign", str(request_zip), "-c", str(config), "-w", str(admin_ws), "--out", str(signed_zip)]
    assert main(args) == 0
    assert "signed 'site-1' until" in capsys.readouterr().out

    assert main(["package", str(signed_zip), "--fingerprint", fingerprint, "-w", str(site_ws)]) == 0
    out = capsys.readouterr().out
    kit = site_ws / "fedcli" / "prod_00" / "site-1"
    assert "packaged" in out and (kit / "startup" / "client.key").is_file() and "docker compose up -d" in out

    # A requester whose copy of the config has a site the project admin's does not.
    rogue = local_config_dict(project="fedcli")
    rogue["sites"].append({"name": "site-9"})
    rogue_config = write_yaml(tmp_path / "rogue.yaml", rogue)
    assert main(["cert", "request", "-c", str(rogue_config), "-n", "site-9", "-w", str(tmp_path / "site-9")]) == 0
    capsys.readouterr()
    rogue_zip = tmp_path / "site-9" / "requests" / "site-9" / "site-9.request.zip"
    assert main(["cert", "sign", str(rogue_zip), "-c", str(config), "-w", str(admin_ws)]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert "site-9.request.zip: refused, nothing was signed: 'site-9' is not in" in err and "Fix:" in err
    assert not rogue_zip.with_name("site-9.signed.zip").exists()


FINGERPRINT = re.compile(r"SHA256:\S+")


def rich_default(text: str) -> str:
    """`text` as a Rich console with its defaults prints it: `:AB:` and `:CD:` are emoji codes (🆎, 💿)."""
    console = Console(file=io.StringIO(), width=500)
    console.print(text)
    return console.file.getvalue().rstrip("\n")


def test_a_printed_fingerprint_pastes_into_package_even_when_it_holds_emoji_codes(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = write_yaml(tmp_path / "site.yaml", local_config_dict(project="fedemoji"))
    # New root CAs until Rich's defaults would mangle the fingerprint (about one in nine; 150 tries miss
    # with odds of ~3e-8).
    printed: list[str] = []
    for attempt in range(150):
        admin_ws = tmp_path / f"project-admin-{attempt}"
        assert main(["cert", "init", "-c", str(config), "-w", str(admin_ws)]) == 0
        printed.append(FINGERPRINT.findall(capsys.readouterr().out)[0])
        if rich_default(printed[-1]) != printed[-1]:
            break
    else:
        pytest.fail(f"no fingerprint holding an emoji code in 150 root CAs: {printed}")
    fingerprint = printed[-1]
    assert fingerprint == json.loads((admin_ws / "fedemoji" / "ca" / "ca.json").read_text())["rootCA_fingerprint"]

    site_ws = tmp_path / "site-1"
    assert main(["cert", "request", "-c", str(config), "--site", "site-1", "-w", str(site_ws)]) == 0
    request_zip = site_ws / "requests" / "site-1" / "site-1.request.zip"
    capsys.readouterr()
    assert main(["cert", "sign", str(request_zip), "-c", str(config), "-w", str(admin_ws)]) == 0
    assert FINGERPRINT.findall(capsys.readouterr().out) == [fingerprint]
    signed_zip = request_zip.with_name("site-1.signed.zip")

    # Another CA's fingerprint: refused, both fingerprints shown as they are.
    other = printed[0] if len(printed) > 1 else FINGERPRINT.findall(_init(config, tmp_path / "other", capsys))[0]
    assert main(["package", str(signed_zip), "--fingerprint", other, "-w", str(site_ws)]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert "ROOTCA_FINGERPRINT_MISMATCH" in err and f"Expected {other}; actual {fingerprint}." in err
    assert not (site_ws / "fedemoji").exists()

    # The value printed, pasted, and the forms it is often pasted in.
    digits = fingerprint.removeprefix("SHA256:")
    forms = {
        "printed": fingerprint,
        "lower case": fingerprint.lower(),
        "no colons": digits.replace(":", ""),
        "no prefix": digits,
        "openssl": f"sha256 Fingerprint={digits}",
        "wrapped": f"{fingerprint[:40]}\n  {fingerprint[40:]}",
    }
    for form, value in forms.items():
        workspace = tmp_path / f"site-1-{form.replace(' ', '-')}"
        args = ["package", str(signed_zip), "--fingerprint", value, "-w", str(workspace)]
        assert main([*args, "--request-dir", str(request_zip.parent)]) == 0, (form, capsys.readouterr().err)
        assert (workspace / "fedemoji" / "prod_00" / "site-1" / "startup" / "client.key").is_file(), form
    capsys.readouterr()

    assert main(["package", str(signed_zip), "--fingerprint", digits[:-3], "-w", str(tmp_path / "short")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --fingerprint") and "is not a SHA-256 fingerprint. Fix:" in err
    assert not (tmp_path / "short").exists()


def _init(config: Path, workspace: Path, capsys) -> str:
    assert main(["cert", "init", "-c", str(config), "-w", str(workspace)]) == 0
    return capsys.readouterr().out


def test_signing_again_needs_force_and_keeps_the_earlier_signed_zip_until_then(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = write_yaml(tmp_path / "site.yaml", local_config_dict(project="fedagain"))
    admin_ws, site_ws = tmp_path / "project-admin", tmp_path / "site-2"
    _init(config, admin_ws, capsys)
    assert main(["cert", "request", "-c", str(config), "--site", "site-2", "-w", str(site_ws)]) == 0
    request_zip = site_ws / "requests" / "site-2" / "site-2.request.zip"
    sign = ["cert", "sign", str(request_zip), "-c", str(config), "-w", str(admin_ws)]
    assert main(sign) == 0
    signed_zip = request_zip.with_name("site-2.signed.zip")
    first = signed_zip.read_bytes()
    capsys.readouterr()
    assert main(sign) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert "site-2.signed.zip exists: 'site-2' was signed before. Fix: pass --force" in err
    assert signed_zip.read_bytes() == first
    assert main([*sign, "--force"]) == 0 and signed_zip.read_bytes() != first
    assert sorted(p.name for p in signed_zip.parent.iterdir() if p.name.startswith(".")) == []
