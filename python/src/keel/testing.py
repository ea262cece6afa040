"""Helpers for testing keel's pure cores (shipped with keel, as trio ships its own).

keel's cores take a clock (and, where they need one, a random source) as
parameters instead of reading the time themselves. Tests hand them a
:class:`FakeClock` and move time forward explicitly, so a back-off of an hour
is tested in a microsecond and nothing ever waits on a real timer::

    clock = FakeClock()
    policy = AgentPolicy(rules, clock=clock)
    clock.advance(30)

A seeded :class:`random.Random` is the random source for jitter.
"""

from __future__ import annotations


class FakeClock:
    """Seconds that move only when the test says so (monotonic by default).

    Call it for the time, like ``time.monotonic``. ``advance`` moves it
    forward; ``set`` jumps to a given time and refuses to go back unless
    ``allow_backwards`` (a wall clock may be stepped back by an operator).
    """

    def __init__(self, start: float = 1000.0, *, allow_backwards: bool = False) -> None:
        self.now = float(start)
        self.allow_backwards = allow_backwards

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock cannot advance by {seconds} s; use set() to step back")
        self.now += seconds
        return self.now

    def set(self, when: float) -> float:
        if when < self.now and not self.allow_backwards:
            raise ValueError(f"{when} is before {self.now}: this clock does not go back")
        self.now = float(when)
        return self.now
