"""Writing files so that a reader sees the old file or the whole new one, never a part (temp + rename).

fedllm's outputs are written through here (data sets through fedllm.data.io's all-or-nothing writer,
checkpoints through fedllm.checkpoint's): a crash, a full disk or an error half way leaves the previous
file in place and no stray temp file. Files and folders get the mode the umask gives any new one
(0644 / 0755 under umask 022), as a plain `open` or `mkdir` would, so containers that run as another
user read them. `durable=True` also fsyncs the data and the folder,
for files that must survive a machine crash once written (checkpoints, downloaded models).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk, or for a directory the renames inside it (so they survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temp path beside `path`; when the block ends without error it replaces `path`.

    The caller writes the temp path any way it likes (torch.save, np.savez, a tool's output);
    on an exception the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temp
        if durable:
            fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable=durable)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it becomes `path` in one rename.

    With `replace`, an existing `path` is swapped out and removed; without it, an existing `path`
    (another process finished first) is kept and the staging folder discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder gets the mode the umask gives (mkdtemp's is 0700, which a
    # container running as another user could not read once the folder is renamed into place).
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    try:
        yield staging
        if path.exists() and not replace:
            shutil.rmtree(staging)
            return
        if path.exists():
            retired = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
