"""Working days from the Chinese holiday calendar, its extension file, and the 2026→2027 boundary."""

from __future__ import annotations

import logging
from datetime import date, datetime

from models.clock import CHINA_TZ
from models.workcalendar import DEFAULT_HOLIDAY_FILE, WorkCalendar


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=CHINA_TZ)


def test_national_day_and_make_up_saturday():
    cal = WorkCalendar([DEFAULT_HOLIDAY_FILE])
    assert cal.is_workday(date(2026, 10, 10))  # Saturday, make-up working day (调休)
    assert not cal.is_workday(date(2026, 10, 5))  # Monday inside the National Day holiday
    # dispatched Wed 30 Sep 10:00 with 5 wd: 8, 9, 10 (Sat), 12, 13 Oct
    assert cal.add(at(2026, 9, 30, 10, 0), "5wd") == at(2026, 10, 13, 10, 0)
    assert cal.add(at(2026, 9, 30, 10, 0), "1wd") == at(2026, 10, 8, 10, 0)


def test_start_on_weekend_counts_from_next_working_day():
    cal = WorkCalendar([DEFAULT_HOLIDAY_FILE])
    # Saturday 21 Nov 2026: one working day = the whole of Monday
    assert cal.add(at(2026, 11, 21, 15, 30), "1wd") == at(2026, 11, 24, 0, 0)
    # five working days from a Sunday: Monday to Friday, due at the end of Friday (Saturday 00:00)
    assert cal.add(at(2026, 11, 22, 10, 0), "5wd") == at(2026, 11, 28, 0, 0)


def test_hours_and_calendar_days_ignore_holidays():
    cal = WorkCalendar([DEFAULT_HOLIDAY_FILE])
    assert cal.add(at(2026, 10, 1, 8, 0), "12h") == at(2026, 10, 1, 20, 0)
    assert cal.add(at(2026, 10, 1, 8, 0), "5d") == at(2026, 10, 6, 8, 0)


def test_year_boundary_uses_holiday_file_then_weekday_fallback(caplog):
    cal = WorkCalendar([DEFAULT_HOLIDAY_FILE])
    with caplog.at_level(logging.WARNING):
        # Wed 30 Dec 2026 + 5 wd: 31 Dec, (1 Jan holiday from the file, 2–3 weekend), 4, 5, 6, 7 Jan
        assert cal.add(at(2026, 12, 30, 15, 0), "5wd") == at(2027, 1, 7, 15, 0)
    assert any("2027" in r.getMessage() for r in caplog.records)


def test_administrator_extends_the_calendar(tmp_path):
    extra = tmp_path / "2027.yaml"
    extra.write_text(
        "years_complete: [2027]\nholidays: [2027-02-05, 2027-02-08]\nworkdays: [2027-02-20]\n",
        encoding="utf-8",
    )
    cal = WorkCalendar([DEFAULT_HOLIDAY_FILE, extra])
    assert not cal.is_workday(date(2027, 2, 5))
    assert cal.is_workday(date(2027, 2, 20))  # a Saturday made a working day
    # Thu 4 Feb + 2 wd skips Fri 5 and Mon 8: 9, 10 Feb
    assert cal.add(at(2027, 2, 4, 9, 0), "2wd") == at(2027, 2, 10, 9, 0)
