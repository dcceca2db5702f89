"""@tracked_run: record every call of a function as one run, on every kind of callable.

The decorator is a ``wrapt.FunctionWrapper``, so the decorated object keeps the name,
docstring, signature and kind (coroutine, generator, async generator function) of the
original, and binds as the original does when it is a method, classmethod or
staticmethod. Each call is one ``TelemetryClient.track_run`` block:

- a function's run covers the call;
- a coroutine function's run covers the await of the coroutine, from its first step to
  its end;
- a generator's run starts at the first iteration and ends when the generator is
  exhausted (success), raises (failed), or is closed early by its consumer (cancelled).
  The decorator drives the original generator step by step, so ``current_run()`` is the
  generator's run only while the generator's own code runs.

The caller always gets the original result or exception. A fault of telemetry is logged
on a ``telemetry.*`` logger instead of raised, and the function runs exactly once either way.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import pickle
import sys
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, SupportsIndex, TypeVar, overload

import wrapt

from instrument._client import (
    default_client_enabled,
    get_default_client,
    peek_default_client_disabled,
)
from telemetry._fields import check_fields, check_text
from telemetry._logutil import RepeatLimiter
from telemetry.client import TelemetryClient
from telemetry.context import RunContext, TrackedRun, use_run

__all__ = ["tracked_run", "wrap_entry_point"]

logger = logging.getLogger("telemetry.instrument")

_Target = TypeVar("_Target")

_Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]
ResultMetrics = Callable[[Any], Mapping[str, Any]]

_repeats = RepeatLimiter()

# Maximum number of characters of a returned message kept in an entry point's error_summary.
EXIT_MESSAGE_CHARS = 200


def _reset_repeats_in_child() -> None:
    # A fork while another thread logs a fault would leave the limiter's lock held
    # forever in the child.
    global _repeats
    _repeats = RepeatLimiter()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_repeats_in_child)


@dataclass(frozen=True)
class _RunSpec:
    """The settings of one decoration: the client, the run's fields and the result rules."""

    client: TelemetryClient | None
    run_fields: dict[str, Any]
    result_metrics: ResultMetrics | None
    entry_point: bool
    label: str

    def resolve_client(self) -> TelemetryClient:
        return self.client if self.client is not None else get_default_client()


# -- the public decorators ----------------------------------------------------------------


@overload
def tracked_run(function: _Target, /) -> _Target: ...


@overload
def tracked_run(
    *,
    agent_name: str | None = None,
    job_type: str | None = None,
    trigger_type: str = "cli",
    client: TelemetryClient | None = None,
    result_metrics: ResultMetrics | None = None,
    **fields: Any,
) -> Callable[[_Target], _Target]: ...


def tracked_run(
    function: Any = None,
    /,
    *,
    agent_name: str | None = None,
    job_type: str | None = None,
    trigger_type: str = "cli",
    client: TelemetryClient | None = None,
    result_metrics: ResultMetrics | None = None,
    **fields: Any,
) -> Any:
    """Record each call of the decorated callable as one run. Use it bare or with arguments.

    Works on functions, coroutine functions, generator and async generator functions,
    methods, classmethods and staticmethods (above or below ``@classmethod`` and
    ``@staticmethod``), and callable objects. The run ends with the status of
    ``track_run``: success, failed, cancelled or timeout. A generator closed before it is
    exhausted ends as cancelled. Any return value is a result, so a returned int is not an
    exit code as it is for wrap_entry_point.

    Args:
        function: the callable, when the decorator is used bare (``@tracked_run``).
        agent_name: the run's agent. Defaults to the callable's ``__qualname__``.
        job_type: the run's job type. Defaults to the callable's ``__module__``.
        trigger_type: what started the run, such as ``"cli"`` or ``"cron"``.
        client: the client that records the runs. None uses the process-wide default
            client, created from the environment on the first call (get_default_client).
        result_metrics: called with the return value of a successful call, or for a
            generator with the value it returns when exhausted. The mapping it returns is
            passed to ``RunContext.set_metrics`` before the run ends. If it raises or
            returns invalid fields, the error is logged and the run ends without them.
        **fields: run fields set at the start of every run, any of
            ``RunRecord.CALLER_FIELDS`` such as ``product="search"``.

    Returns:
        The wrapper. When telemetry is disabled at decoration time (a disabled ``client``,
        or no client and ``TELEMETRY_ENABLED`` false or the default client disabled), the
        callable itself, undecorated.

    Raises:
        TypeError: an unknown field or a value of the wrong type, a decorated object that
            is not callable, ``result_metrics`` that is not callable, or ``result_metrics``
            on an async generator function, which returns no value.
        ValueError: an empty name, or a count outside 0 to 2**63 - 1.
    """
    options: dict[str, Any] = {
        "agent_name": agent_name,
        "job_type": job_type,
        "trigger_type": trigger_type,
        "client": client,
        "result_metrics": result_metrics,
        "fields": check_fields(fields, "tracked_run"),
    }
    _check_options(options, "tracked_run")
    if function is None:
        return lambda target: _decorate(target, entry_point=False, **options)
    if isinstance(function, str):
        raise TypeError(
            f"tracked_run() got {function!r} as a positional argument, but names are "
            f"keyword arguments: @tracked_run(agent_name={function!r})"
        )
    return _decorate(function, entry_point=False, **options)


