"""Resumable, checksummed download of a checkpoint from a Hugging Face model repository.

The hub's `resolve` URL answers a HEAD with the LFS object's sha256 (X-Linked-Etag) and size
(X-Linked-Size) before redirecting to the CDN; we read those, check free space, fetch into `<name>.part`
with HTTP Range requests (so an interrupted 38 GB transfer resumes where it stopped), hash while writing,
and rename only when the sha256 matches. Plain urllib keeps this testable against a local fake hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fedllm.checkpoint.errors import CheckpointError

DEFAULT_ENDPOINT = "https://huggingface.co"
# The seed's model: nvidia/nemo-megatron-gpt-20B, nemo_gpt20B_bf16_tp4.nemo (38 GB, TP4, bf16).
REPO_20B = "nvidia/nemo-megatron-gpt-20B"
FILE_20B = "nemo_gpt20B_bf16_tp4.nemo"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class RemoteFile:
    url: str
    size: int | None
    sha256: str | None


def resolve_url(repo: str, filename: str, revision: str = "main", endpoint: str | None = None) -> str:
    """The hub's resolve URL of a file; an endpoint that is not an http(s) URL is refused, naming where it came from."""
    given = endpoint or os.environ.get("HF_ENDPOINT")
    base = (given or DEFAULT_ENDPOINT).rstrip("/")
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        origin = "--endpoint (or HF_ENDPOINT)" if endpoint else "HF_ENDPOINT"
        raise CheckpointError(
            f"{origin} {given!r} is not an http(s) URL. Fix: pass the hub's address with its scheme, e.g. "
            f"--endpoint {DEFAULT_ENDPOINT} or your mirror's https://host[:port]"
        )
    for what, value in (("--repo", repo), ("--file", filename), ("--revision", revision)):
        parts = value.split("/")
        if not value or value.startswith("/") or ".." in parts or any(c.isspace() or ord(c) < 32 for c in value):
            raise CheckpointError(
                f"{what} {value!r} is not a hub path. Fix: pass it as the model page shows it, e.g. "
                f"--repo {REPO_20B} --file {FILE_20B} --revision main"
            )
    return f"{base}/{repo}/resolve/{revision}/{filename}"


class _KeepRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # the redirect response itself carries the hub's X-Linked-* headers


def _headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN")
    return {"User-Agent": "fedllm", **({"Authorization": f"Bearer {token}"} if token else {})}


def _unreachable(url: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot reach {url} ({exc}); check the network or proxy, set HF_ENDPOINT to a reachable mirror, or copy "
        "the file by other means into the models directory (fedllm verifies it with `fedllm ckpt verify`)"
    )


def remote_metadata(url: str, timeout: float = 30.0) -> RemoteFile:
    """Size and sha256 of the file behind a hub resolve URL (HEAD, redirect not followed)."""
    opener = urllib.request.build_opener(_KeepRedirect)
    request = urllib.request.Request(url, method="HEAD", headers=_headers())
    try:
        with opener.open(request, timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303, 307, 308):
            headers = exc.headers
        elif exc.code in (401, 403, 404):
            raise CheckpointError(
                f"{url}: HTTP {exc.code}; check the repository id, file name and revision (and HF_TOKEN for gated repos)"
            ) from exc
        else:
            raise _unreachable(url, exc) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: http.client's InvalidURL
        raise _unreachable(url, exc) from exc
    etag = (headers.get("X-Linked-Etag") or "").strip('"').removeprefix("W/").strip('"')
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    sha = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag.lower()) else None
    return RemoteFile(url, int(size) if size else None, sha)


def sha256_of(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with (
        open(path, "rb") as f,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress, desc="sha256") as bar,
    ):
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch `url` into `dest`, resuming `dest.part`, verifying sha256 (from the hub unless given)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"{dest.parent}: cannot create the models folder ({exc}). Fix: pass --models-dir (or FEDLLM_MODELS_DIR) "
            "a folder you can write"
        ) from exc
    if dest.exists() and not dest.is_file():
        raise CheckpointError(f"{dest}: exists and is not a file. Fix: move it away or pass another --models-dir")
    meta = remote_metadata(url, timeout=timeout)
    expected = (sha256 or meta.sha256 or "").lower() or None
    if expected is None:
        raise CheckpointError(
            f"{url}: the server gives no sha256 (no X-Linked-Etag header); pass --sha256 from the model page to verify"
        )
    if dest.exists():
        if sha256_of(dest, progress) == expected:
            return dest
        raise CheckpointError(f"{dest}: exists but its sha256 is not {expected}; delete it and run again")
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if meta.size is not None:
        if have > meta.size:
            part.unlink()
            have = 0
        free = shutil.disk_usage(dest.parent).free
        if free < meta.size - have:
            raise CheckpointError(
                f"{dest.parent}: {free / 2**30:.1f} GiB free, {(meta.size - have) / 2**30:.1f} GiB more needed for "
                f"{dest.name}; free space or pass another --models-dir"
            )
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    if meta.size is None or have < meta.size:
        have, digest = _fetch(url, part, have, digest, meta.size, progress, timeout)
    actual = digest.hexdigest()
    if actual != expected:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"{dest.name}: sha256 mismatch (expected {expected}, got {actual}); the partial file was removed — run "
            "the download again"
        )
    os.replace(part, dest)
    return dest


def _fetch(
    url: str, part: Path, have: int, digest: hashlib._Hash, size: int | None, progress: bool, timeout: float
) -> tuple[int, hashlib._Hash]:
    headers = _headers() | ({"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch
            return have, digest
        raise CheckpointError(f"{url}: HTTP {exc.code} while downloading; run again to resume") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _unreachable(url, exc) from exc
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start over
            have, digest = 0, hashlib.sha256()
        mode = "ab" if have else "wb"
        bar = tqdm(total=size, initial=have, unit="B", unit_scale=True, disable=not progress, desc=part.name[:-5])
        with open(part, mode) as out, bar:
            try:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
            except (OSError, urllib.error.URLError) as exc:
                raise CheckpointError(
                    f"{url}: transfer interrupted after {have} bytes ({exc}); run again to resume from {part}"
                ) from exc
    if size is not None and have != size:
        raise CheckpointError(f"{url}: transfer stopped at {have} of {size} bytes; run again to resume from {part}")
    return have, digest
