"""Dynamic batching for the generator: concurrent requests share one `generate()` call.

Why not Serve's `@serve.batch`: its batch loop fixes the next batch's members while the previous batch is still
generating (the batch then waits for the one running before it), so under load the requests that arrive during a
generation are split into several small batches, each one `generate()` long, instead of one. Here a batch is formed
when the generator is free: everything that queued while it was busy goes into the next call, up to
`max_batch_size`, and a batch waits for more only while the requests behind it say more are on their way.

`behind` (with each item): how many other requests the caller has still in retrieval or reranking, on their way
here. An item with none behind it closes the batch it is in at once (a lone user never waits for company); with some
behind it, the batch waits for them at most `wait_s` from the first waiting item's arrival, or until it is full. The
latest arrival's count decides. Under load, where items queue while a batch generates, the next batch therefore goes
at once with everything that queued. The Serve Generator and the in-process side of bench/bench_serve.py both batch
with this.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class DynamicBatcher:
    """`await submit(item, behind)` -> that item's result of `fn(items)`, one batch at a time.

    fn: an async callable, list of items -> list of results in the same order. An exception fails every item of
    its batch. A caller cancelled while its item waits (a client gone, a blown time budget) is dropped from the
    batch it would have joined; one cancelled during a generation does not stop that batch.
    """

    def __init__(self, fn: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"DynamicBatcher: max_batch_size must be >= 1 and wait_s >= 0, got {max_batch_size}, "
                             f"{wait_s}")
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self.behind = 0  # the latest arrival's count of requests on their way
        self.batches = 0
        self.items = 0
        self._queue: list[tuple[Any, asyncio.Future, float]] = []  # (item, its caller's future, arrival time)
        self._running: list = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item, behind: int = 0):
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((item, fut, loop.time()))
        self.behind = behind
        self._arrived.set()
        return await fut

    def _drop_cancelled(self) -> None:
        self._queue = [q for q in self._queue if not q[1].done()]

    async def _next_batch(self) -> list:
        """Waits for a first item, then for more while the arrivals say more are coming (up to wait_s from the
        first one's arrival) and the batch is not full; returns the batch, leaving the rest queued."""
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if self._queue:
                break
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0][2] + self.wait_s
        while len(self._queue) < self.max_batch_size and self.behind > 0:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        self._drop_cancelled()
        batch, self._queue = self._queue[:self.max_batch_size], self._queue[self.max_batch_size:]
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._running = batch
            try:
                results = await self.fn([it for it, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"DynamicBatcher: {getattr(self.fn, '__qualname__', self.fn)} returned "
                                       f"{len(results)} results for a batch of {len(batch)}")
            except Exception as e:  # every caller of the batch sees the failure
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self._running = []
            self.batches += 1
            self.items += len(batch)
            for (_, fut, _), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)

    def close(self) -> None:
        """Stops the batch loop (its waiting callers are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        for _, fut, _ in self._queue + self._running:
            fut.cancel()
        self._queue, self._running = [], []
