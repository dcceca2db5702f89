"""NDJSONWriter: the append-only journal of runs and events, one file per UTC day.

Each line of ``events_YYYYMMDD.ndjson`` is one JSON object whose ``record_type`` is
``run_start``, ``run_end`` or ``event``. The journal is the source of truth: the SQLite
index can be rebuilt from it.

An append is one ``os.write`` of one whole line to a file opened with O_APPEND, made under
a thread lock and an exclusive ``flock`` (called directly on POSIX, else through
portalocker), so lines from threads and processes never interleave. The fsync comes after
the lock is released, so concurrent appends can share one fsync (group commit). A process
that dies during a write can leave a last line without its newline. The next append ends
that line first, and readers skip and count lines that do not parse.

``durability`` sets when a line reaches the disk:

=========  ===================================================================================
mode       a line is on disk when
=========  ===================================================================================
fsync      append() returns; appends that wait at the same time share one fsync
batch      a background thread fsyncs, at most ``batch_interval`` seconds after the write
none       the OS writes it back, or flush() or close() is called
=========  ===================================================================================

In every mode the line is handed to the OS before append() returns, so it survives a crash
of the process. A file is also fsynced before the writer switches to the next day's file.

Needs a POSIX system: the torn-line check uses ``os.pread`` and the fork handling uses
``os.register_at_fork``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import portalocker

try:
    import fcntl
except ImportError:  # not POSIX: portalocker's own locking is used
    fcntl = None  # type: ignore[assignment]

from telemetry._dates import (
    file_name,
    normalise_date,
    utc_date,
    utc_today,
)
from telemetry._logutil import RepeatLimiter
from telemetry._wakeable import WakeableThread
from telemetry.config import DURABILITY_MODES
from telemetry.encoding import make_jsonable
from telemetry.errors import ConfigError
from telemetry.journal import RECORD_TYPES, JournalReader, JournalReadResult

__all__ = [
    "DIRECTORY_MODE",
    "FILE_MODE",
    "RECORD_TYPES",
    "JournalReadResult",
    "NDJSONWriter",
]

logger = logging.getLogger("telemetry.journal")

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

# O_RDWR rather than O_WRONLY, because the torn-line check reads the last byte.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)

# A repeated warning (the same field and reason) is logged the first time, then every 100th.
_REPEAT_BURST = 1
_REPEAT_EVERY = 100

# Maximum time close() waits for the batch thread, which may be in the middle of an fsync.
_THREAD_JOIN_TIMEOUT_SECONDS = 5.0

# fdatasync also writes back the file size, which is all a reader needs after an append.
_sync_file_data: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class NDJSONWriter:
    """Append records to the daily journal files in ``directory``, and read them back.

    Thread-safe, and safe for several processes that append to the same directory. In a
    child made by ``os.fork()`` the writer opens its file again on the next append, so the
    child's lock is its own. The writer keeps at most one file open: the file of the day of
    the last record it wrote.

    Attributes:
        directory: the directory of the journal files, created on the first append.
        durability: ``"fsync"``, ``"batch"`` or ``"none"``, as the module documents.
        batch_interval: maximum seconds between a write and its fsync in ``"batch"`` mode.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        durability: str = "fsync",
        batch_interval: float = 1.0,
    ) -> None:
        """Create a writer for ``directory``, which the first append creates.

        Raises:
            ConfigError: (a ValueError) ``durability`` is not one of fsync, batch, none, or
                ``batch_interval`` is not a positive, finite number of seconds.
        """
        if durability not in DURABILITY_MODES:
            raise ConfigError("durability", durability, f"one of {', '.join(DURABILITY_MODES)}")
        if (
            isinstance(batch_interval, bool)
            or not isinstance(batch_interval, (int, float))
            or not math.isfinite(batch_interval)
            or batch_interval <= 0
        ):
            raise ConfigError("batch_interval", batch_interval, "a number of seconds > 0")

        self.directory = Path(directory)
        self.durability = durability
        self.batch_interval = float(batch_interval)
        # Tests replace this to count or hold the fsyncs of journal files.
        self._fsync: Callable[[int], None] = _sync_file_data
        self._closed = False
        self._reset_state()
        _live_writers.add(self)

    def __repr__(self) -> str:
        return f"NDJSONWriter({str(self.directory)!r}, durability={self.durability!r})"

    def _reset_state(self) -> None:
        # Locks, the open file and the sequence numbers: everything a forked child replaces.
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._date: str | None = None
        # The path of the open file and its (st_ino, st_dev), which tell whether the path
        # still names it. _end_offset is the file's size after this writer's last append
        # to it, or -1 when unknown. While the size is still that, the last line is this
        # writer's own whole line, so the torn-line check needs no read.
        self._path = ""
        self._file_id = (-1, -1)
        self._end_offset = -1
        # Lines are numbered in the order they were written. _synced_seq is the highest
        # number known to be on disk, and _flushing is True while one thread (the leader)
        # runs an fsync on behalf of every line written so far.
        self._written_seq = 0
        self._synced_seq = 0
        self._flushing = False
        self._durable = threading.Condition(threading.Lock())
        self._batch_thread: threading.Thread | None = None
        self._batch_stop = threading.Event()
        self._sync_thread = WakeableThread(
            f"telemetry-journal-sync-{self.directory.name}", self, _sync_ahead
        )
        # (first, last, error) of the line numbers whose fsync on the sync thread failed.
        self._sync_failures: collections.deque[tuple[int, int, OSError]] = collections.deque(
            maxlen=_SYNC_FAILURES_KEPT
        )
        self._repeats = RepeatLimiter(burst=_REPEAT_BURST, every=_REPEAT_EVERY)

    # -- writing ------------------------------------------------------------------------------

    def append(
        self, record_type: str, data: Mapping[str, Any], *, timestamp: str | None = None
    ) -> None:
        """Write one record as one line of the journal file of its UTC day.

        The line is ``{"record_type": record_type, **data}``. Values that JSON cannot hold
        are converted as ``telemetry.encoding`` documents, and each conversion is logged as a
        WARNING that names the field and the run_id (the first of each field and reason,
        then every 100th).

        The file's day is the UTC date of ``timestamp`` if given, else of the record's
        ``timestamp``, else its ``end_time`` (run_end only), else its ``start_time``, else
        of the current time. ``timestamp`` only selects the file and is not added to the
        line. An invalid time in ``data`` is logged as a WARNING and the current time is used.

        In ``"fsync"`` mode the call returns after the line is on disk. In the other modes
        it returns after the OS has the line.

        Raises:
            ValueError: ``record_type`` is unknown, ``data`` has a different
                ``record_type``, ``timestamp`` is not ISO 8601 with an offset, or the writer
                is closed.
            TypeError: ``data`` is not a mapping.
            OSError: the directory or file cannot be created, locked, written or fsynced.
                After a partial write, such as on a full disk, the next append ends the
                partial line and readers count it as corrupt.
        """
        self._append(record_type, data, timestamp, None)

    def _append(
        self,
        record_type: str,
        data: Mapping[str, Any],
        timestamp: str | None,
        converted_key: str | None,
    ) -> None:
        """Append as append() does, but take ``data[converted_key]`` as it is.

        The client passes an event's payload, which it has already converted with
        make_jsonable and logged the issues of, as ``converted_key`` so that it is not
        walked a second time. That value must be what make_jsonable returned.
        """
        seq = self._write_record(record_type, data, timestamp, converted_key)
        self._wait_durable(seq)

    def _write_record(
        self,
        record_type: str,
        data: Mapping[str, Any],
        timestamp: str | None,
        converted_key: str | None,
        *,
        sync_ahead: bool = False,
    ) -> int:
        """Write a record as _append() does, without the wait for the disk, and return its number.

        In ``"fsync"`` mode the caller must then pass the number to _wait_durable() before
        it reports the record as written. With ``sync_ahead``, the writer's sync thread
        starts the fsync at once, so that the caller can do other work, such as writing
        the index, while the disk flushes: the wait then costs what remains of the fsync.
        """
        if record_type not in RECORD_TYPES:
            raise ValueError(
                f"unknown record_type {record_type!r}: expected one of {', '.join(RECORD_TYPES)}"
            )
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping such as a dict, not {type(data).__name__}")
        if data.get("record_type", record_type) != record_type:
            raise ValueError(
                f"data has record_type {data['record_type']!r} but the record is appended as "
                f"{record_type!r}: remove the key from data or pass the same value"
            )

        date = self._record_date(record_type, data, timestamp)
        line = self._encode_line(record_type, data, converted_key)
        seq, closed_torn_line = self._write_line(date, line)

        if closed_torn_line:
            logger.warning(
                "closed a torn last line in %s with a newline before appending; readers skip "
                "that line and count it as corrupt",
                self.file_path(date),
            )
        if sync_ahead and self.durability == "fsync":
            self._sync_thread.wake()
        return seq

    def _wait_durable(self, seq: int) -> None:
        """Return when line ``seq`` is on disk in ``"fsync"`` mode, and at once in the others.

        Raises:
            OSError: the fsync failed, this caller's or the sync thread's for this line.
        """
        if self.durability != "fsync":
            return
        self._wait_until_durable(seq)
        with self._durable:
            failure = next(
                (exc for low, high, exc in self._sync_failures if low <= seq <= high), None
            )
        if failure is not None:
            # Linux reports a failed write-back to one fsync only, so the fsync that
            # _wait_until_durable retried may have succeeded without the line.
            raise OSError(failure.errno, f"the fsync of this journal line failed: {failure}")

    def flush(self) -> None:
        """Fsync every line this writer has written so far, and return when they are on disk.

        Raises:
            OSError: the fsync failed, or the writer was closed and its final fsync failed.
        """
        with self._lock:
            target = self._written_seq
        self._wait_until_durable(target)

    def close(self) -> None:
        """Stop the batch thread, fsync and close the open file. A second call does nothing.

        Appends after close() raise ValueError.

        Raises:
            OSError: the final fsync failed. The file is closed all the same.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, self._batch_thread = self._batch_thread, None
            self._batch_stop.set()
        self._sync_thread.close()

        if thread is not None:
            thread.join(_THREAD_JOIN_TIMEOUT_SECONDS)
            if thread.is_alive():
                logger.warning(
                    "the batch fsync thread of the journal in %s did not stop within %.0f s",
                    self.directory,
                    _THREAD_JOIN_TIMEOUT_SECONDS,
                )

        with self._lock:
            fd, self._fd, self._date = self._fd, None, None
            target = self._written_seq
            if fd is None:
                return
            try:
                self._fsync(fd)
                self._publish_synced(target)
            finally:
                os.close(fd)
                with self._durable:
                    self._durable.notify_all()

    def _record_date(self, record_type: str, data: Mapping[str, Any], timestamp: str | None) -> str:
        if timestamp is not None:
            return _utc_date(timestamp)

        for key in _time_keys(record_type):
            value = data.get(key)
            if value is None:
                continue
            try:
                return _utc_date(value)
            except (ValueError, TypeError):
                today = utc_today()
                self._repeats.log(
                    logger,
                    logging.WARNING,
                    ("time", record_type, key),
                    "run %s: invalid %s %.80r in the %s record, so it goes to today's file, %s",
                    data.get("run_id"),
                    key,
                    value,
                    record_type,
                    today,
                )
                return today
        return utc_today()

    def _encode_line(
        self, record_type: str, data: Mapping[str, Any], converted_key: str | None
    ) -> bytes:
        unconverted = data
        if converted_key is not None and converted_key in data:
            # None takes the converted value's place, so the key keeps its position.
            unconverted = {**data, converted_key: None}
        converted, issues = make_jsonable(unconverted, record_type)
        if issues:
            self._repeats.log_conversions(logger, data.get("run_id"), issues)

        # make_jsonable leaves only JSON types, nested at most MAX_DEPTH levels, which
        # orjson always encodes.
        record = {"record_type": record_type, **converted}
        if converted_key is not None and unconverted is not data:
            record[converted_key] = data[converted_key]
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)

    def _write_line(self, date: str, line: bytes) -> tuple[int, bool]:
        # Return the line's sequence number and whether a torn last line was closed first.
        with self._lock:
            if self._closed:
                raise ValueError(
                    f"the journal writer for {self.directory} is closed: create a new "
                    "NDJSONWriter to append"
                )
            fd = self._file_for_date(date)

            _lock_file(fd)
            try:
                size = self._size_if_linked()
            except BaseException:
                # The file lock must never outlive a failed append, or every other writer
                # of this file would wait for it forever.
                _unlock_file(fd)
                raise
            if size is None:
                fd = self._reopen_replaced_file(fd, date)
            try:
                if size is None:
                    size = os.fstat(fd).st_size
                # Every writer appends under the file lock, so a size other than this
                # writer's last end means that another process wrote since, and its last
                # line may be torn.
                torn = size != self._end_offset and _ends_with_torn_line(fd, size)
                data = b"\n" + line if torn else line
                self._end_offset = -1
                _write_all(fd, data)
                self._end_offset = size + len(data)
            finally:
                _unlock_file(fd)

            self._written_seq += 1
            if self.durability == "batch" and self._batch_thread is None:
                self._start_batch_thread()
            return self._written_seq, torn

    def _file_for_date(self, date: str) -> int:
        # Called with self._lock held.
        if self._fd is not None and self._date == date:
            return self._fd
        if self._fd is not None and self._date is not None:
            self._retire_file(self._fd, self._date)
            self._fd = None
            self._date = None

        _make_private_directory(self.directory)
        path = self.file_path(date)
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            fd = os.open(path, _OPEN_FLAGS, FILE_MODE)
        else:
            # A new file's directory entry reaches the disk only with an fsync of the directory.
            _fsync_directory(self.directory)
        try:
            opened = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._date = date
        self._path = os.fspath(path)
        self._file_id = (opened.st_ino, opened.st_dev)
        self._end_offset = -1
        return fd

    def _size_if_linked(self) -> int | None:
        # Return the open file's size if its path still names it, else None. A stat of
        # the path gives the open file's size too when it names the same inode.
        try:
            named = os.stat(self._path)
        except FileNotFoundError:
            return None
        if (named.st_ino, named.st_dev) != self._file_id:
            return None
        return named.st_size

    def _reopen_replaced_file(self, fd: int, date: str) -> int:
        # Called with self._lock and the file lock on fd held. Lines written to a file that
        # was deleted or replaced would vanish, so the writer moves to the file now there.
        _unlock_file(fd)
        logger.warning(
            "journal file %s was deleted or replaced while open; appending to the new file",
            self.file_path(date),
        )
        self._retire_file(fd, date)
        self._fd = None
        self._date = None
        fd = self._file_for_date(date)
        _lock_file(fd)
        return fd

    def _retire_file(self, fd: int, date: str) -> None:
        # Called with self._lock held, when the day changes. The file is fsynced before it is
        # closed because the leader of the next group commit fsyncs only the new file.
        try:
            self._fsync(fd)
            self._publish_synced(self._written_seq)
        except OSError as exc:
            # NOTE: lines written to this file before the failure count as durable once the
            # next group commit fsyncs the new file, although they may not be on disk.
            logger.error(
                "fsync of %s failed before switching to the next day's file: %s; its last "
                "lines may be lost on power loss",
                self.file_path(date),
                exc,
            )
        finally:
            os.close(fd)

    # -- group commit and the batch thread -------------------------------------------------------

    def _wait_until_durable(self, seq: int) -> None:
        """Return when line ``seq`` is on disk, fsyncing as the leader if no fsync is running."""
        with self._durable:
            while self._flushing and self._synced_seq < seq:
                self._durable.wait()
            if self._synced_seq >= seq:
                return
            self._flushing = True

        # NOTE: when the leader's fsync fails, a waiting thread becomes the next leader and
        # fsyncs again. Linux reports a write-back error to one fsync only, so the retry can
        # succeed although the failed lines did not reach the disk.
        synced = 0
        try:
            synced = self._sync_written_lines()
        finally:
            with self._durable:
                self._flushing = False
                self._synced_seq = max(self._synced_seq, synced)
                self._durable.notify_all()

    def _sync_written_lines(self) -> int:
        """Fsync the open file and return the sequence number of the last line it covers."""
        with self._lock:
            target = self._written_seq
            # A duplicate descriptor stays valid while another thread closes the original
            # at a day switch, and it syncs the same file.
            fd = None if self._fd is None else os.dup(self._fd)
        if fd is None:
            with self._durable:
                if self._synced_seq >= target:
                    return target
            raise OSError(
                errno.EIO,
                f"the journal file in {self.directory} was closed before its last lines were "
                "fsynced",
            )

        try:
            self._fsync(fd)
        finally:
            os.close(fd)
        return target

    def _publish_synced(self, seq: int) -> None:
        with self._durable:
            self._synced_seq = max(self._synced_seq, seq)
            self._durable.notify_all()

    def _start_batch_thread(self) -> None:
        # Called with self._lock held. The thread holds only a weak reference, so a writer
        # that is dropped without close() can still be garbage collected.
        thread = threading.Thread(
            target=_run_batch_fsync,
            args=(weakref.ref(self), self._batch_stop, self.batch_interval),
            name=f"telemetry-journal-fsync-{self.directory.name}",
            daemon=True,
        )
        thread.start()
        self._batch_thread = thread

    def _reset_after_fork(self) -> None:
        # The inherited descriptor shares its open file description, and so its flock,
        # with the parent. The child closes its copy and opens the file again on its next
        # append. The locks are replaced because another thread of the parent may have
        # held them at the fork.
        fd = self._fd
        self._reset_state()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- reading -------------------------------------------------------------------------------

    def file_path(self, date_str: str) -> Path:
        """Return the path of the journal file of ``date_str``, whether it exists or not.

        Raises:
            ValueError: ``date_str`` is not YYYYMMDD or YYYY-MM-DD, or not a real date.
        """
        return self.directory / file_name(normalise_date(date_str))

    def read_file(self, date_str: str) -> list[dict[str, Any]]:
        """Return the records of the file of ``date_str``, or [] if there is no such file.

        Lines that cannot be parsed are skipped as read_file_report() describes.

        Raises:
            ValueError: ``date_str`` is not YYYYMMDD or YYYY-MM-DD.
            OSError: the file exists but cannot be read.
        """
        return self.read_file_report(date_str).records

    def read_file_report(self, date_str: str) -> JournalReadResult:
        """Read the records of the file of ``date_str`` and count the corrupt lines.

        Blank lines are ignored. A line that is not valid JSON or not a JSON object is
        skipped and counted, such as a last line cut short by a crash or by an append in
        progress. One WARNING gives the count and the path. The file is read without a lock
        because appends write whole lines. A missing file gives no records. This is
        JournalReader.read on the file of that date.

        Raises:
            ValueError: ``date_str`` is not YYYYMMDD or YYYY-MM-DD.
            OSError: the file exists but cannot be read.
        """
        return JournalReader(self.directory).read(self.file_path(date_str))

    def list_files(self) -> list[Path]:
        """Return the paths of the journal files in the directory, oldest date first.

        Names other than ``events_YYYYMMDD.ndjson`` with a real date, and entries that are
        not files, are left out. A missing directory gives [].

        Raises:
            OSError: the directory exists but cannot be listed.
        """
        return [journal_file.path for journal_file in JournalReader(self.directory).files()]

    def get_file_info(self, date_str: str) -> dict[str, Any]:
        """Read the file of ``date_str`` once and return its size, line counts and times.

        The keys are ``path`` (a Path), ``date`` (YYYYMMDD), ``size_bytes``, ``line_count``
        (non-blank lines, corrupt ones included), ``corrupt_lines``, and
        ``first_timestamp`` and ``last_timestamp``: the time of the first and last record
        in file order that has one, or None. A record's time is its ``timestamp``, else its
        ``end_time`` (run_end only), else its ``start_time``, as stored. Corrupt lines are
        logged as read_file_report() logs them.

        Raises:
            ValueError: ``date_str`` is not YYYYMMDD or YYYY-MM-DD.
            FileNotFoundError: there is no journal file for that date; the error names the path.
            OSError: the file cannot be read.
        """
        date = normalise_date(date_str)
        path = self.file_path(date)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"no journal file for {date}", str(path)
            ) from None

        report = JournalReader(self.directory).read(path)
        times = [
            moment for record in report.records if (moment := _record_time(record)) is not None
        ]
        return {
            "path": path,
            "date": date,
            "size_bytes": size,
            "line_count": len(report.records) + report.corrupt_lines,
            "corrupt_lines": report.corrupt_lines,
            "first_timestamp": times[0] if times else None,
            "last_timestamp": times[-1] if times else None,
        }


# -- fork handling ------------------------------------------------------------------------------

# Every writer alive in this process. A weak set, so that writers can be garbage collected.
_live_writers: weakref.WeakSet[NDJSONWriter] = weakref.WeakSet()


def _reset_writers_in_child() -> None:
    for writer in list(_live_writers):
        writer._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_writers_in_child)


def _run_batch_fsync(
    writer_ref: weakref.ref[NDJSONWriter], stop: threading.Event, interval: float
) -> None:
    """Fsync the writer's lines every ``interval`` seconds until ``stop`` is set."""
    while not stop.wait(interval):
        writer = writer_ref()
        if writer is None:
            return
        try:
            writer.flush()
        except OSError as exc:
            writer._repeats.log(
                logger,
                logging.ERROR,
                ("batch fsync", type(exc)),
                "batch fsync of the journal in %s failed: %s; lines written since the last "
                "fsync may be lost on power loss",
                writer.directory,
                exc,
            )
        del writer


