"""@tracked_run and wrap_entry_point against a real journal and SQLite index."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
import logging
import multiprocessing
import os
import pickle
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import instrument_targets
import pytest

from instrument import (
    current_run,
    get_default_client,
    set_default_client,
    tracked_run,
    wrap_entry_point,
)
from telemetry import RunRecord, TelemetryClient, TelemetryConfig
from telemetry.database import DatabaseWriter

# Python 3.14 added sys.flags.thread_inherit_context. When it is true, as it is by default
# on free-threaded builds, a new thread starts with a copy of its starter's context.
THREADS_INHERIT_CONTEXT = bool(getattr(sys.flags, "thread_inherit_context", 0))
BARRIER_TIMEOUT = 30.0


def make_client(tmp_path: Path, **settings: Any) -> TelemetryClient:
    settings.setdefault("data_dir", tmp_path / "store")
    settings.setdefault("durability", "none")
    return TelemetryClient(TelemetryConfig(environ={}, **settings))


def stored_runs(client: TelemetryClient) -> list[RunRecord]:
    """Return the runs in the client's index, oldest first."""
    index = DatabaseWriter(client.config.db_path)
    try:
        return list(reversed(index.list_runs(limit=None)))
    finally:
        index.close()


def runs_by_id(client: TelemetryClient) -> dict[str, RunRecord]:
    return {run.run_id: run for run in stored_runs(client)}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TelemetryClient]:
    with make_client(tmp_path) as opened:
        yield opened


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Remove TELEMETRY_* variables and the default client, and restore both afterwards."""
    for name in list(os.environ):
        if name.startswith("TELEMETRY_"):
            monkeypatch.delenv(name)
    previous = set_default_client(None)
    yield
    discarded = set_default_client(previous)
    if discarded is not None:
        discarded.close()


@pytest.fixture
def default_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> Iterator[TelemetryClient]:
    """Point the environment at a store in tmp_path and yield the default client."""
    monkeypatch.setenv("TELEMETRY_DATA_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("TELEMETRY_DURABILITY", "none")
    with get_default_client() as created:
        yield created


# -- callables used by several tests -----------------------------------------------------


def plain_function(first: int, second: str = "x", *rest: int, flag: bool = False) -> str:
    """Join the arguments."""
    return f"{first}{second}{rest}{flag}"


async def coroutine_function(value: int, *, scale: int = 2) -> int:
    """Return value times scale."""
    await asyncio.sleep(0)
    return value * scale


def accumulate(log: list[str]) -> Generator[int, int | None, int]:
    """Yield the sum of the values sent so far. A thrown ValueError resets it, None ends it."""
    total = 0
    try:
        while True:
            try:
                value = yield total
            except ValueError:
                total = 0
                continue
            if value is None:
                return total
            total += value
    finally:
        log.append("cleanup")


async def accumulate_async(log: list[str]) -> AsyncGenerator[int, int | None]:
    """Yield the sum of the values sent so far. A thrown ValueError resets it, None ends it."""
    total = 0
    try:
        while True:
            try:
                value = yield total
            except ValueError:
                total = 0
                continue
            if value is None:
                return
            total += value
    finally:
        await asyncio.sleep(0)
        log.append("cleanup")


def drive_to_end(generator: Generator[int, int | None, int]) -> list[object]:
    """Return what next, send and a handled throw give, then the value returned at the end."""
    outputs: list[object] = [
        next(generator),
        generator.send(2),
        generator.send(3),
        generator.throw(ValueError("reset")),
        generator.send(4),
    ]
    with pytest.raises(StopIteration) as stop:
        generator.send(None)
    outputs.append(stop.value.value)
    return outputs


async def drive_async_to_end(generator: AsyncGenerator[int, int | None]) -> list[object]:
    """Return what asend and a handled athrow give, then mark the end of iteration."""
    outputs: list[object] = [
        await generator.asend(None),
        await generator.asend(2),
        await generator.asend(3),
        await generator.athrow(ValueError("reset")),
        await generator.asend(4),
    ]
    with pytest.raises(StopAsyncIteration):
        await generator.asend(None)
    outputs.append("end")
    return outputs


def observe_runs(seen: list[object]) -> Generator[int, None, None]:
    """Record current_run() at the start of each step and in the cleanup."""
    try:
        for step in range(2):
            seen.append(current_run())
            yield step
    finally:
        seen.append(current_run())


async def observe_runs_async(seen: list[object]) -> AsyncGenerator[int, None]:
    """Record current_run() at the start of each step and in the cleanup."""
    try:
        for step in range(2):
            seen.append(current_run())
            yield step
    finally:
        seen.append(current_run())


class Counter:
    """A callable object that counts the steps it is called with."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, step: int = 1) -> int:
        self.calls += step
        return self.calls


class AsyncEcho:
    """A callable object whose calls are coroutines."""

    async def __call__(self, value: object) -> object:
        await asyncio.sleep(0)
        return value


def make_classes(decorate: Callable[[Any], Any]) -> tuple[type[Any], type[Any]]:
    """Return a base class with methods of every kind decorated, and a subclass of it."""

    class Base:
        @decorate
        def method(self, value: int) -> tuple[object, int]:
            """Return the instance and the value."""
            return self, value

        @decorate
        @classmethod
        def class_above(cls, value: int) -> tuple[object, int]:
            """Return the class and the value."""
            return cls, value

        @classmethod
        @decorate
        def class_below(cls, value: int) -> tuple[object, int]:
            """Return the class and the value."""
            return cls, value

        @decorate
        @staticmethod
        def static_above(value: int) -> tuple[object, int]:
            """Return None and the value."""
            return None, value

        @staticmethod
        @decorate
        def static_below(value: int) -> tuple[object, int]:
            """Return None and the value."""
            return None, value

        @decorate
        async def async_method(self, value: int) -> tuple[object, int]:
            """Return the instance and the value, from a coroutine."""
            await asyncio.sleep(0)
            return self, value

    class Sub(Base):
        pass

    return Base, Sub


