"""RunContext, the handle of a live run, and the ``track_run`` context manager."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import traceback
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from telemetry._fields import check_fields, check_final_status

if TYPE_CHECKING:
    from telemetry.client import TelemetryClient

__all__ = ["RunContext", "TrackedRun", "classify_exit", "current_run", "use_run"]

logger = logging.getLogger("telemetry.client")

MAX_ERROR_SUMMARY = 500
MAX_ERROR_DETAILS = 64 * 1024

_current_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "agent_telemetry_current_run", default=None
)


def current_run() -> RunContext | None:
    """Return the RunContext of the innermost ``track_run`` active here, or None.

    The value follows contextvars, so each thread and asyncio task has its own run, and a
    task created inside a run inherits that run. A thread started inside a run does not,
    because a new thread starts with an empty context. Run it through
    ``contextvars.copy_context().run`` to pass the run on.
    """
    return _current_run.get()


@contextlib.contextmanager
def use_run(context: RunContext | None) -> Iterator[None]:
    """Make ``context`` the current run inside the block; None leaves the current run as is.

    For code that resumes a run's work piece by piece, such as a generator driven step by
    step, so that current_run() is the run only while the run's own code executes.
    """
    if context is None:
        yield
        return
    token = _current_run.set(context)
    try:
        yield
    finally:
        _current_run.reset(token)


class RunContext:
    """Handle of a live run: log events and set its fields until the run ends.

    Fields set here are kept in memory and written with the run's end record.
    """

    __slots__ = ("_client", "_run_id", "_status")

    def __init__(self, client: TelemetryClient, run_id: str) -> None:
        self._client = client
        self._run_id = run_id
        self._status: str | None = None

    @property
    def run_id(self) -> str:
        """The id of the run."""
        return self._run_id

    @property
    def client(self) -> TelemetryClient:
        """The client that records the run."""
        return self._client

    def log_event(self, event_type: str, payload: Mapping[str, Any] | None = None) -> None:
        """Journal an event of this run; see TelemetryClient.log_event."""
        self._client.log_event(self._run_id, event_type, payload)

    def set_metrics(self, **fields: Any) -> None:
        """Set fields of the run, such as items_succeeded=10 or product="search".

        ``metrics_json`` is merged into the metrics set so far; other fields are replaced.

        Raises:
            TypeError: an unknown field or a value of the wrong type, named in the message.
            ValueError: a count outside 0 to 2**63 - 1.
        """
        self._client._update_active(self._run_id, check_fields(fields, "set_metrics"))

    def set_status(self, status: str) -> None:
        """Set the status that the run ends with if its block exits normally.

        Use it for ``partial`` or ``timeout``; an exception leaving the block still decides
        the status.

        Raises:
            ValueError: ``status`` is not a final status; the message lists them.
        """
        self._status = check_final_status(status, "set_status")

    def __repr__(self) -> str:
        return f"RunContext(run_id={self._run_id!r})"


def classify_exit(error: BaseException | None) -> tuple[str, dict[str, str]]:
    """Return the final status for a block left with ``error``, and the error fields.

    ==============================================  ===========
    how the block ended                             status
    ==============================================  ===========
    normally, SystemExit(0), SystemExit(None)       success
    TimeoutError (asyncio.TimeoutError included)    timeout
    KeyboardInterrupt, asyncio.CancelledError,
    GeneratorExit                                   cancelled
    any other exception, other SystemExit codes     failed
    ==============================================  ===========

    Every status other than success records the exception type in error_summary, and an
    Exception's traceback in error_details. A block inside ``asyncio.timeout()`` or
    ``asyncio.wait_for`` receives the cancellation, not the TimeoutError raised outside it, so
    its run ends as cancelled.
    """
    if error is None:
        return "success", {}
    if isinstance(error, SystemExit) and error.code in (0, None):
        return "success", {}

    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        status = "timeout"
    elif isinstance(error, (KeyboardInterrupt, asyncio.CancelledError, GeneratorExit)):
        status = "cancelled"
    else:
        status = "failed"

    message = _safe_str(error)
    summary = type(error).__qualname__ + (f": {message}" if message else "")
    fields = {"error_summary": _truncate(summary, MAX_ERROR_SUMMARY)}
    if isinstance(error, Exception) or status == "failed":
        try:
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        except Exception as exc:
            details = f"{summary}\n<the traceback could not be formatted: {type(exc).__name__}>"
        fields["error_details"] = _truncate(details, MAX_ERROR_DETAILS)
    return status, fields


def _safe_str(error: BaseException) -> str:
    # str() runs the exception's own __str__, which can raise; the host's exception must
    # still reach the caller unchanged.
    try:
        return str(error)
    except Exception as exc:
        return f"<str() of the exception raised {type(exc).__name__}>"


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 14] + " ...[truncated]"


class TrackedRun:
    """Context manager of ``TelemetryClient.track_run``, for ``with`` and ``async with``.

    Entering starts the run and yields its RunContext. Leaving ends it with the status from
    classify_exit, or with the one given to RunContext.set_status when the block exits
    normally. The exception, if any, always propagates unchanged, and a fault while
    recording is logged.
    """

    __slots__ = ("_client", "_context", "_fields", "_token")

    def __init__(self, client: TelemetryClient, fields: dict[str, Any]) -> None:
        self._client = client
        self._fields = fields
        self._context: RunContext | None = None
        self._token: contextvars.Token[RunContext | None] | None = None

    def __enter__(self) -> RunContext:
        if self._context is not None:
            raise RuntimeError(
                "a track_run() block cannot be entered twice; call track_run() again"
            )
        fields = dict(self._fields)
        parent = _current_run.get()
        if parent is not None and fields.get("parent_run_id") is None:
            fields["parent_run_id"] = parent.run_id
        run_id = self._client.start_run(**fields)
        self._context = RunContext(self._client, run_id)
        self._token = _current_run.set(self._context)
        return self._context

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context = self._leave()
        if context is None:
            return
        try:
            status, error_fields = self._final_status(context, exc)
            self._client.end_run(context.run_id, status, **error_fields)
        except Exception:
            logger.exception("failed to end run %s; the run stays open", context.run_id)

    def _leave(self) -> RunContext | None:
        if self._token is not None:
            # A block left in another context than the one it entered (a generator
            # resumed by another task) never set the variable there.
            with contextlib.suppress(ValueError):
                _current_run.reset(self._token)
            self._token = None
        return self._context

    @staticmethod
    def _final_status(
        context: RunContext, error: BaseException | None
    ) -> tuple[str, dict[str, str]]:
        status, error_fields = classify_exit(error)
        if error is None and context._status is not None:
            status = context._status
        return status, error_fields

    async def __aenter__(self) -> RunContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context = self._leave()
        if context is None:
            return
        try:
            status, error_fields = self._final_status(context, exc)
            await self._client._end_run_async(context.run_id, status, error_fields)
        except Exception:
            logger.exception("failed to end run %s; the run stays open", context.run_id)
