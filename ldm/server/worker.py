"""One worker thread per loaded model and a bounded FIFO queue in front of it.

Requests never touch the model: they submit a task and wait for its future, so jobs run one at a time in
the order they came, and a full queue is refused at once (503) instead of growing without bound. A task
that is cancelled (its client went away, the server stops) is skipped while it waits, and stopped
between two sampling steps while it runs, as `/interrupt` stops the running one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_queue` tasks already."""


class Cancelled(Exception):
    """The task was cancelled or interrupted before it finished."""


@dataclass
class Task:
    """A unit of work for the worker: `run(task)` returns the result of `future`. A run reports its steps
    with `begin` and `step`, which raise `Cancelled` once the task is cancelled."""

    run: Callable[[Task], Any]
    name: str = "job"
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Progress, as A1111's /progress reports it: batch `job_no` of `job_count`, step `step` of `steps`.
    job_no: int = 0
    job_count: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0

    def begin(self, job_no: int, job_count: int, steps: int) -> None:
        self.job_no, self.job_count, self.step, self.steps = job_no, job_count, 0, steps
        self.check()

    def advance(self) -> None:
        self.step += 1
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs submitted tasks one at a time on its own thread, oldest first."""

    def __init__(self, max_queue: int) -> None:
        self.tasks: queue.Queue[Task | None] = queue.Queue(maxsize=max_queue)
        self.current: Task | None = None
        self.thread = threading.Thread(target=self._loop, name="ldm-worker", daemon=True)
        self.thread.start()

    def submit(self, run: Callable[[Task], Any], name: str = "job") -> Task:
        """Queue a task that calls `run`; QueueFull when `max_queue` tasks wait already."""
        task = Task(run, name)
        try:
            self.tasks.put_nowait(task)
        except queue.Full:
            raise QueueFull from None
        return task

    def interrupt(self) -> None:
        """Stop the running task at its next step (its finished batches are still returned)."""
        task = self.current
        if task is not None:
            task.cancel()

    def queued(self) -> int:
        return self.tasks.qsize()

    def close(self) -> None:
        """Cancel what waits, interrupt what runs, and end the thread."""
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.cancel()
                task.future.set_exception(Cancelled())
        self.interrupt()
        self.tasks.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (task := self.tasks.get()) is not None:
            if task.cancelled.is_set():
                task.future.set_exception(Cancelled())
                continue
            task.started = time.monotonic()
            self.current = task
            try:
                result = task.run(task)
            except BaseException as e:  # every failure goes to the waiting request, never kills the thread
                task.future.set_exception(e)
            else:
                task.future.set_result(result)
            finally:
                self.current = None