# -- decoration ---------------------------------------------------------------------------


def test_bare_decorator_defaults(default_client: TelemetryClient) -> None:
    """Bare @tracked_run names the run after the function's qualname and module."""
    run_id = instrument_targets.bare_target()

    [run] = stored_runs(default_client)
    assert run.run_id == run_id
    assert run.agent_name == "bare_target"
    assert run.job_type == "instrument_targets"
    assert run.trigger_type == "cli"


def test_fields_recorded(client: TelemetryClient) -> None:
    """Names, trigger type and fields given to the decorator reach every run."""

    @tracked_run(
        agent_name="importer",
        job_type="import",
        trigger_type="cron",
        client=client,
        product="search",
        items_discovered=4,
    )
    def run_import() -> None:
        """Import nothing."""

    run_import()

    [run] = stored_runs(client)
    assert run.agent_name == "importer"
    assert run.job_type == "import"
    assert run.trigger_type == "cron"
    assert run.product == "search"
    assert run.items_discovered == 4


def test_unknown_field_raises(client: TelemetryClient) -> None:
    """An unknown field raises TypeError naming it when the decorator is applied."""
    with pytest.raises(TypeError, match="unknown field 'prodcut'"):
        tracked_run(client=client, prodcut="search")


def test_wrong_field_type_raises(client: TelemetryClient) -> None:
    """A field of the wrong type raises TypeError at decoration."""
    with pytest.raises(TypeError, match="items_discovered must be an int"):
        tracked_run(client=client, items_discovered="4")


def test_empty_agent_name_raises(client: TelemetryClient) -> None:
    """An empty agent_name raises ValueError at decoration."""
    with pytest.raises(ValueError, match="agent_name must not be empty"):
        tracked_run(client=client, agent_name=" ")


def test_positional_name_raises() -> None:
    """A name passed positionally raises TypeError that shows the keyword form."""
    with pytest.raises(TypeError, match=r"@tracked_run\(agent_name='importer'\)"):
        tracked_run("importer")


def test_non_callable_raises(client: TelemetryClient) -> None:
    """Decorating something that is not callable raises TypeError."""
    with pytest.raises(TypeError, match="can only decorate a callable"):
        tracked_run(client=client)(42)


def test_wrong_client_type_raises() -> None:
    """A client that is not a TelemetryClient raises TypeError."""
    with pytest.raises(TypeError, match="client must be a TelemetryClient"):
        tracked_run(client="default")  # type: ignore[call-overload]


def test_result_metrics_not_callable_raises(client: TelemetryClient) -> None:
    """result_metrics that is not callable raises TypeError at decoration."""
    with pytest.raises(TypeError, match="result_metrics must be a callable"):
        tracked_run(client=client, result_metrics={"items_succeeded": 1})  # type: ignore[call-overload]


def test_result_metrics_async_generator_raises(client: TelemetryClient) -> None:
    """result_metrics on an async generator function, which returns nothing, raises."""
    decorate = tracked_run(client=client, result_metrics=lambda result: {})
    with pytest.raises(TypeError, match="returns no value"):
        decorate(accumulate_async)


# -- introspection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "original",
    [plain_function, coroutine_function, accumulate, accumulate_async, observe_runs],
    ids=lambda function: function.__name__,
)
def test_introspection_unchanged(client: TelemetryClient, original: Callable[..., Any]) -> None:
    """Signature, names, docstring and kind of the decorated function are the original's."""
    decorated: Any = tracked_run(client=client)(original)

    assert inspect.signature(decorated) == inspect.signature(original)
    assert decorated.__name__ == original.__name__
    assert decorated.__qualname__ == original.__qualname__
    assert decorated.__doc__ == original.__doc__
    assert decorated.__module__ == original.__module__
    assert decorated.__wrapped__ is original
    assert inspect.iscoroutinefunction(decorated) == inspect.iscoroutinefunction(original)
    assert inspect.isgeneratorfunction(decorated) == inspect.isgeneratorfunction(original)
    assert inspect.isasyncgenfunction(decorated) == inspect.isasyncgenfunction(original)


@pytest.mark.parametrize(
    "name", ["method", "class_above", "class_below", "static_above", "static_below"]
)
def test_method_introspection_unchanged(client: TelemetryClient, name: str) -> None:
    """Methods of every kind keep their signature, names and docstring on class and instance."""
    Plain, _ = make_classes(lambda function: function)
    Tracked, _ = make_classes(tracked_run(client=client))

    for plain, tracked in [
        (getattr(Plain, name), getattr(Tracked, name)),
        (getattr(Plain(), name), getattr(Tracked(), name)),
    ]:
        assert inspect.signature(tracked) == inspect.signature(plain)
        assert tracked.__name__ == plain.__name__
        assert tracked.__qualname__.split(".")[-1] == plain.__qualname__.split(".")[-1]
        assert tracked.__doc__ == plain.__doc__


# -- functions ----------------------------------------------------------------------------


