"""Working days from the real Chinese holiday calendar.

`chinesecalendar` knows statutory holidays and weekend make-up working days (调休) up to the last
year the State Council has published. For later years an administrator extends
``models/calendar/holidays.yaml`` (or HOTLINE_HOLIDAY_FILE); for days neither knows, the calendar falls
back to Monday–Friday and logs a warning once per year, so a ticket dispatched in December still gets a
deadline in January.
"""

from __future__ import annotations

import logging
import math
from datetime import date, datetime, time, timedelta
from pathlib import Path

import chinese_calendar
import yaml

from models.policy import Duration

log = logging.getLogger(__name__)
DEFAULT_HOLIDAY_FILE = Path(__file__).parent / "calendar" / "holidays.yaml"


class WorkCalendar:
    def __init__(self, extra_files: list[Path] | None = None) -> None:
        self.extra_holidays: set[date] = set()
        self.extra_workdays: set[date] = set()
        self.complete_years: set[int] = set()
        self._warned: set[int] = set()
        for path in extra_files if extra_files is not None else [DEFAULT_HOLIDAY_FILE]:
            self.load(path)

    def load(self, path: Path) -> None:
        with Path(path).open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        self.extra_holidays |= {_as_date(d) for d in data.get("holidays") or []}
        self.extra_workdays |= {_as_date(d) for d in data.get("workdays") or []}
        self.complete_years |= set(data.get("years_complete") or [])

    def is_workday(self, day: date) -> bool:
        if day in self.extra_holidays:
            return False
        if day in self.extra_workdays:
            return True
        if day.year in self.complete_years:
            return day.weekday() < 5
        try:
            return chinese_calendar.is_workday(day)
        except NotImplementedError:
            if day.year not in self._warned:
                self._warned.add(day.year)
                log.warning(
                    "no holiday data for %s: treating Monday-Friday as working days; "
                    "add the State Council's holiday notice to the holiday file",
                    day.year,
                )
            return day.weekday() < 5

    def next_workday(self, day: date) -> date:
        day += timedelta(days=1)
        while not self.is_workday(day):
            day += timedelta(days=1)
        return day

    def add_working_days(self, start: datetime, days: float) -> datetime:
        """``days`` working days after ``start``, keeping the time of day.

        A start on a non-working day counts from 00:00 of the next working day, so a ticket dispatched
        on Saturday with a one-working-day limit is due at the end of Monday. Fractions (0.5wd) add
        that share of 24 hours after the whole days.
        """
        whole = math.floor(days)
        frac = days - whole
        if not self.is_workday(start.date()):
            # the clock starts at 00:00 of the next working day and runs to the end of the last counted
            # working day (midnight after it, which may be a Saturday's 00:00)
            d = self.next_workday(start.date())
            if whole == 0:
                result = datetime.combine(d, time(0), tzinfo=start.tzinfo)
            else:
                for _ in range(whole - 1):
                    d = self.next_workday(d)
                result = datetime.combine(d + timedelta(days=1), time(0), tzinfo=start.tzinfo)
        else:
            d = start.date()
            for _ in range(whole):
                d = self.next_workday(d)
            result = datetime.combine(d, start.timetz())
        if frac:
            result += timedelta(hours=24 * frac)
        return result

    def add(self, start: datetime, duration: Duration | str) -> datetime:
        if isinstance(duration, str):
            duration = Duration.parse(duration)
        if duration.unit == "wd":
            return self.add_working_days(start, duration.amount)
        if duration.unit == "d":
            return start + timedelta(days=duration.amount)
        if duration.unit == "h":
            return start + timedelta(hours=duration.amount)
        return start + timedelta(minutes=duration.amount)

    def working_days_between(self, start: date, end: date) -> int:
        n, d = 0, start
        while d < end:
            d += timedelta(days=1)
            if self.is_workday(d):
                n += 1
        return n


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


_calendar: WorkCalendar | None = None


def get_calendar() -> WorkCalendar:
    global _calendar
    if _calendar is None:
        from models.settings import get_settings

        files = [DEFAULT_HOLIDAY_FILE]
        extra = get_settings().holiday_file
        if extra:
            files.append(Path(extra))
        _calendar = WorkCalendar(files)
    return _calendar
