"""A hand-driven copy engine for :class:`lora_kernels.store.AdapterStore` (tests, CPU): jobs queue
until the test runs them, events complete when the test says, and every wait is logged, so the
store's ordering rules are checked deterministically."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ManualEvent:
    """An event the test completes (``set``); ``query`` says whether it has."""

    def __init__(self, label: str):
        self.label = label
        self.done = False

    def query(self) -> bool:
        return self.done

    def set(self) -> None:
        self.done = True

    def synchronize(self) -> None:
        if not self.done:
            raise RuntimeError(f"ManualEngine: {self.label} would block forever (not set)")

    def __repr__(self) -> str:
        return f"ManualEvent({self.label!r}, done={self.done})"


class ManualEngine:
    """A deterministic stand-in for a side stream (tests, CPU).

    ``submit`` queues the job and returns its (incomplete) load event; ``run(n)`` executes the
    oldest queued jobs in FIFO order (a stream's order), refusing (``RuntimeError``) a job whose
    ``after`` events are not complete: that is the write-after-read rule being enforced.
    ``record_use`` returns an incomplete event that models "the batch enqueued so far is still
    running"; the test completes it with ``event.set()``. ``wait(event)`` models the compute
    stream waiting: it runs queued jobs up to and including ``event``'s own (so the batch sees
    the data), and logs ``("wait", label)``. ``log`` holds ``("submit" | "run" | "wait",
    label)`` in order.
    """

    pin_memory = False

    def __init__(self):
        self.queue: list[tuple[ManualEvent, Callable[[], None], tuple]] = []
        self.log: list[tuple[str, str]] = []
        self._n = 0

    def submit(self, job, after=()) -> ManualEvent:
        self._n += 1
        ev = ManualEvent(f"load{self._n}")
        self.queue.append((ev, job, tuple(after)))
        self.log.append(("submit", ev.label))
        return ev

    def run(self, n: int | None = None) -> int:
        """Run up to ``n`` queued jobs (all if None) in order; return how many ran."""
        k = 0
        while self.queue and (n is None or k < n):
            ev, job, after = self.queue[0]
            pending = [a for a in after if not a.query()]
            if pending:
                raise RuntimeError(f"ManualEngine: {ev.label} must wait for {pending} "
                                   "(a batch still reads the slot it writes)")
            self.queue.pop(0)
            job()
            ev.set()
            self.log.append(("run", ev.label))
            k += 1
        return k

    def record_use(self) -> ManualEvent:
        self._n += 1
        return ManualEvent(f"use{self._n}")

    def wait(self, event) -> None:
        self.log.append(("wait", getattr(event, "label", "done")))
        if isinstance(event, ManualEvent) and not event.done:
            while not event.done:
                if not self.queue:
                    raise RuntimeError(f"ManualEngine: waited on {event.label}, which no queued "
                                       "job completes")
                self.run(1)

    def stage(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t.to(device)