def test_function_result_identity(client: TelemetryClient) -> None:
    """The caller gets the very object the function returned, and the run succeeds."""
    result = object()

    @tracked_run(client=client)
    def produce() -> object:
        return result

    assert produce() is result
    [run] = stored_runs(client)
    assert run.status == "success"
    assert run.duration_ms is not None


def test_function_current_run(client: TelemetryClient) -> None:
    """current_run() is the call's run inside it, and None again after it."""

    @tracked_run(client=client)
    def read_run_id() -> str:
        run = current_run()
        assert run is not None
        return run.run_id

    run_id = read_run_id()

    assert current_run() is None
    assert [run.run_id for run in stored_runs(client)] == [run_id]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ValueError("bad row"), "failed"),
        (TimeoutError("slow"), "timeout"),
        (KeyboardInterrupt(), "cancelled"),
        (SystemExit(0), "success"),
        (SystemExit(None), "success"),
        (SystemExit(2), "failed"),
    ],
    ids=repr,
)
def test_function_exit_status(client: TelemetryClient, error: BaseException, status: str) -> None:
    """An exception leaves the call unchanged and sets the status track_run gives it."""

    @tracked_run(client=client)
    def fail() -> None:
        raise error

    with pytest.raises(type(error)) as caught:
        fail()

    assert caught.value is error
    [run] = stored_runs(client)
    assert run.status == status


def test_function_error_summary(client: TelemetryClient) -> None:
    """A failed run records the exception type and message, and the traceback."""

    @tracked_run(client=client)
    def fail() -> None:
        raise ValueError("bad row 7")

    with pytest.raises(ValueError, match="bad row 7"):
        fail()

    [run] = stored_runs(client)
    assert run.error_summary == "ValueError: bad row 7"
    assert run.error_details is not None
    assert "in fail" in run.error_details


def test_function_set_status(client: TelemetryClient) -> None:
    """A status set through current_run() is the status the run ends with."""

    @tracked_run(client=client)
    def half_done() -> None:
        run = current_run()
        assert run is not None
        run.set_status("partial")

    half_done()

    [run] = stored_runs(client)
    assert run.status == "partial"


def test_function_runs_once_per_call(client: TelemetryClient) -> None:
    """Each call is one run, and the function runs once per call."""
    calls: list[int] = []

    @tracked_run(client=client)
    def record(value: int) -> None:
        calls.append(value)

    record(1)
    record(2)

    assert calls == [1, 2]
    assert len(stored_runs(client)) == 2


# -- coroutines ---------------------------------------------------------------------------


def test_coroutine_run_spans_await(client: TelemetryClient) -> None:
    """A coroutine's run starts when it is awaited and ends when it finishes."""
    states: list[list[str]] = []

    async def main() -> int:
        release = asyncio.Event()

        @tracked_run(client=client)
        async def wait_for_release() -> int:
            await release.wait()
            return 7

        coroutine = wait_for_release()
        states.append([run.status for run in stored_runs(client)])
        task = asyncio.ensure_future(coroutine)
        await asyncio.sleep(0)
        states.append([run.status for run in stored_runs(client)])
        release.set()
        return await task

    assert asyncio.run(main()) == 7
    assert states == [[], ["running"]]
    assert [run.status for run in stored_runs(client)] == ["success"]


def test_coroutine_error_identity(client: TelemetryClient) -> None:
    """A coroutine's exception reaches the awaiting code unchanged, and the run fails."""
    error = LookupError("no such page")

    @tracked_run(client=client)
    async def fail() -> None:
        await asyncio.sleep(0)
        raise error

    with pytest.raises(LookupError) as caught:
        asyncio.run(fail())

    assert caught.value is error
    [run] = stored_runs(client)
    assert run.status == "failed"


def test_coroutine_cancelled(client: TelemetryClient) -> None:
    """A task cancelled while its coroutine runs ends the run as cancelled."""

    async def main() -> None:
        started = asyncio.Event()

        @tracked_run(client=client)
        async def wait_forever() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(wait_forever())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())

    [run] = stored_runs(client)
    assert run.status == "cancelled"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
def test_coroutine_timeout_outside(client: TelemetryClient) -> None:
    """A coroutine stopped by asyncio.timeout gets CancelledError, so its run is cancelled."""

    @tracked_run(client=client)
    async def wait_forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        # A delay of 0 fires once the coroutine first waits, without waiting for a clock.
        async with asyncio.timeout(0):  # type: ignore[attr-defined,unused-ignore]
            await wait_forever()

    with pytest.raises(TimeoutError):
        asyncio.run(main())

    [run] = stored_runs(client)
    assert run.status == "cancelled"
    assert run.error_summary == "CancelledError"


def test_coroutine_result_metrics(client: TelemetryClient) -> None:
    """result_metrics gets the awaited result of a coroutine."""
    decorated = tracked_run(
        client=client, result_metrics=lambda result: {"items_succeeded": result}
    )(coroutine_function)

    assert asyncio.run(decorated(3)) == 6
    [run] = stored_runs(client)
    assert run.items_succeeded == 6


def test_coroutine_named_like_original(client: TelemetryClient) -> None:
    """The coroutine object a decorated call returns has the original's name."""
    coroutine: Any = tracked_run(client=client)(coroutine_function)(1)
    try:
        assert coroutine.__name__ == "coroutine_function"
        assert coroutine.__qualname__ == "coroutine_function"
    finally:
        asyncio.run(coroutine)


# -- generators ---------------------------------------------------------------------------


