"""Download logic against a local fake hub (http.server): redirect + X-Linked-* metadata, Range resume,
checksum mismatch, unreachable endpoint."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from fedllm.checkpoint.download import download, remote_metadata, resolve_url
from fedllm.checkpoint.errors import CheckpointError
from fedllm.cli.main import main

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class FakeHub(BaseHTTPRequestHandler):
    """`/<repo>/resolve/<rev>/<file>` → 302 to `/cdn/<file>` with the LFS sha256 and size, like huggingface.co."""

    payload = PAYLOAD
    advertised_sha = hashlib.sha256(PAYLOAD).hexdigest()
    cut_after: int | None = None  # drop the connection after this many bytes (once)
    requests: ClassVar[list[str | None]] = []

    def log_message(self, *args) -> None:
        pass

    def _redirect(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/cdn/" + self.path.rsplit("/", 1)[-1])
        self.send_header("X-Linked-Etag", f'"{self.advertised_sha}"')
        self.send_header("X-Linked-Size", str(len(self.payload)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        if "/resolve/" in self.path and self.path.endswith("/model.nemo"):
            self._redirect()
        else:
            self.send_response(404)
            self.end_headers()

    def do_GET(self) -> None:
        if "/resolve/" in self.path:
            return self._redirect()
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        cut = type(self).cut_after
        if cut is not None:
            type(self).cut_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def hub():
    FakeHub.cut_after, FakeHub.requests = None, []
    FakeHub.advertised_sha = hashlib.sha256(PAYLOAD).hexdigest()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_metadata_from_redirect_headers(hub):
    meta = remote_metadata(resolve_url("org/model", "model.nemo", endpoint=hub))
    assert meta.size == len(PAYLOAD) and meta.sha256 == hashlib.sha256(PAYLOAD).hexdigest()


def test_download_and_skip_when_present(hub, tmp_path):
    url = resolve_url("org/model", "model.nemo", endpoint=hub)
    dest = download(url, tmp_path / "model.nemo", progress=False)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "model.nemo.part").exists()
    FakeHub.requests = []
    download(url, dest, progress=False)  # already there and verified: nothing fetched
    assert FakeHub.requests == []


def test_interrupted_transfer_resumes_with_range(hub, tmp_path):
    url = resolve_url("org/model", "model.nemo", endpoint=hub)
    FakeHub.cut_after = 300_000
    with pytest.raises(CheckpointError, match="run again to resume"):
        download(url, tmp_path / "model.nemo", progress=False)
    part = tmp_path / "model.nemo.part"
    assert 0 < part.stat().st_size < len(PAYLOAD) and not (tmp_path / "model.nemo").exists()
    have = part.stat().st_size
    dest = download(url, tmp_path / "model.nemo", progress=False)
    assert FakeHub.requests[-1] == f"bytes={have}-"
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_partial_file(hub, tmp_path):
    FakeHub.advertised_sha = "0" * 64
    url = resolve_url("org/model", "model.nemo", endpoint=hub)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        download(url, tmp_path / "model.nemo", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_and_unreachable_hub(hub, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="HTTP 404; check the repository id"):
        download(resolve_url("org/model", "nope.nemo", endpoint=hub), tmp_path / "x", progress=False)
    code = main(
        ["ckpt", "download", "--endpoint", "http://127.0.0.1:9", "--models-dir", str(tmp_path), "--no-progress"]
    )
    assert code == 1
    assert (
        "cannot reach http://127.0.0.1:9/nvidia/nemo-megatron-gpt-20B/resolve/main/nemo_gpt20B_bf16_tp4.nemo"
        in capsys.readouterr().err
    )


def test_cli_download(hub, tmp_path, capsys):
    args = ["ckpt", "download", "--repo", "org/model", "--file", "model.nemo", "--endpoint", hub]
    assert main([*args, "--models-dir", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "model.nemo").read_bytes() == PAYLOAD
    assert "sha256 verified" in capsys.readouterr().out
