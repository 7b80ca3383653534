"""Dynamic batching: gather requests that arrive within a short window and hand them to the
model's worker as one list (see ttaserve/batching.py for how they share forward passes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Collects items for up to ``max_delay_s`` after the first one (or until ``size`` of
    the gathered items reaches ``max_size``), then runs ``run(items)`` on ``executor``.
    ``run`` returns one result or exception per item, in order."""

    def __init__(self, run: Callable[[Sequence[T]], list[R | Exception]], executor: Executor,
                 size: Callable[[T], int], max_size: int, max_delay_s: float) -> None:
        self._run, self._executor, self._size = run, executor, size
        self.max_size, self.max_delay_s = max_size, max_delay_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        if self._queue is None:  # created lazily on the server's event loop
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            total = self._size(batch[0][0])
            deadline = loop.time() + self.max_delay_s
            while total < self.max_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), max(remaining, 0))
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                total += self._size(item[0])
            await self._dispatch(batch)

    async def _dispatch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results: list[Any] = await loop.run_in_executor(self._executor, self._run, [i for i, _ in batch])
        except Exception as exc:  # the runner itself failed: every caller hears about it
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
