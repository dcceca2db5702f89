"""A small tmpfs file system that tests can fill, to make real writes fail with ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TMPFS_SIZE = "1m"
FILL_CHUNK_BYTES = 4096


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path) -> Iterator[Path]:
    """Mount a tmpfs of TMPFS_SIZE at ``mount_point`` for the block, and unmount it after.

    The test is skipped when the process is not root or the mount fails, as in a
    container without the capability to mount.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)


def fill_file_system(directory: Path) -> None:
    """Write zeros to a file in ``directory`` until its file system has no free block."""
    chunk = bytes(FILL_CHUNK_BYTES)
    with open(directory / "filler", "wb", buffering=0) as filler:
        while True:
            try:
                filler.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return