def wrap_entry_point(
    function: _Target,
    *,
    agent_name: str,
    job_type: str | None = None,
    client: TelemetryClient | None = None,
) -> _Target:
    """Wrap a program's main function so that each call is a run with exit-code semantics.

    The wrapper is the one of tracked_run, except for the return value. Console scripts
    run ``sys.exit(main())``, so a non-zero int that the function returns is the process's
    exit code, and the run ends as failed with error_summary ``"exit code N"``. ``True``
    counts as 1, as it does for ``sys.exit``. Any other value that is not None, such as a
    message string, is failed with ``"exit code 1: <message>"``, because sys.exit prints it
    and exits with 1. None, 0 and False are success.
    ``SystemExit`` follows the rules of track_run: code 0 or None is success, any other
    code failed.

    Returns:
        The wrapper, or ``function`` itself when telemetry is disabled at this point, as
        for tracked_run.

    Raises:
        TypeError, ValueError: as tracked_run, for the names and the callable.
    """
    options: dict[str, Any] = {
        "agent_name": agent_name,
        "job_type": job_type,
        "trigger_type": "cli",
        "client": client,
        "result_metrics": None,
        "fields": {},
    }
    check_text(agent_name, "wrap_entry_point(): agent_name")
    _check_options(options, "wrap_entry_point")
    wrapped: _Target = _decorate(function, entry_point=True, **options)
    return wrapped


def _check_options(options: dict[str, Any], caller: str) -> None:
    for name in ("agent_name", "job_type"):
        if options[name] is not None:
            check_text(options[name], f"{caller}(): {name}")
    check_text(options["trigger_type"], f"{caller}(): trigger_type")
    client = options["client"]
    if client is not None and not isinstance(client, TelemetryClient):
        raise TypeError(
            f"{caller}(): client must be a TelemetryClient or None, "
            f"not {type(client).__name__}: {client!r}"
        )
    metrics = options["result_metrics"]
    if metrics is not None and not callable(metrics):
        raise TypeError(
            f"{caller}(): result_metrics must be a callable that maps the return value "
            f"to run fields, not {type(metrics).__name__}: {metrics!r}"
        )


def _decorate(
    target: Any,
    *,
    entry_point: bool,
    agent_name: str | None,
    job_type: str | None,
    trigger_type: str,
    client: TelemetryClient | None,
    result_metrics: ResultMetrics | None,
    fields: dict[str, Any],
) -> Any:
    function = _underlying_function(target)
    if not callable(function):
        raise TypeError(
            f"tracked_run() can only decorate a callable, not {type(target).__name__}: {target!r}"
        )
    kind = _kind_of(function)
    if result_metrics is not None and kind == "async generator":
        raise TypeError(
            f"tracked_run(): result_metrics cannot apply to the async generator function "
            f"{_qualified_name(function)}, because it returns no value. Call "
            f"current_run().set_metrics(...) inside the generator instead"
        )

    # When telemetry is off, wrapt's ``enabled`` check calls the function directly and skips
    # the wrapper. Only the default client can change between calls. A client's settings
    # are frozen, so an explicit client that is enabled now stays enabled.
    if client is not None:
        if not client.enabled:
            return target
        enabled = None
    else:
        if peek_default_client_disabled():
            return target
        enabled = default_client_enabled

    spec = _RunSpec(
        client=client,
        run_fields={
            "agent_name": agent_name or _qualname_of(function),
            "job_type": job_type or _module_of(function),
            "trigger_type": trigger_type,
            **fields,
        },
        result_metrics=result_metrics,
        entry_point=entry_point,
        label=_qualified_name(function),
    )
    return _TrackedFunction(target, _WRAPPER_FACTORIES[kind](spec), enabled)