def test_generator_same_as_undecorated(client: TelemetryClient) -> None:
    """next, send, a handled throw and the return value match the undecorated generator."""
    plain_log: list[str] = []
    tracked_log: list[str] = []
    decorated = tracked_run(client=client)(accumulate)

    expected = drive_to_end(accumulate(plain_log))
    outputs = drive_to_end(decorated(tracked_log))

    assert outputs == expected
    assert outputs == [0, 2, 5, 0, 4, 4]
    assert tracked_log == plain_log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "success"


def test_generator_run_starts_at_first_step(client: TelemetryClient) -> None:
    """Calling a generator function records nothing, and the first next() starts the run."""
    log: list[str] = []
    generator = tracked_run(client=client)(accumulate)(log)

    before = stored_runs(client)
    next(generator)
    during = [run.status for run in stored_runs(client)]
    generator.close()

    assert before == []
    assert during == ["running"]
    assert [run.status for run in stored_runs(client)] == ["cancelled"]


def test_generator_unhandled_throw(client: TelemetryClient) -> None:
    """An exception thrown in and not handled propagates unchanged, and the run fails."""
    log: list[str] = []
    error = KeyError("stop here")
    generator = tracked_run(client=client)(accumulate)(log)
    next(generator)

    with pytest.raises(KeyError) as caught:
        generator.throw(error)

    assert caught.value is error
    assert log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "failed"
    assert run.error_summary == "KeyError: 'stop here'"


def test_generator_own_error(client: TelemetryClient) -> None:
    """An exception raised by the generator itself fails the run and reaches the consumer."""

    @tracked_run(client=client)
    def broken() -> Generator[int, None, None]:
        yield 1
        raise RuntimeError("feed closed")

    generator = broken()
    next(generator)
    with pytest.raises(RuntimeError, match="feed closed"):
        next(generator)

    [run] = stored_runs(client)
    assert run.status == "failed"


def test_generator_closed_early(client: TelemetryClient) -> None:
    """A generator closed before exhaustion runs its finally and ends as cancelled."""
    log: list[str] = []
    generator = tracked_run(client=client)(accumulate)(log)
    next(generator)
    generator.send(5)

    generator.close()

    assert log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "cancelled"
    assert run.error_summary == "GeneratorExit"


def test_generator_break_in_loop(client: TelemetryClient) -> None:
    """A loop left with break closes the dropped generator, and the run is cancelled."""
    log: list[str] = []
    for total in tracked_run(client=client)(accumulate)(log):
        assert total == 0
        break

    assert log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "cancelled"


def test_generator_closed_unstarted(client: TelemetryClient) -> None:
    """A generator closed before its first step records no run, as its code never ran."""
    log: list[str] = []
    generator = tracked_run(client=client)(accumulate)(log)

    generator.close()

    assert log == []
    assert stored_runs(client) == []


def test_generator_current_run_per_step(client: TelemetryClient) -> None:
    """The generator's run is current inside its steps, the consumer's run between them."""
    seen: list[object] = []
    consumer_sees: list[object] = []
    decorated = tracked_run(client=client, agent_name="steps")(observe_runs)

    with client.track_run("consumer", "test") as consumer:
        generator = decorated(seen)
        for _ in generator:
            consumer_sees.append(current_run())

    generator_run = seen[0]
    assert generator_run is not None
    assert generator_run is not consumer
    assert seen == [generator_run, generator_run, generator_run]
    assert consumer_sees == [consumer, consumer]
    runs = runs_by_id(client)
    assert runs[generator_run.run_id].parent_run_id == consumer.run_id  # type: ignore[attr-defined]


def test_generator_result_metrics(client: TelemetryClient) -> None:
    """result_metrics gets the value a generator returns when exhausted."""
    log: list[str] = []
    decorated = tracked_run(client=client, result_metrics=lambda total: {"items_succeeded": total})(
        accumulate
    )

    drive_to_end(decorated(log))

    [run] = stored_runs(client)
    assert run.items_succeeded == 4


def test_generator_named_like_original(client: TelemetryClient) -> None:
    """The generator object a decorated call returns has the original's name."""
    generator: Any = tracked_run(client=client)(accumulate)([])

    assert generator.__name__ == "accumulate"
    assert "generator object accumulate" in repr(generator)


# -- async generators ---------------------------------------------------------------------


def test_async_generator_same_as_undecorated(client: TelemetryClient) -> None:
    """asend, a handled athrow and the end match the undecorated async generator."""
    plain_log: list[str] = []
    tracked_log: list[str] = []
    decorated = tracked_run(client=client)(accumulate_async)

    expected = asyncio.run(drive_async_to_end(accumulate_async(plain_log)))
    outputs = asyncio.run(drive_async_to_end(decorated(tracked_log)))

    assert outputs == expected
    assert outputs == [0, 2, 5, 0, 4, "end"]
    assert tracked_log == plain_log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "success"


def test_async_generator_unhandled_athrow(client: TelemetryClient) -> None:
    """An exception from athrow that is not handled propagates unchanged, and the run fails."""
    log: list[str] = []
    error = KeyError("stop here")

    async def main() -> BaseException:
        generator = tracked_run(client=client)(accumulate_async)(log)
        await generator.asend(None)
        with pytest.raises(KeyError) as caught:
            await generator.athrow(error)
        return caught.value

    assert asyncio.run(main()) is error
    assert log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "failed"


