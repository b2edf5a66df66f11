"""The product's single source of "now": a system clock in production, a controllable one in tests.

All times are timezone-aware; the hotline's own timezone (Asia/Shanghai by default) is used for
working-day arithmetic and quiet hours.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

CHINA_TZ = ZoneInfo("Asia/Shanghai")


class Clock:
    """Wall clock. Subclassed by FakeClock for tests and simulations."""

    def __init__(self, tz: ZoneInfo = CHINA_TZ) -> None:
        self.tz = tz

    def now(self) -> datetime:
        return datetime.now(self.tz)


class FakeClock(Clock):
    """A clock that only moves when told to."""

    def __init__(self, start: datetime, tz: ZoneInfo = CHINA_TZ) -> None:
        super().__init__(tz)
        if start.tzinfo is None:
            start = start.replace(tzinfo=tz)
        self._now = start

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            when = when.replace(tzinfo=self.tz)
        self._now = when

    def advance(self, delta: timedelta | None = None, **kwargs: float) -> datetime:
        self._now = self._now + (delta or timedelta(**kwargs))
        return self._now


_clock: Clock = Clock()


def get_clock() -> Clock:
    return _clock


def set_clock(clock: Clock) -> Clock:
    """Install a clock for the whole process; returns the previous one."""
    global _clock
    previous, _clock = _clock, clock
    return previous


def now() -> datetime:
    return _clock.now()