def _underlying_function(target: Any) -> Any:
    if isinstance(target, (classmethod, staticmethod)):
        return target.__func__
    return target


def _kind_of(function: Any) -> str:
    """Return the kind of call that ``function`` makes: its code, or its ``__call__``'s."""
    for candidate in (function, _call_method_of(function)):
        if candidate is None:
            continue
        if inspect.isasyncgenfunction(candidate):
            return "async generator"
        if inspect.isgeneratorfunction(candidate):
            return "generator"
        if inspect.iscoroutinefunction(candidate):
            return "coroutine"
    return "function"


def _call_method_of(function: Any) -> Any:
    # Calling an instance runs its class's __call__, but calling a function, a method
    # or a class does not.
    if inspect.isroutine(function) or inspect.isclass(function):
        return None
    return type(function).__call__


def _qualname_of(function: Any) -> str:
    name = getattr(function, "__qualname__", None)
    return name if isinstance(name, str) and name else type(function).__qualname__


def _module_of(function: Any) -> str:
    module = getattr(function, "__module__", None)
    return module if isinstance(module, str) and module else type(function).__module__


def _qualified_name(function: Any) -> str:
    return f"{_module_of(function)}.{_qualname_of(function)}"


# -- the wrapper objects ----------------------------------------------------------------