def test_async_generator_aclose(client: TelemetryClient) -> None:
    """An async generator closed early runs its finally and ends as cancelled."""
    log: list[str] = []

    async def main() -> None:
        generator = tracked_run(client=client)(accumulate_async)(log)
        await generator.asend(None)
        await generator.asend(5)
        await generator.aclose()

    asyncio.run(main())

    assert log == ["cleanup"]
    [run] = stored_runs(client)
    assert run.status == "cancelled"


def test_async_generator_current_run_per_step(client: TelemetryClient) -> None:
    """The async generator's run is current inside its steps only."""
    seen: list[object] = []
    consumer_sees: list[object] = []
    decorated = tracked_run(client=client, agent_name="steps")(observe_runs_async)

    async def main() -> object:
        async with client.track_run("consumer", "test") as consumer:
            async for _ in decorated(seen):
                consumer_sees.append(current_run())
        return consumer

    consumer = asyncio.run(main())

    generator_run = seen[0]
    assert generator_run is not None
    assert generator_run is not consumer
    assert seen == [generator_run, generator_run, generator_run]
    assert consumer_sees == [consumer, consumer]


# -- methods and callable objects ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["method", "class_above", "class_below", "static_above", "static_below"]
)
@pytest.mark.parametrize("via", ["class", "instance", "subclass", "subclass instance"])
def test_method_binding(client: TelemetryClient, name: str, via: str) -> None:
    """Methods of every kind, in both decorator orders, get the right self or cls."""
    Base, Sub = make_classes(tracked_run(client=client))
    owner = Sub if via.startswith("subclass") else Base
    instance = owner()

    if name == "method" and not via.endswith("instance"):
        result = getattr(owner, name)(instance, 5)
    else:
        result = getattr(instance if via.endswith("instance") else owner, name)(5)

    expected_first = {"method": instance, "static_above": None, "static_below": None}.get(
        name, owner
    )
    assert result == (expected_first, 5)
    assert result[0] is expected_first
    [run] = stored_runs(client)
    assert run.status == "success"
    assert run.agent_name == f"make_classes.<locals>.Base.{name}"


def test_async_method(client: TelemetryClient) -> None:
    """A coroutine method is awaited with its instance, as one run."""
    _, Sub = make_classes(tracked_run(client=client))
    instance = Sub()

    result = asyncio.run(instance.async_method(3))

    assert result == (instance, 3)
    [run] = stored_runs(client)
    assert run.status == "success"


def test_callable_object(client: TelemetryClient) -> None:
    """A callable object is tracked per call, and keeps its attributes through the proxy."""
    counter = tracked_run(client=client)(Counter())

    assert counter(2) == 2
    assert counter() == 3
    assert counter.calls == 3
    runs = stored_runs(client)
    assert [run.agent_name for run in runs] == ["Counter", "Counter"]


def test_async_callable_object(client: TelemetryClient) -> None:
    """A callable object with a coroutine __call__ ends its run when awaited to the end."""
    echo = tracked_run(client=client)(AsyncEcho())
    value = object()

    coroutine = echo(value)
    before = stored_runs(client)
    result = asyncio.run(coroutine)

    assert result is value
    assert before == []
    [run] = stored_runs(client)
    assert run.status == "success"


# -- pickling -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_by_reference(protocol: int) -> None:
    """A decorated module-level function unpickles as the same object, in every protocol."""
    data = pickle.dumps(instrument_targets.square, protocol=protocol)

    assert pickle.loads(data) is instrument_targets.square


def test_pickle_bound_methods() -> None:
    """Decorated methods bound to an instance or a class pickle as bound methods do."""
    doubler = instrument_targets.Doubler(3)

    method = pickle.loads(pickle.dumps(doubler.apply))
    class_method = pickle.loads(pickle.dumps(instrument_targets.Doubler.name))

    assert method.__self__.factor == 3
    assert class_method.__self__ is instrument_targets.Doubler


def test_pickle_callable_object_raises(client: TelemetryClient) -> None:
    """Pickling a decorated callable object, which has no qualified name, raises."""
    counter = tracked_run(client=client)(Counter())

    with pytest.raises(pickle.PicklingError, match="has none"):
        pickle.dumps(counter)


