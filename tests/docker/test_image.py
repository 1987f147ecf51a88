"""The image holds no startup kit, private key or project certificate in any layer."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.support.compose import TEST_BASE, compose_config_dict, provision_compose, run

# The image build pip-installs NVFlare and fedllm's dependencies from PyPI.
pytestmark = [pytest.mark.docker, pytest.mark.network]

KIT_FILE_NAMES = {"fed_server.json", "fed_client.json", "fed_admin.json", "rootCA.pem", "client.key", "server.key"}
# A real PEM private key: the header followed by base64 key material (code that only names the header does not match).
PRIVATE_KEY_RE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{60}")


def _layers(image_tar: Path, base_layers: int):
    """(layer, tar, from_base) for every layer of the saved image, in order."""
    with tarfile.open(image_tar) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))
        for i, layer in enumerate(manifest[0]["Layers"]):
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(layer).read())) as inner:
                yield layer, inner, i < base_layers


def _kit_fingerprints(prod_dir: Path) -> dict[bytes, str]:
    """A middle base64 line (key material) of every key and certificate of the kits: in any copy of them."""
    prints = {}
    for path in [*prod_dir.rglob("*.pem"), *prod_dir.rglob("*.crt"), *prod_dir.rglob("*.key")]:
        lines = path.read_text().splitlines()
        prints[lines[len(lines) // 2].encode()] = str(path.relative_to(prod_dir))
    return prints


def test_no_key_or_certificate_in_any_image_layer(fedllm_image, tmp_path: Path):
    # A freshly provisioned project: its root CA must not appear in the image (nor should any kit).
    kits = provision_compose(tmp_path, compose_config_dict())
    kit_prints = _kit_fingerprints(kits.prod_dir)
    assert len(kit_prints) >= 10
    # Layers of the base image (Debian / NeMo) carry library self-test keys (e.g. GnuTLS's); fedllm's own
    # layers must carry no private key at all. No layer may hold a kit file or any of this project's keys/certs.
    base = json.loads(run(["docker", "image", "inspect", "-f", "{{json .RootFS.Layers}}", TEST_BASE]).stdout)
    image_tar = tmp_path / "image.tar"
    t0 = time.monotonic()
    subprocess.run(["docker", "save", "-o", str(image_tar), fedllm_image], check=True, timeout=300)
    found, scanned = [], 0
    for layer, tar, from_base in _layers(image_tar, len(base)):
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            if name in KIT_FILE_NAMES or member.name.rstrip("/").endswith(("/startup/fed_client.json", ".key")):
                found.append(f"{layer}: {member.name} (kit file name)")
                continue
            data = tar.extractfile(member).read()
            scanned += 1
            if not from_base and PRIVATE_KEY_RE.search(data):
                found.append(f"{layer}: {member.name} (private key in a fedllm layer)")
            found += [f"{layer}: {member.name} (kit's {kit})" for fp, kit in kit_prints.items() if fp in data]
    print(f"scanned {scanned} files in {time.monotonic() - t0:.1f}s")
    assert scanned > 1000  # the scan really read the image
    assert found == [], "\n".join(found)
