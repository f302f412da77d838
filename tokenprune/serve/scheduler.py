"""Dynamic batching: one worker thread owns the model; concurrent requests wait in a queue and are
run together when they share a batch key (token reduction and sampling settings).

The worker takes the oldest waiting job, waits up to ``window`` seconds for more jobs with the same
key (it stops waiting as soon as ``max_batch`` are there), and runs them as one left-padded
``generate``. Jobs with other keys keep their place in the queue and go next, oldest first, so a
stream of one key cannot starve another. Results travel back to the event loop through
:class:`AsyncSink` (thread-safe hand-off with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError

log = logging.getLogger("tokenprune.serve")


class AsyncSink:
    """A row's output channel from the worker thread to the request's coroutine: events
    ``("first",)``, ``("delta", text)``, ``("done", result)`` and ``("error", APIError)`` on an
    :class:`asyncio.Queue`. ``cancelled`` is set by the coroutine when its client goes away."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.first_token_at: float | None = None

    def _put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed: the server is shutting down
            pass

    def on_first_token(self) -> None:
        self.first_token_at = time.perf_counter()
        self._put(("first",))

    def on_delta(self, text: str) -> None:
        self._put(("delta", text))

    def on_done(self, result: dict[str, Any]) -> None:
        self._put(("done", result))

    def on_error(self, error: APIError) -> None:
        self._put(("error", error))


@dataclass
class Job:
    """One request waiting for (or in) a batch."""

    key: Hashable
    payload: Any
    sink: AsyncSink
    enqueued: float = field(default_factory=time.perf_counter)


RunBatch = Callable[[Hashable, Sequence[Job]], None]


class Scheduler:
    """Queue + worker thread. ``run_batch(key, jobs)`` runs one batch and feeds the jobs' sinks;
    if it raises, every job of the batch gets an error (an :class:`~tokenprune.serve.errors.APIError`
    as it is, anything else as a 500; jobs already answered ignore it) and the worker goes on."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int = 16,
        window: float = 0.01,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or window < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and window >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window = window
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.busy = False

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet in a batch)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tokenprune-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running batch; waiting jobs get a 503."""
        with self._cond:
            self._stop = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.sink.on_error(APIError("server shutting down", status=503, type="server_error"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 429 when the queue is full."""
        with self._cond:
            if self._stop:
                raise APIError("server shutting down", status=503, type="server_error")
            if len(self._queue) >= self.max_queue:
                raise APIError(
                    f"server busy: {len(self._queue)} requests waiting; retry later",
                    status=429,
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._queue.append(job)
            self._cond.notify()

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._stop:
                while self._queue and self._queue[0].sink.cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                self._cond.wait()
            if self._stop:
                return None
            key = self._queue[0].key
            deadline = time.perf_counter() + self.window
            while not self._stop:
                n = sum(1 for j in self._queue if j.key == key)
                left = deadline - time.perf_counter()
                if n >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Job] = []
            rest: deque[Job] = deque()
            for job in self._queue:
                if job.key == key and len(batch) < self.max_batch and not job.sink.cancelled:
                    batch.append(job)
                elif not job.sink.cancelled:
                    rest.append(job)
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            start = time.perf_counter()
            self.busy = True
            try:
                self.run_batch(batch[0].key, batch)
            except APIError as exc:
                for job in batch:
                    job.sink.on_error(exc)
            except Exception as exc:  # an engine bug: answer, log, keep serving
                log.exception("batch of %d failed", len(batch))
                err = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error")
                for job in batch:
                    job.sink.on_error(err)
            finally:
                self.busy = False
                self.batches += 1
                if self.on_batch is not None:
                    self.on_batch(len(batch), time.perf_counter() - start)
