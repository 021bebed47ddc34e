"""The event bus never blocks the publisher and counts what a full subscriber loses."""

from __future__ import annotations

import threading
import time

import pytest

from closedloop.bus import Event, EventBus


def test_publish_reaches_every_subscriber_filtered_by_kind():
    bus = EventBus()
    everything = bus.subscribe("all")
    attempts = bus.subscribe("attempts", kinds={"attempt"})
    bus.emit("state", 1.0, score=0.5)
    bus.emit("attempt", 2.0, fired=True)
    assert [e.kind for e in everything.drain()] == ["state", "attempt"]
    got = attempts.drain()
    assert [e.kind for e in got] == ["attempt"]
    assert got[0].payload == {"fired": True}
    assert got[0].t_stream == 2.0


def test_full_subscriber_drops_oldest_and_counts():
    bus = EventBus()
    sub = bus.subscribe("slow", maxlen=3)
    for i in range(10):
        bus.publish(Event("state", {"i": i}))
    assert sub.dropped == 7
    assert [e.payload["i"] for e in sub.drain()] == [7, 8, 9]
    assert bus.dropped == {"slow": 7}


@pytest.mark.timeout(20)
def test_concurrent_publish_and_drain_lose_nothing_when_not_full():
    bus = EventBus()
    sub = bus.subscribe("reader", maxlen=1_000_000)
    n = 50_000
    got: list[int] = []
    done = threading.Event()

    def reader():
        while not done.is_set() or len(sub):
            got.extend(e.payload["i"] for e in sub.drain())
            time.sleep(0.001)  # a real consumer polls; a spinning one starves the GIL

    t = threading.Thread(target=reader)
    t.start()
    for i in range(n):
        bus.publish(Event("x", {"i": i}))
    done.set()
    t.join()
    assert got == list(range(n))
    assert sub.dropped == 0


def test_unsubscribe_stops_delivery():
    bus = EventBus()
    sub = bus.subscribe("a")
    bus.unsubscribe(sub)
    bus.emit("state")
    assert sub.drain() == []
