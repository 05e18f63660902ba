"""The idle heap trimmer of the engine thread (kvserve/engine/heap.py)."""

from kvserve.engine.heap import IdleTrimmer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_idle_trimmer_trims_after_work_when_idle_or_after_long_busy_spells():
    clock = Clock()
    calls = []
    trimmer = IdleTrimmer(interval_s=30, busy_interval_s=120, clock=clock)
    trimmer._trim = calls.append
    clock.now += 60
    assert not trimmer.idle()                   # no work since start: nothing to give back
    assert not trimmer.stepped()                # busy, but not for 120 s
    assert trimmer.idle() and calls == [0]      # idle after work, 30 s passed
    clock.now += 10
    trimmer.stepped()
    assert not trimmer.idle()                   # within 30 s of the last trim
    clock.now += 200
    assert trimmer.stepped() and len(calls) == 2