class _BoundTrackedFunction(wrapt.BoundFunctionWrapper):  # type: ignore[type-arg]
    """The tracked function bound to an instance or class, as a method is."""

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Pickle as a bound method does, as a lookup of the name on its instance or class."""
        holder = self._self_instance
        if holder is None:
            holder = getattr(self.__wrapped__, "__self__", None)
        if holder is None:
            holder = self._self_owner
        return getattr, (holder, self.__name__)


class _TrackedFunction(wrapt.FunctionWrapper):  # type: ignore[type-arg]
    """A callable decorated by tracked_run. Pickled and copied as a function is."""

    __bound_function_wrapper__ = _BoundTrackedFunction

    def __reduce_ex__(self, protocol: SupportsIndex) -> str:
        """Pickle by reference: the unpickler imports the module and looks the name up.

        A wrapt proxy raises NotImplementedError when pickled, unless it defines this.
        Like a function, the wrapper pickles only where its module and qualified name
        lead back to it.

        Raises:
            pickle.PicklingError: the wrapped object has no qualified name, as a callable
                instance does not.
        """
        name = getattr(self.__wrapped__, "__qualname__", None)
        if not isinstance(name, str):
            raise pickle.PicklingError(
                f"cannot pickle {self!r}: a decorated object pickles by module and "
                f"qualified name, and a {type(self.__wrapped__).__name__} instance has "
                f"none. Decorate a module-level function or method instead"
            )
        return name

    def __copy__(self) -> _TrackedFunction:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _TrackedFunction:
        return self


# -- functions and coroutines --------------------------------------------------------------


def _function_wrapper(spec: _RunSpec) -> _Wrapper:
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        run = _enter(spec.resolve_client(), spec)
        if run is None:
            return wrapped(*args, **kwargs)
        tracked, context = run

        try:
            result = wrapped(*args, **kwargs)
        except BaseException as error:
            _exit(spec, tracked, error)
            raise

        interrupt = _record_result(spec, context, result)
        _exit(spec, tracked, interrupt)
        if interrupt is not None:
            raise interrupt
        return result

    return wrapper


def _coroutine_wrapper(spec: _RunSpec) -> _Wrapper:
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # Called here, not inside the driver, so that wrong arguments raise at the call
        # as they do without the decorator.
        coroutine = wrapped(*args, **kwargs)
        driver = _named_like(_await_tracked(coroutine, spec.resolve_client(), spec), coroutine)
        # A driver closed or dropped before its first step never awaits the coroutine;
        # closing it then keeps Python from warning that it was never awaited.
        close = getattr(coroutine, "close", None)
        if close is not None:  # an awaitable that is not a coroutine may have no close()
            weakref.finalize(driver, close)
        return driver

    return wrapper


async def _await_tracked(coroutine: Any, client: TelemetryClient, spec: _RunSpec) -> Any:
    run = _enter(client, spec)
    if run is None:
        return await coroutine
    tracked, context = run

    try:
        result = await coroutine
    except BaseException as error:
        await _async_exit(spec, tracked, error)
        raise

    interrupt = _record_result(spec, context, result)
    await _async_exit(spec, tracked, interrupt)
    if interrupt is not None:
        raise interrupt
    return result


# -- generators ---------------------------------------------------------------------------


def _generator_wrapper(spec: _RunSpec) -> _Wrapper:
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        generator = wrapped(*args, **kwargs)
        return _named_like(_drive_generator(generator, spec.resolve_client(), spec), generator)

    return wrapper


def _drive_generator(
    generator: Generator[Any, Any, Any], client: TelemetryClient, spec: _RunSpec
) -> Generator[Any, Any, Any]:
    """Yield what ``generator`` yields, forwarding send, throw and close, as one run.

    The steps follow the expansion of ``yield from`` in PEP 380, with the run made
    current around each step of ``generator`` and nowhere else.
    """
    run = _enter_detached(client, spec)
    tracked, context = run if run is not None else (None, None)
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            item = _step(generator, context, sent, thrown)
        except StopIteration as stop:
            if tracked is not None and context is not None:
                interrupt = _record_result(spec, context, stop.value)
                _exit(spec, tracked, interrupt)
                if interrupt is not None:
                    raise interrupt from None
            return stop.value
        except BaseException as error:
            if tracked is not None:
                _exit(spec, tracked, error)
            raise
        finally:
            thrown = None

        try:
            sent = yield item
        except GeneratorExit as close_request:
            try:
                _close(generator, context)
            except BaseException as error:
                if tracked is not None:
                    _exit(spec, tracked, error)
                raise
            if tracked is not None:
                _exit(spec, tracked, close_request)
            raise
        except BaseException as error:
            sent = None
            thrown = error


def _step(
    generator: Generator[Any, Any, Any],
    context: RunContext | None,
    sent: Any,
    thrown: BaseException | None,
) -> Any:
    with use_run(context):
        if thrown is not None:
            return generator.throw(thrown)
        return generator.send(sent)


def _close(generator: Generator[Any, Any, Any], context: RunContext | None) -> None:
    with use_run(context):
        generator.close()


def _async_generator_wrapper(spec: _RunSpec) -> _Wrapper:
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        generator = wrapped(*args, **kwargs)
        return _named_like(
            _drive_async_generator(generator, spec.resolve_client(), spec), generator
        )

    return wrapper


async def _drive_async_generator(
    generator: AsyncGenerator[Any, Any], client: TelemetryClient, spec: _RunSpec
) -> AsyncGenerator[Any, Any]:
    """Yield what ``generator`` yields, forwarding asend, athrow and aclose, as one run.

    The same steps as _drive_generator, awaited.
    """
    run = _enter_detached(client, spec)
    tracked, context = run if run is not None else (None, None)
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            item = await _async_step(generator, context, sent, thrown)
        except StopAsyncIteration:
            if tracked is not None:
                await _async_exit(spec, tracked, None)
            return
        except BaseException as error:
            if tracked is not None:
                await _async_exit(spec, tracked, error)
            raise
        finally:
            thrown = None

        try:
            sent = yield item
        except GeneratorExit as close_request:
            try:
                await _async_close(generator, context)
            except BaseException as error:
                if tracked is not None:
                    await _async_exit(spec, tracked, error)
                raise
            if tracked is not None:
                await _async_exit(spec, tracked, close_request)
            raise
        except BaseException as error:
            sent = None
            thrown = error


async def _async_step(
    generator: AsyncGenerator[Any, Any],
    context: RunContext | None,
    sent: Any,
    thrown: BaseException | None,
) -> Any:
    with use_run(context):
        if thrown is not None:
            return await _unhooked(lambda: generator.athrow(thrown))
        return await _unhooked(lambda: generator.asend(sent))


async def _async_close(generator: AsyncGenerator[Any, Any], context: RunContext | None) -> None:
    with use_run(context):
        await _unhooked(generator.aclose)


def _unhooked(start: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
    """Call ``start`` with the thread's async generator hooks switched off.

    The first asend, athrow or aclose of an async generator registers it with the event
    loop's hooks. Only the driver must be registered, because at shutdown the loop closes
    every registered generator at once, and closing the inner one beside the driver's own
    aclose of it fails with "already running".
    """
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=None, finalizer=None)
    try:
        return start()
    finally:
        sys.set_asyncgen_hooks(*hooks)


_WRAPPER_FACTORIES: dict[str, Callable[[_RunSpec], _Wrapper]] = {
    "function": _function_wrapper,
    "coroutine": _coroutine_wrapper,
    "generator": _generator_wrapper,
    "async generator": _async_generator_wrapper,
}


def _named_like(driver: Any, original: Any) -> Any:
    """Give a driving coroutine or generator the name of the one it drives, for reprs."""
    for attribute in ("__name__", "__qualname__"):
        name = getattr(original, attribute, None)
        if isinstance(name, str):
            setattr(driver, attribute, name)
    return driver


# -- starting and ending runs, with every fault logged ------------------------------------


def _enter(client: TelemetryClient, spec: _RunSpec) -> tuple[TrackedRun, RunContext] | None:
    """Start a run and make it current here. Return None, with the fault logged, if that fails."""
    try:
        tracked = client.track_run(**spec.run_fields)
        return tracked, tracked.__enter__()
    except Exception as exc:
        _log_fault(spec, exc, "start", "The call goes on without a run")
        return None


def _enter_detached(
    client: TelemetryClient, spec: _RunSpec
) -> tuple[TrackedRun, RunContext] | None:
    """Start a run with the current run as its parent, without making it current here.

    The run is entered in a copy of the current context, so the caller's context keeps
    its run. When the run ends in the caller's context, TrackedRun leaves that context
    alone, because its variable token belongs to the copy.
    """
    try:
        tracked = client.track_run(**spec.run_fields)
        return tracked, contextvars.copy_context().run(tracked.__enter__)
    except Exception as exc:
        _log_fault(spec, exc, "start", "The call goes on without a run")
        return None


def _exit(spec: _RunSpec, tracked: TrackedRun, error: BaseException | None) -> None:
    try:
        if error is None:
            tracked.__exit__(None, None, None)
        else:
            tracked.__exit__(type(error), error, error.__traceback__)
    except Exception as exc:
        _log_fault(spec, exc, "end", "The run stays open")


async def _async_exit(spec: _RunSpec, tracked: TrackedRun, error: BaseException | None) -> None:
    try:
        if error is None:
            await tracked.__aexit__(None, None, None)
        else:
            await tracked.__aexit__(type(error), error, error.__traceback__)
    except Exception as exc:
        _log_fault(spec, exc, "end", "The run stays open")


def _record_result(spec: _RunSpec, context: RunContext, result: Any) -> BaseException | None:
    """Apply the result rules of ``spec`` to the run: exit code or result_metrics.

    An Exception from result_metrics is logged. A KeyboardInterrupt or SystemExit is
    returned instead, for the caller to end the run with it and then raise it.
    """
    try:
        if spec.entry_point:
            _record_exit_code(context, result)
        elif spec.result_metrics is not None:
            context.set_metrics(**spec.result_metrics(result))
    except Exception as exc:
        action = "record the exit code in" if spec.entry_point else "apply result_metrics to"
        _log_fault(spec, exc, action, "The run ends without those fields")
    except BaseException as interrupt:
        return interrupt
    return None


def _record_exit_code(context: RunContext, result: Any) -> None:
    # The status sys.exit(result) would give: None and 0 succeed, another int is the exit
    # code, and any other value is printed to stderr with exit code 1.
    if result is None or (isinstance(result, int) and result == 0):
        return
    context.set_status("failed")
    if isinstance(result, int):
        context.set_metrics(error_summary=f"exit code {int(result)}")
        return
    try:
        text = str(result)
    except Exception:
        text = f"<{type(result).__name__} whose str() raised>"
    context.set_metrics(error_summary=f"exit code 1: {text[:EXIT_MESSAGE_CHARS]}")


def _log_fault(spec: _RunSpec, exc: Exception, action: str, consequence: str) -> None:
    text = str(exc)
    description = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    _repeats.log(
        logger,
        logging.ERROR,
        (action, spec.label, type(exc)),
        "failed to %s the run of %s: %s. %s",
        action,
        spec.label,
        description,
        consequence,
    )
