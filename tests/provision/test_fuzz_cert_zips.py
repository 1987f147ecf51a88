"""Fuzzing distributed provisioning's zips: a damaged request or signed zip is refused, and nothing is written.

`fedllm cert sign` is fed damaged `*.request.zip` files and `fedllm package` damaged `*.signed.zip`
files — bytes damaged anywhere, a member damaged inside a well-formed zip, a metadata field given a
value of another type. Each run ends in success (a harmless change) or in fedllm's own error, never in
a traceback; a refused signature writes no signed zip, a refused package no kit (partial or not).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedllm.config import load_site_config
from fedllm.provision.distributed import init_ca, request_certificate, sign_request
from tests.support.cli_fuzz import (
    FUZZ_SETTINGS,
    assert_clean,
    assert_no_partial_output,
    corrupted,
    json_values,
    run_cli,
    snapshot,
)
from tests.support.sites import local_config_dict, write_yaml


@dataclass(frozen=True, repr=False)
class Made:
    root: Path
    config: Path
    ca_dir: Path
    fingerprint: str
    request_dir: Path
    request_zip: bytes
    signed_zip: bytes

    def __repr__(self) -> str:  # what a failing example prints: not the zips' bytes
        return f"Made({self.root})"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    root = tmp_path_factory.mktemp("zips")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))  # NVFlare's audit records
        config_path = write_yaml(root / "site.yaml", local_config_dict(project="fedzip"))
        config = load_site_config(config_path)
        ca = init_ca(config, root / "ca")
        req = request_certificate(config, "site-1", root / "request", source="site.yaml", data_root=root)
        signed = sign_request(config, req.request_zip, ca.ca_dir, out=root / "signed" / "site-1.signed.zip")
    return Made(
        root,
        config_path,
        ca.ca_dir,
        ca.fingerprint,
        req.request_dir,
        req.request_zip.read_bytes(),
        signed.signed_zip.read_bytes(),
    )


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def make() -> Path:
        return Path(tempfile.mkdtemp(dir=tmp_path))

    return make


def members(zipped: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def place(path: Path, content: bytes | None) -> Path:
    """`content` at `path`; None puts a folder there."""
    path.parent.mkdir()
    path.mkdir() if content is None else path.write_bytes(content)
    return path


def sign(made: Made, request_zip: bytes | None, tmp: Path) -> None:
    """`fedllm cert sign` of this request zip: a clean outcome; refused, it wrote no signed zip."""
    path = place(tmp / "inbox" / "site-1.request.zip", request_zip)
    outbox, ca_before = tmp / "outbox", snapshot(made.ca_dir)
    args = ["cert", "sign", path, "-c", made.config, "--ca-dir", made.ca_dir, "--out", outbox / "site-1.signed.zip"]
    outcome = run_cli(args)
    assert_clean(outcome, allowed=(0, 1))
    assert_no_partial_output(outcome, outbox, {})
    assert_no_partial_output(outcome, made.ca_dir, ca_before)
    if outcome.code == 0:
        assert zipfile.is_zipfile(outbox / "site-1.signed.zip"), outcome.text


def package(made: Made, signed_zip: bytes | None, tmp: Path) -> None:
    """`fedllm package` of this signed zip: a clean outcome; refused, it made no kit."""
    path = place(tmp / "inbox" / "site-1.signed.zip", signed_zip)
    request_dir, workspace = tmp / "request", tmp / "workspace"
    shutil.copytree(made.request_dir, request_dir)
    outcome = run_cli(
        ["package", path, "--fingerprint", made.fingerprint, "--request-dir", request_dir, "-w", workspace]
    )
    assert_clean(outcome, allowed=(0, 1))
    assert_no_partial_output(outcome, workspace, {})
    if outcome.code == 0:
        assert (workspace / "fedzip" / "prod_00" / "site-1" / "startup" / "client.crt").is_file(), outcome.text


def test_the_intact_zips_sign_and_package(made: Made, scratch) -> None:
    sign(made, made.request_zip, scratch())
    package(made, made.signed_zip, scratch())


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_damaged_request_zip(made: Made, scratch, data) -> None:
    sign(made, data.draw(corrupted(made.request_zip)), scratch())


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_request_zip_with_a_damaged_member(made: Made, scratch, data) -> None:
    files = members(made.request_zip)
    name = data.draw(st.sampled_from(sorted(files)))
    files[name] = data.draw(corrupted(files[name]))
    sign(made, rezip(files), scratch())


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_request_with_a_field_of_another_type(made: Made, scratch, data) -> None:
    files = members(made.request_zip)
    meta = json.loads(files["request.json"])
    meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(json_values())
    files["request.json"] = json.dumps(meta).encode()
    sign(made, rezip(files), scratch())


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_damaged_signed_zip(made: Made, scratch, data) -> None:
    package(made, data.draw(corrupted(made.signed_zip)), scratch())


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_signed_zip_with_a_damaged_member(made: Made, scratch, data) -> None:
    files = members(made.signed_zip)
    name = data.draw(st.sampled_from(sorted(files)))
    files[name] = data.draw(corrupted(files[name]))
    package(made, rezip(files), scratch())


@FUZZ_SETTINGS
@given(data=st.data())
def test_a_signed_zip_with_a_field_of_another_type(made: Made, scratch, data) -> None:
    files = members(made.signed_zip)
    meta = json.loads(files["signed.json"])
    meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(json_values())
    files["signed.json"] = json.dumps(meta).encode()
    package(made, rezip(files), scratch())


@pytest.mark.parametrize(
    "content",
    [b"", b"not a zip", b"PK\x05\x06" + b"\x00" * 18, None],
    ids=["empty", "text", "empty zip", "a folder"],
)
def test_what_is_not_a_zip_at_all(made: Made, scratch, content: bytes | None) -> None:
    sign(made, content, scratch())
    package(made, content, scratch())
