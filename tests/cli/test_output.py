"""What the `fedllm` command prints: user data verbatim, help and version, the federation it works on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedllm.cli.main import main
from fedllm.output import make_console, styled


def test_user_data_is_printed_verbatim_never_as_markup_or_emoji(capsys) -> None:
    # A root CA fingerprint with ':AB:' (an emoji code to Rich) and a path with Rich markup in brackets.
    fingerprint = "6F:11:AB:F4:00:1A:2B:3C:4D:5E:6F:70:81:92:A3:B4:C5:D6:E7:F8:09:1A:2B:3C:4D:5E:6F:70:81:92:A3:B4"
    console = make_console()
    console.print(styled("signed", "green", f" root CA fingerprint {fingerprint}, out o[red]/x[/] [bold]"))
    out = capsys.readouterr().out
    assert f"root CA fingerprint {fingerprint}, out o[red]/x[/] [bold]" in out


def test_an_error_naming_a_path_with_brackets_prints_it_whole(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "o[red]" / ":ab:.nemo"
    assert main(["ckpt", "verify", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and err.startswith("error:")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_has_a_short_flag(flag: str, capsys) -> None:
    assert main([flag]) == 0
    assert "Usage: " in capsys.readouterr().out
    assert main(["job", "create", flag]) == 0
    assert "--mode" in capsys.readouterr().out


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fedllm ") and "nvflare 2.9" in out


def test_commands_after_provision_find_the_provisioned_config(
    local_config: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`provision -c FILE` once; `job create` (its min_clients, its hints) and `up` then use FILE without -c."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDLLM_CONFIG", raising=False)
    relative = Path(os.path.relpath(local_config, tmp_path))
    assert main(["provision", "-c", str(relative)]) == 0  # the default, relative workspace
    capsys.readouterr()

    from fedllm.cli.common import site_config_path

    assert site_config_path(None, Path("workspace").absolute()) == local_config.absolute()
    # A config that is not the provisioned one is named in the error, with the fix.
    other = tmp_path / "site_configs" / "default.yaml"
    other.parent.mkdir()
    other.write_text(local_config.read_text().replace("fedtest", "other"))
    assert main(["status", "-c", str(other)]) == 1
    err = capsys.readouterr().err
    assert "site config site_configs/default.yaml" in err and "-c" in err