# -- file helpers -------------------------------------------------------------------------------


# Failed fsyncs of the sync thread remembered for the callers whose lines they covered.
# Each caller checks right after its own wait, so a few are enough.
_SYNC_FAILURES_KEPT = 16


def _sync_ahead(writer: NDJSONWriter) -> None:
    # The task of the sync thread: it leads a group commit of every line written so far.
    # A failure is kept for the callers of the lines it covered: each of them fsyncs
    # again in _wait_until_durable, which may succeed without the line, and then raises
    # the kept error in _wait_durable.
    with writer._lock:
        target = writer._written_seq
    try:
        writer._wait_until_durable(target)
    except OSError as exc:
        with writer._durable:
            writer._sync_failures.append((writer._synced_seq + 1, target, exc))
        logger.debug("early fsync of %s failed: %s", writer.directory, exc)


# On POSIX the journal calls flock directly, the call that portalocker's default locker
# makes too (portalocker 4.4), without portalocker's checks of its arguments on every append.


def _lock_file(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    try:
        portalocker.lock(fd, portalocker.LockFlags.EXCLUSIVE)
    except portalocker.LockException as exc:
        raise OSError(errno.ENOLCK, f"failed to lock the journal file: {exc}") from exc


def _unlock_file(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    try:
        portalocker.unlock(fd)
    except portalocker.LockException as exc:
        raise OSError(errno.ENOLCK, f"failed to unlock the journal file: {exc}") from exc


def _ends_with_torn_line(fd: int, size: int) -> bool:
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _write_all(fd: int, data: bytes) -> None:
    # A regular file takes the whole write unless the disk is full or a quota is reached.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.EIO, "os.write wrote 0 bytes of a journal line")
        view = view[written:]


def _make_private_directory(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0o700."""
    missing: list[Path] = []
    current = directory
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, DIRECTORY_MODE)
        except FileExistsError:
            continue
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # Some file systems reject an fsync of a directory. The entry then reaches the disk
        # when the OS writes the directory back.
        logger.warning("fsync of directory %s failed: %s", directory, exc)


# -- times of records ------------------------------------------------------------------------


def _utc_date(value: str | datetime.datetime) -> str:
    """Return the UTC date of a timestamp as YYYYMMDD, as _dates.utc_date does.

    The client's own timestamps (``2026-12-04T19:34:17.123456+00:00``) are already in
    UTC, so their date is cut from the text once it parses. Other values go through
    utc_date, which also raises its errors.
    """
    if (
        type(value) is str
        and len(value) == 32
        and value.endswith("+00:00")
        and value[4] == "-"
        and value[7] == "-"
        and value[10] == "T"
    ):
        try:
            datetime.datetime.fromisoformat(value)
        except ValueError:
            return utc_date(value)
        return value[0:4] + value[5:7] + value[8:10]
    return utc_date(value)


def _time_keys(record_type: object) -> tuple[str, ...]:
    if record_type == "run_end":
        return ("timestamp", "end_time", "start_time")
    return ("timestamp", "start_time")


def _record_time(record: Mapping[str, Any]) -> str | None:
    for key in _time_keys(record.get("record_type")):
        value = record.get(key)
        if isinstance(value, str):
            return value
    return None
