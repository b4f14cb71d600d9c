"""A client-side sliding-window limiter for requests and tokens per window (asyncio).

``ticket = await limiter.acquire(tokens)`` waits until one more request, costing ``tokens``, fits: at
most ``requests`` requests and ``tokens`` tokens in any ``window_s`` seconds. The caller sends the
request and then calls ``ticket.done(actual_tokens)``, in a ``finally``: the token estimate made before
the call is replaced by the actual count from the reply's usage metadata, so later requests see the
real spend.

The limit has to hold on the *server's* clock, which counts arrivals. A request arrives some time
after it is admitted here (the client builds and sends it; on a busy machine that can take hundreds
of milliseconds), and never after it is done. So a request holds its place in the window from its
admission until ``window_s`` after it is done: if the (n+1)-th request is admitted, the oldest of the
n before it finished at least ``window_s`` earlier, and so arrived at least ``window_s`` earlier.
This costs ``latency / window_s`` of the throughput (0.5 % for a 300 ms call in a 60 s window) and
makes the guarantee independent of client-side delays.

A single request bigger than the whole token budget is let through alone, once the window is empty
(otherwise it could never run), with a warning. The clock and the sleep are injectable, so tests can
run the limiter in simulated time, and the window can be scaled (e.g. 1 s instead of 60 s) to verify
it against a server's arrival clock in a short test. Waiters are served in arrival order (an
``asyncio.Lock`` is FIFO). The limiter keeps its history across event loops, so a second
``asyncio.run`` within the same minute still respects the window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One admitted request. It stays in the window until ``window_s`` after ``done``."""

    admitted: float
    tokens: int
    done_at: float | None = None
    _on_done: Callable[[Ticket], None] | None = field(default=None, repr=False)

    def done(self, actual_tokens: int | None = None) -> None:
        """The request is finished (a reply, an error or a timeout); correct the token cost if known."""
        if actual_tokens is not None and actual_tokens >= 0:
            self.tokens = int(actual_tokens)
        if self.done_at is None and self._on_done is not None:
            self._on_done(self)


class RateLimiter(Protocol):
    async def acquire(self, tokens: int = 0) -> Ticket: ...


class SlidingWindowLimiter:
    """At most ``requests`` requests and ``tokens`` tokens in any ``window_s`` seconds."""

    def __init__(self, requests: int, tokens: int, window_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if requests < 1 or tokens < 1 or window_s <= 0:
            raise ValueError("requests and tokens must be >= 1 and window_s > 0")
        self.requests = requests
        self.tokens = tokens
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._tickets: list[Ticket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self.waited_s = 0.0
        """Total time callers spent waiting for room in the window."""

    def _bind(self) -> tuple[asyncio.Lock, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._lock, self._changed = loop, asyncio.Lock(), asyncio.Event()
        return self._lock, self._changed

    def _ticket_done(self, ticket: Ticket) -> None:
        ticket.done_at = self._clock()
        if self._changed is not None:
            self._changed.set()

    def _prune(self, now: float) -> None:
        self._tickets = [t for t in self._tickets if t.done_at is None or t.done_at > now - self.window_s]

    def usage(self) -> tuple[int, int]:
        """Requests and tokens that count against the window now (in flight included)."""
        self._prune(self._clock())
        return len(self._tickets), sum(t.tokens for t in self._tickets)

    def _wait_needed(self, now: float, tokens: int) -> float:
        """Seconds until a request costing ``tokens`` fits: 0 if it fits now, inf if it must wait for
        a request in flight to finish first."""
        tickets = self._tickets
        used = sum(t.tokens for t in tickets)
        if len(tickets) < self.requests and (used + tokens <= self.tokens or not tickets):
            return 0.0
        # tickets leave the window in this order; in-flight ones (no done_at) last, at an unknown time
        leaving = sorted(tickets, key=lambda t: math.inf if t.done_at is None else t.done_at)

        def when(index: int) -> float:  # time at which leaving[index] is out of the window
            d = leaving[index].done_at
            return math.inf if d is None else d + self.window_s - now

        wait = 0.0
        if len(tickets) >= self.requests:
            wait = when(len(tickets) - self.requests)
        if used + tokens > self.tokens:
            if tokens > self.tokens:  # only alone: wait for the whole window to empty
                wait = max(wait, when(len(leaving) - 1))
            else:
                freed = 0
                for i, t in enumerate(leaving):
                    freed += t.tokens
                    if used - freed + tokens <= self.tokens:
                        wait = max(wait, when(i))
                        break
        return max(wait, 0.0)

    async def acquire(self, tokens: int = 0) -> Ticket:
        tokens = max(int(tokens), 0)
        if tokens > self.tokens:
            log.warning("one request is estimated at %d tokens, more than the %d-token budget per %g s; "
                        "it will run alone", tokens, self.tokens, self.window_s)
        lock, changed = self._bind()
        async with lock:
            while True:
                now = self._clock()
                self._prune(now)
                wait = self._wait_needed(now, tokens)
                if wait <= 0:
                    ticket = Ticket(now, tokens, _on_done=self._ticket_done)
                    self._tickets.append(ticket)
                    return ticket
                changed.clear()
                if math.isinf(wait):
                    await changed.wait()  # a request in flight must finish first
                else:
                    await self._sleep(wait)
                self.waited_s += self._clock() - now


def max_in_window(times: list[float], window_s: float) -> int:
    """The most events in any half-open window ``[t, t + window_s)`` (for checking a limit held)."""
    ts = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best
