"""Opening a WAL database read-only without creating files that lock out its owner.

SQLite reads a WAL database through its -wal and -shm files. A connection without
write access can read one when those files exist and are readable, when it can create
them, or when it is opened with ``immutable=1`` (SQLite's page "WAL-mode File Format",
walformat.html). A read-only connection that creates them leaves them behind when it
closes, owned by the reading user. The agents of the store's owner then fail with
"attempt to write a readonly database". A process running as root is the exception,
because SQLite gives the files it creates to the owner of the database file. All three
behaviours were checked with SQLite 3.40.1.

read_only_uri chooses how to open the file:

- ``mode=ro`` when the -wal and -shm files both exist, so SQLite creates nothing, or when
  the directory is writable and the reader is the owner or root, so that any file SQLite
  creates belongs to the owner.
- ``mode=ro&immutable=1`` otherwise, if the -wal file is missing or empty. The database
  file then contains every committed change, and SQLite reads it without locks and creates
  nothing. That is exact on a read-only file system. Elsewhere the owner's agents may
  write meanwhile: their changes reach the database file only when a checkpoint copies
  them from the new -wal file. DatabaseWriter reopens an immutable connection before a
  query when the file changed since it was opened, but a query that runs during a
  checkpoint may still fail or return rows from before and after it. The store itself
  is never changed by the reader.
- PermissionError otherwise, and for any of the files that the reader cannot read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import struct
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

__all__ = ["file_identity", "read_only_uri", "sidecar_paths", "wal_files_kept"]

# SQLite's lock bytes on the database file (src/os.h): PENDING_BYTE is 0x40000000, and
# the shared lock is a read lock on the 510 bytes from PENDING_BYTE + 2.
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to 32 bytes. Open file description locks need l_pid 0.
_FLOCK_FORMAT = "hhqqi4x"
_OFD_LOCKS = sys.platform == "linux" and struct.calcsize("P") == 8

_LOCK_RETRY_SECONDS = 0.01


def sidecar_paths(path: Path) -> tuple[Path, Path]:
    """Return the -wal and -shm files of the database ``path``."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """Return (device, inode, size, modification time in ns) of ``path``.

    Raises:
        OSError: ``path`` cannot be examined.
    """
    status = os.stat(path)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def read_only_uri(path: Path) -> str:
    """Return the SQLite URI that opens ``path`` read-only, as the module docstring explains.

    Call it inside wal_files_kept(path), so that the -wal and -shm files that it finds are
    still there when SQLite opens them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        PermissionError: the reader cannot read ``path`` or its -wal or -shm file, or
            reading would need a -shm file that only the owner may create. The
            exception's filename is the file concerned.
    """
    status = os.stat(path)
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    wal, shm = sidecar_paths(path)
    for file in (path, wal, shm):
        if file.exists() and not os.access(file, os.R_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    uri = f"file:{urllib.request.pathname2url(str(path))}?mode=ro"
    if (wal.exists() and shm.exists()) or _created_files_go_to_owner(path, status):
        return uri
    if not wal.exists() or wal.stat().st_size == 0:
        return uri + "&immutable=1"
    if os.access(path.parent, os.W_OK | os.X_OK):
        reason = "creating it as this user would lock out the owner of the database"
    else:
        reason = f"{path.parent} is not writable"
    raise PermissionError(
        errno.EACCES, f"{wal} holds changes, but {shm} is missing and {reason}", str(shm)
    )


def _created_files_go_to_owner(path: Path, status: os.stat_result) -> bool:
    """Return whether files that SQLite creates beside ``path`` would belong to its owner."""
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return False
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:
        return True  # Windows: no owner to lock out by file mode
    user = geteuid()
    return user in (0, status.st_uid)


@contextlib.contextmanager
def wal_files_kept(path: Path, timeout: float) -> Iterator[None]:
    """Keep other processes from deleting the -wal and -shm files of ``path`` in the block.

    The last connection to close a WAL database deletes both files, but only after it
    gets SQLite's exclusive lock on the database file. A read lock on SQLite's
    shared-lock bytes makes that fail. The lock is an open file description lock (Linux
    3.15 and later), so closing this descriptor releases it without releasing the POSIX
    locks that SQLite's own descriptors hold in this process. Other systems run the
    block without the lock.

    Raises:
        sqlite3.OperationalError: another connection held its exclusive lock for
            ``timeout`` seconds ("database is locked").
        OSError: ``path`` cannot be opened.
    """
    if not _OFD_LOCKS:
        # NOTE: without the lock, a writer that closes between read_only_uri and the
        # first read lets SQLite create the -wal and -shm files as this user.
        yield
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        request = struct.pack(
            _FLOCK_FORMAT, fcntl.F_RDLCK, os.SEEK_SET, _SHARED_FIRST, _SHARED_SIZE, 0
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.fcntl(descriptor, fcntl.F_OFD_SETLK, request)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError("database is locked")
            time.sleep(_LOCK_RETRY_SECONDS)
        yield
    finally:
        os.close(descriptor)