def test_copy_returns_same(client: TelemetryClient) -> None:
    """copy and deepcopy return the decorated function itself, as they do for functions."""
    decorated = tracked_run(client=client)(plain_function)

    assert copy.copy(decorated) is decorated
    assert copy.deepcopy({"job": decorated})["job"] is decorated


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_runs(default_client: TelemetryClient, method: str) -> None:
    """In a ProcessPoolExecutor, each child records its own runs in the same store."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"the {method} start method is not available here")
    context = multiprocessing.get_context(method)

    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = list(pool.map(instrument_targets.square, range(4)))

    runs = stored_runs(default_client)
    assert results == [0, 1, 4, 9]
    assert len(runs) == 4
    assert {run.status for run in runs} == {"success"}
    assert {run.agent_name for run in runs} == {"pool-square"}
    assert os.getpid() not in {run.pid for run in runs}


# -- nesting and concurrency ----------------------------------------------------------------


def test_nested_call_parent(client: TelemetryClient) -> None:
    """A tracked call inside another records the outer run as its parent."""

    @tracked_run(client=client, agent_name="inner")
    def inner() -> str:
        run = current_run()
        assert run is not None
        return run.run_id

    @tracked_run(client=client, agent_name="outer")
    def outer() -> tuple[str, str]:
        run = current_run()
        assert run is not None
        return run.run_id, inner()

    outer_id, inner_id = outer()

    runs = runs_by_id(client)
    assert runs[inner_id].parent_run_id == outer_id
    assert runs[outer_id].parent_run_id is None


def test_asyncio_tasks_are_children(client: TelemetryClient) -> None:
    """Tasks created inside a run are its children, and each has its own current run."""

    @tracked_run(client=client, agent_name="child")
    async def child() -> str:
        await asyncio.sleep(0)
        run = current_run()
        assert run is not None
        return run.run_id

    @tracked_run(client=client, agent_name="parent")
    async def parent() -> tuple[str, tuple[str, str, str], str]:
        run = current_run()
        assert run is not None
        children = await asyncio.gather(child(), child(), child())
        after = current_run()
        assert after is not None
        return run.run_id, children, after.run_id

    parent_id, child_ids, after_id = asyncio.run(parent())

    runs = runs_by_id(client)
    assert after_id == parent_id
    assert len(set(child_ids)) == 3
    assert parent_id not in child_ids
    assert {runs[run_id].parent_run_id for run_id in child_ids} == {parent_id}


def test_concurrent_tasks_keep_context(client: TelemetryClient) -> None:
    """Concurrent top-level tasks each see their own run while they interleave."""

    @tracked_run(client=client)
    async def step_twice(barrier: asyncio.Event, arrivals: list[str]) -> tuple[str, str]:
        run = current_run()
        assert run is not None
        arrivals.append(run.run_id)
        if len(arrivals) == 2:
            barrier.set()
        await barrier.wait()
        after = current_run()
        assert after is not None
        return run.run_id, after.run_id

    async def main() -> list[tuple[str, str]]:
        barrier = asyncio.Event()
        arrivals: list[str] = []
        first, second = await asyncio.gather(
            step_twice(barrier, arrivals), step_twice(barrier, arrivals)
        )
        return [first, second]

    pairs = asyncio.run(main())

    assert [before == after for before, after in pairs] == [True, True]
    assert pairs[0][0] != pairs[1][0]
    assert {run.parent_run_id for run in stored_runs(client)} == {None}


def test_thread_context(client: TelemetryClient) -> None:
    """A thread does not inherit the run it was started in unless given the context."""
    found: dict[str, str] = {}

    @tracked_run(client=client, agent_name="worker")
    def worker(key: str) -> None:
        run = current_run()
        assert run is not None
        found[key] = run.run_id

    @tracked_run(client=client, agent_name="starter")
    def starter() -> str:
        plain = threading.Thread(target=worker, args=("plain",))
        copied = threading.Thread(target=contextvars.copy_context().run, args=(worker, "copied"))
        for thread in (plain, copied):
            thread.start()
            thread.join()
        run = current_run()
        assert run is not None
        return run.run_id

    starter_id = starter()

    runs = runs_by_id(client)
    expected_plain_parent = starter_id if THREADS_INHERIT_CONTEXT else None
    assert runs[found["plain"]].parent_run_id == expected_plain_parent
    assert runs[found["copied"]].parent_run_id == starter_id


def test_concurrent_threads_keep_context(client: TelemetryClient) -> None:
    """Runs in two threads that overlap each see their own run."""
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

    @tracked_run(client=client)
    def overlap() -> tuple[str, str]:
        run = current_run()
        assert run is not None
        barrier.wait()
        after = current_run()
        assert after is not None
        return run.run_id, after.run_id

    with ThreadPoolExecutor(max_workers=2) as pool:
        pairs = list(pool.map(lambda _: overlap(), range(2)))

    assert [before == after for before, after in pairs] == [True, True]
    assert pairs[0][0] != pairs[1][0]


def test_thread_pool_context(client: TelemetryClient) -> None:
    """Work submitted to a ThreadPoolExecutor is a child only when submitted with the context."""

    @tracked_run(client=client, agent_name="task")
    def task() -> str:
        run = current_run()
        assert run is not None
        return run.run_id

    with ThreadPoolExecutor(max_workers=1) as pool:
        # The worker thread starts before the run, so the flag of Python 3.14 that
        # copies the context into new threads has nothing to copy.
        pool.submit(lambda: None).result()

        @tracked_run(client=client, agent_name="submitter")
        def submitter() -> tuple[str, str, str]:
            plain = pool.submit(task).result()
            copied = pool.submit(contextvars.copy_context().run, task).result()
            run = current_run()
            assert run is not None
            return run.run_id, plain, copied

        submitter_id, plain_id, copied_id = submitter()

    runs = runs_by_id(client)
    assert runs[plain_id].parent_run_id is None
    assert runs[copied_id].parent_run_id == submitter_id


# -- result_metrics -----------------------------------------------------------------------


def test_result_metrics_applied(client: TelemetryClient) -> None:
    """The mapping result_metrics returns is set on the run before it ends."""

    @tracked_run(
        client=client,
        result_metrics=lambda rows: {"items_succeeded": len(rows), "metrics_json": {"n": 2}},
    )
    def load() -> list[str]:
        return ["a", "b"]

    rows = load()

    assert rows == ["a", "b"]
    [run] = stored_runs(client)
    assert run.items_succeeded == 2
    assert run.metrics_json == {"n": 2}


def test_result_metrics_not_on_error(client: TelemetryClient) -> None:
    """result_metrics is not called when the function raises."""
    calls: list[object] = []

    def count_call(result: object) -> dict[str, int]:
        calls.append(result)
        return {}

    @tracked_run(client=client, result_metrics=count_call)
    def fail() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        fail()

    assert calls == []


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (lambda result: 1 / 0, "ZeroDivisionError"),
        (lambda result: {"itmes": 1}, "unknown field 'itmes'"),
        (lambda result: {"items_succeeded": "two"}, "must be an int"),
        (lambda result: ["items_succeeded"], "must be a mapping"),
    ],
    ids=["raises", "unknown field", "wrong type", "not a mapping"],
)
def test_result_metrics_fault_logged(
    client: TelemetryClient,
    caplog: pytest.LogCaptureFixture,
    metrics: Callable[[Any], Any],
    message: str,
) -> None:
    """A failing result_metrics is logged, and the result comes back from a successful run."""
    result = object()

    @tracked_run(client=client, result_metrics=metrics)
    def produce() -> object:
        return result

    with caplog.at_level(logging.ERROR, logger="telemetry.instrument"):
        assert produce() is result

    [run] = stored_runs(client)
    assert run.status == "success"
    assert run.items_succeeded == 0
    assert message in caplog.text
    assert "result_metrics" in caplog.text


# -- disabled telemetry -----------------------------------------------------------------------


def test_disabled_client_returns_original(tmp_path: Path) -> None:
    """With a disabled client the decorator returns the function itself."""
    with make_client(tmp_path, enabled=False) as disabled:
        decorated = tracked_run(client=disabled)(plain_function)
        wrapped = wrap_entry_point(plain_function, agent_name="main", client=disabled)

    assert decorated is plain_function
    assert wrapped is plain_function


def test_disabled_environment_returns_original(
    monkeypatch: pytest.MonkeyPatch, clean_environment: None
) -> None:
    """With TELEMETRY_ENABLED=0 and no client, the decorator returns the function itself."""
    monkeypatch.setenv("TELEMETRY_ENABLED", "0")

    assert tracked_run(plain_function) is plain_function
    assert tracked_run(agent_name="x")(accumulate) is accumulate


def test_disabled_after_decoration(tmp_path: Path, default_client: TelemetryClient) -> None:
    """A default client disabled after decoration makes the wrapper call straight through."""
    decorated_function = tracked_run(plain_function)
    decorated_generator = tracked_run(accumulate)
    set_default_client(make_client(tmp_path / "off", enabled=False))

    result = decorated_function(1)
    generator: Any = decorated_generator([])

    assert result == plain_function(1)
    assert generator.gi_code is accumulate.__code__
    assert stored_runs(default_client) == []
    assert not (tmp_path / "off").exists()
    generator.close()


# -- telemetry faults ---------------------------------------------------------------------


class BrokenClient(TelemetryClient):
    """A client whose start_run or end_run raises, as a bug inside telemetry would."""

    def __init__(self, config: TelemetryConfig, broken: str) -> None:
        super().__init__(config)
        self.broken = broken

    def start_run(self, *args: Any, **kwargs: Any) -> str:
        if self.broken == "start":
            raise RuntimeError("start_run is broken")
        return super().start_run(*args, **kwargs)

    def end_run(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken == "end":
            raise RuntimeError("end_run is broken")
        return super().end_run(*args, **kwargs)

    async def _end_run_async(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken == "end":
            raise RuntimeError("end_run is broken")
        return await super()._end_run_async(*args, **kwargs)


@pytest.fixture
def unwritable_client(tmp_path: Path) -> Iterator[TelemetryClient]:
    """Yield a client whose data directory is a regular file, so nothing can be stored."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with TelemetryClient(TelemetryConfig(data_dir=blocker, environ={})) as client:
        yield client


