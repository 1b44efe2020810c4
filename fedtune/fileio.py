"""Every file fedtune writes goes through here so it gets ordinary permissions: 0666 & ~umask for files
(0644 under the usual umask 022) and 0777 & ~umask for directories. safetensors' `save_file` (and so
`save_pretrained`) creates 0600 files, which would make adapters and checkpoints unreadable for anyone
but the writing user (e.g. the host user when a container wrote them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it (Linux /proc); falls back to set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def publish(path: str | Path) -> Path:
    """Give `path` (a file, or a directory and everything below it) the umask's default modes."""
    path = Path(path)
    mask = umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_dir():
        os.chmod(path, dmode)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), dmode)
            for f in files:
                os.chmod(os.path.join(root, f), fmode)
    elif path.exists():
        os.chmod(path, fmode)
    return path


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return publish(path)


def fsync(path: str | Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries, e.g. a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a sibling temp file, then rename: readers see the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    publish(tmp)
    os.replace(tmp, path)
    return path


def write_dir_atomic(dest: str | Path, fill) -> bool:
    """Create directory `dest` whole or not at all: `fill(tmp)` writes into a fresh sibling temp directory, which
    is then renamed to `dest`. When another process got there first (`dest` exists, a lost race) the temp copy is
    deleted and theirs kept; on any error it is deleted too, so no `.tmp` directory is ever left behind. Returns
    True when this call's copy became `dest`."""
    import shutil
    import tempfile

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        fill(tmp)
        publish(tmp)
        try:
            os.rename(tmp, dest)  # atomic; fails when dest exists and is not empty (someone else won)
            return True
        except OSError:
            if not dest.is_dir():
                raise
            return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
