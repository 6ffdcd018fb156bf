"""After a burst of large refused requests the C heap's free pages go back to the system: one trim, once the
burst is over (service/memory.py; the RSS figures are `make stress`'s unauthenticated flood)."""

from __future__ import annotations

import threading
import time

from service import memory


def test_a_burst_of_refusals_costs_one_trim_after_its_last(monkeypatch):
    trims: list[float] = []
    trimmed = threading.Event()

    def trim(pad: int) -> None:
        trims.append(time.monotonic())
        trimmed.set()

    monkeypatch.setattr(memory, "_TRIM", trim)
    monkeypatch.setattr(memory, "TRIM_DELAY_S", 1.0)
    memory.soon()
    time.sleep(0.1)
    last = time.monotonic()  # the burst's last refusal comes after this: the trim waits for it
    for _ in range(5):
        memory.soon()
    assert trimmed.wait(10)
    assert trims[0] - last >= 1.0
    time.sleep(0.4)
    assert len(trims) == 1


def test_without_glibc_nothing_is_trimmed(monkeypatch):
    monkeypatch.setattr(memory, "_TRIM", None)
    before = threading.active_count()
    memory.soon()
    assert threading.active_count() == before
