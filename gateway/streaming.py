"""The flow of one ModelStreamInfer call, independent of what a request is.

Requests read off the stream run concurrently, so one stream feeds the micro-batcher the way many
unary callers do, and answers go back in completion order (each carries its request's `id`). At most
`max_in_flight` requests are read but not yet answered: a client that stops reading its answers
stops being read from, and HTTP/2 flow control pushes back on it, instead of the gateway buffering.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Generic, TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class _EndOfRequests:
    pass


_END = _EndOfRequests()


class RequestStream(Generic[Request, Reply]):
    """`replies(requests)` yields `answer(request)` for each request, in completion order.

    `answer` must turn a request's own failure into a reply; an exception it raises is a bug and
    ends the whole stream with that exception (as it would end a unary call).
    """

    def __init__(
        self,
        answer: Callable[[Request], Coroutine[Any, Any, Reply]],
        max_in_flight: int,
        outstanding: set[asyncio.Task[Any]] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._answer = answer
        self._max_in_flight = max_in_flight
        # Every answer running, of every stream: they outlive a stream that ends early, and shutdown
        # waits for them before it closes what they use (the request log, the models).
        self._outstanding = outstanding if outstanding is not None else set()

    async def replies(self, requests: AsyncIterator[Request]) -> AsyncIterator[Reply]:
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue[Reply | BaseException | _EndOfRequests] = asyncio.Queue()
        slots = asyncio.Semaphore(self._max_in_flight)
        running: set[asyncio.Task[Reply]] = set()
        started = 0

        def on_done(task: asyncio.Task[Reply]) -> None:
            running.discard(task)
            self._outstanding.discard(task)
            if not task.cancelled():
                error = task.exception()
                finished.put_nowait(task.result() if error is None else error)

        async def read() -> None:
            nonlocal started
            try:
                async for request in requests:
                    await slots.acquire()
                    task = loop.create_task(self._answer(request))
                    started += 1
                    running.add(task)
                    self._outstanding.add(task)
                    task.add_done_callback(on_done)
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # the transport failed reading: end the stream with it
                finished.put_nowait(error)
                return
            finished.put_nowait(_END)

        reader = loop.create_task(read())
        answered = 0
        reading = True
        try:
            while reading or answered < started:
                item = await finished.get()
                if isinstance(item, _EndOfRequests):
                    reading = False
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                answered += 1
                slots.release()
        finally:
            # Requests already running finish on their own (their log records get committed); only
            # reading more stops. They are at most max_in_flight and each ends in bounded time.
            reader.cancel()
