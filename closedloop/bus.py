"""The event bus: the hot path publishes without blocking; slow consumers read at their pace.

Each subscriber owns a bounded deque. `publish` appends to every subscriber's deque and never
waits; when a subscriber is full its oldest event is dropped and counted (a full queue is
reported through `dropped`, never silent).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pylsl import local_clock


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. kind examples: 'state', 'attempt', 'health', 'interlock', 'log'."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    t_stream: float = float("nan")
    t_local: float = field(default_factory=local_clock)


class Subscription:
    """A bounded queue of events for one consumer (GUI, MQTT, recorder)."""

    def __init__(
        self,
        name: str,
        maxlen: int,
        kinds: frozenset[str] | None,
        exclude: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self.kinds = kinds
        self.exclude = exclude
        self._queue: deque[Event] = deque(maxlen=maxlen)
        self.dropped = 0

    def takes(self, kind: str) -> bool:
        return (self.kinds is None or kind in self.kinds) and kind not in self.exclude

    def _offer(self, event: Event) -> None:
        if not self.takes(event.kind):
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # deque drops the oldest on append
        self._queue.append(event)

    def drain(self, limit: int | None = None) -> list[Event]:
        """Pop up to `limit` events, oldest first (thread-safe: deque popleft is atomic)."""
        out: list[Event] = []
        while self._queue and (limit is None or len(out) < limit):
            try:
                out.append(self._queue.popleft())
            except IndexError:  # raced with another drain
                break
        return out

    def __len__(self) -> int:
        return len(self._queue)


class EventBus:
    """Fan-out of events to bounded subscriptions. `publish` is O(subscribers), never blocks."""

    def __init__(self) -> None:
        self._subs: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()  # only guards (un)subscribe, not publish
        self._wants: dict[str, bool] = {}  # kind -> some subscriber takes it (reset on change)

    def subscribe(
        self,
        name: str,
        maxlen: int = 10_000,
        kinds: set[str] | frozenset[str] | None = None,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> Subscription:
        """A new queue taking `kinds` (None: all) except `exclude`."""
        sub = Subscription(
            name, maxlen, frozenset(kinds) if kinds is not None else None, frozenset(exclude)
        )
        with self._lock:
            self._subs = (*self._subs, sub)
            self._wants = {}
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._wants = {}

    def wants(self, kind: str) -> bool:
        """Whether any subscriber takes `kind` (lets the hot path skip building an event)."""
        wants = self._wants
        got = wants.get(kind)
        if got is None:
            got = wants[kind] = any(s.takes(kind) for s in self._subs)
        return got

    def publish(self, event: Event) -> None:
        for sub in self._subs:  # tuple snapshot: safe against concurrent subscribe
            sub._offer(event)

    def emit(self, kind: str, t_stream: float = float("nan"), **payload: Any) -> None:
        self.publish(Event(kind, payload, t_stream))

    def post(self, kind: str, payload: dict[str, Any], t_stream: float = float("nan")) -> None:
        """`emit` with the payload as a dict (whose keys may be anything, `t_stream` included):
        lets the layers below publish without importing `Event`."""
        self.publish(Event(kind, payload, t_stream))

    @property
    def dropped(self) -> dict[str, int]:
        return {s.name: s.dropped for s in self._subs}