def call_every_kind(client: TelemetryClient, calls: list[str]) -> dict[str, object]:
    """Call a tracked function, coroutine, generator and async generator, and return results."""

    @tracked_run(client=client)
    def function() -> list[str]:
        calls.append("function")
        return calls

    @tracked_run(client=client)
    async def coroutine() -> list[str]:
        calls.append("coroutine")
        return calls

    @tracked_run(client=client)
    def generator() -> Generator[int, None, str]:
        calls.append("generator")
        yield 1
        return "done"

    @tracked_run(client=client)
    async def async_generator() -> AsyncGenerator[int, None]:
        calls.append("async generator")
        yield 1

    async def collect() -> list[int]:
        return [item async for item in async_generator()]

    return {
        "function": function(),
        "coroutine": asyncio.run(coroutine()),
        "generator": list(generator()),
        "async generator": asyncio.run(collect()),
    }


def test_unwritable_store_results(
    unwritable_client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """With an unwritable store, every kind runs once and returns its result."""
    calls: list[str] = []

    with caplog.at_level(logging.ERROR, logger="telemetry"):
        results = call_every_kind(unwritable_client, calls)

    assert calls == ["function", "coroutine", "generator", "async generator"]
    assert results["function"] is calls
    assert results["coroutine"] is calls
    assert results["generator"] == [1]
    assert results["async generator"] == [1]
    assert "cannot open the index" in caplog.text


def test_unwritable_store_errors(
    unwritable_client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """With an unwritable store the function's exception reaches the caller unchanged."""
    error = ValueError("host failure")
    calls: list[str] = []

    @tracked_run(client=unwritable_client)
    def fail() -> None:
        calls.append("fail")
        raise error

    caplog.set_level(logging.ERROR, logger="telemetry")
    with pytest.raises(ValueError, match="host failure") as caught:
        fail()

    assert caught.value is error
    assert calls == ["fail"]


@pytest.mark.parametrize("broken", ["start", "end"])
def test_client_fault_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str) -> None:
    """A client that raises while starting or ending a run is logged, and every kind runs."""
    calls: list[str] = []
    config = TelemetryConfig(data_dir=tmp_path / "store", durability="none", environ={})

    with BrokenClient(config, broken) as client, caplog.at_level(logging.ERROR, logger="telemetry"):
        results = call_every_kind(client, calls)

    assert calls == ["function", "coroutine", "generator", "async generator"]
    assert results["function"] is calls
    assert results["generator"] == [1]
    assert f"{broken}_run is broken" in caplog.text


def test_client_start_fault_error_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the run cannot start, the function's own exception still reaches the caller."""
    error = KeyError("missing")
    caplog.set_level(logging.ERROR, logger="telemetry")

    with BrokenClient(TelemetryConfig(data_dir=tmp_path / "store", environ={}), "start") as client:

        @tracked_run(client=client)
        def fail() -> None:
            raise error

        with pytest.raises(KeyError) as caught:
            fail()

    assert caught.value is error
    assert "failed to start the run of" in caplog.text


# -- entry points -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "status", "summary"),
    [
        (0, "success", None),
        (None, "success", None),
        (3, "failed", "exit code 3"),
        (-1, "failed", "exit code -1"),
        (True, "failed", "exit code 1"),
        (False, "success", None),
        ("config file missing", "failed", "exit code 1: config file missing"),
    ],
    ids=repr,
)
def test_entry_point_return(
    client: TelemetryClient, returned: object, status: str, summary: str | None
) -> None:
    """An entry point's non-zero int return value is an exit code: the run fails."""

    def main() -> object:
        return returned

    wrapped = wrap_entry_point(main, agent_name="cli-main", client=client)

    assert wrapped() is returned
    [run] = stored_runs(client)
    assert run.agent_name == "cli-main"
    assert run.status == status
    assert run.error_summary == summary


@pytest.mark.parametrize(("code", "status"), [(0, "success"), (None, "success"), (2, "failed")])
def test_entry_point_system_exit(client: TelemetryClient, code: int | None, status: str) -> None:
    """SystemExit from an entry point follows track_run: 0 or None success, else failed."""

    def main() -> None:
        sys.exit(code)

    wrapped = wrap_entry_point(main, agent_name="cli-main", client=client)

    with pytest.raises(SystemExit) as caught:
        wrapped()

    assert caught.value.code == code
    [run] = stored_runs(client)
    assert run.status == status


def test_plain_decorator_return_code(client: TelemetryClient) -> None:
    """Plain @tracked_run treats a returned int as a result, not an exit code."""

    @tracked_run(client=client)
    def count() -> int:
        return 3

    assert count() == 3
    [run] = stored_runs(client)
    assert run.status == "success"


def test_entry_point_defaults(client: TelemetryClient) -> None:
    """wrap_entry_point takes job_type from the module and records trigger_type cli."""
    wrapped = wrap_entry_point(plain_function, agent_name="cli-main", client=client)

    wrapped(1)

    [run] = stored_runs(client)
    assert run.job_type == "test_decorators"
    assert run.trigger_type == "cli"


# -- the default client ---------------------------------------------------------------------


def test_default_client_created_once(tmp_path: Path, default_client: TelemetryClient) -> None:
    """Concurrent first calls of get_default_client create one client."""
    set_default_client(None)
    barrier = threading.Barrier(8, timeout=BARRIER_TIMEOUT)

    def first_call(_: int) -> TelemetryClient:
        barrier.wait()
        return get_default_client()

    with ThreadPoolExecutor(max_workers=8) as pool:
        clients = list(pool.map(first_call, range(8)))

    assert len({id(created) for created in clients}) == 1
    assert clients[0].config.data_dir == tmp_path / "store"


def test_set_default_client_previous(tmp_path: Path, default_client: TelemetryClient) -> None:
    """set_default_client returns the client it replaces."""
    replacement = make_client(tmp_path / "other")

    previous = set_default_client(replacement)

    assert previous is default_client
    assert get_default_client() is replacement


def test_set_default_client_type(clean_environment: None) -> None:
    """set_default_client rejects what is not a TelemetryClient."""
    with pytest.raises(TypeError, match="expects a TelemetryClient or None"):
        set_default_client("client")  # type: ignore[arg-type]


def test_result_metrics_interrupt_ends_run(client: TelemetryClient) -> None:
    """A KeyboardInterrupt from result_metrics ends the run as cancelled, then propagates."""

    def interrupt(result: object) -> dict[str, Any]:
        raise KeyboardInterrupt

    @tracked_run(agent_name="interrupted", client=client, result_metrics=interrupt)
    def job() -> int:
        return 1

    with pytest.raises(KeyboardInterrupt):
        job()
    [run] = stored_runs(client)
    assert run.status == "cancelled"


def test_async_generator_open_at_loop_shutdown(
    client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An async generator left open when asyncio.run ends is closed once: run cancelled."""
    cleanups: list[str] = []

    @tracked_run(agent_name="ticks", client=client)
    async def ticks() -> AsyncGenerator[int, None]:
        try:
            for number in range(10):
                yield number
        finally:
            await asyncio.sleep(0)
            cleanups.append("done")

    kept: list[Any] = []

    async def main() -> None:
        generator = ticks()
        kept.append(generator)
        async for _ in generator:
            break

    asyncio.run(main())
    [run] = stored_runs(client)

    assert cleanups == ["done"]
    assert run.status == "cancelled"
    assert "already running" not in caplog.text
