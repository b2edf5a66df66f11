"""The morning digest: each unit's group hears, once a working day, what is overdue, what is due today and
what falls due in the next two working days (宿州 工作规范 四（五）: 重点跟踪临近办理时限或逾期未办理的工单)."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import date, datetime, time, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.messages import Reply
from bot.outbox import notify_unit
from models.clock import CHINA_TZ, now
from models.states import STATUS_ZH
from models.tables import Ticket, Unit
from models.workcalendar import get_calendar
from models.workflow import TYPE_ZH

log = logging.getLogger(__name__)

SOON_WORKING_DAYS = 2
MAX_LINES = 15
CHASE_STATES = ("dispatched", "signed", "redo", "extension_requested")


def _line(t: Ticket) -> str:
    return (
        f"  {t.number} {TYPE_ZH.get(t.type or '', '')} {STATUS_ZH.get(t.status, t.status)}"
        f" 时限 {t.finish_due.astimezone(CHINA_TZ):%m-%d %H:%M}"
    )


def _section(title: str, tickets: list[Ticket]) -> list[str]:
    if not tickets:
        return []
    lines = [f"{title} {len(tickets)} 件："] + [_line(t) for t in tickets[:MAX_LINES]]
    if len(tickets) > MAX_LINES:
        lines.append(f"  …等 {len(tickets)} 件，发送 /pending 查看全部")
    return lines


def digest_texts(session: Session, today: date | None = None) -> dict[str, str]:
    """Unit code → the digest text for every unit that has something overdue or coming due."""
    at = now()
    today = today or at.astimezone(CHINA_TZ).date()
    cal = get_calendar()
    day_end = datetime.combine(today + timedelta(days=1), time(0), tzinfo=CHINA_TZ)
    soon = today
    for _ in range(SOON_WORKING_DAYS):
        soon = cal.next_workday(soon)
    soon_end = datetime.combine(soon + timedelta(days=1), time(0), tzinfo=CHINA_TZ)
    rows = session.scalars(
        select(Ticket)
        .where(Ticket.status.in_(CHASE_STATES), Ticket.finish_due < soon_end, Ticket.lead_unit.is_not(None))
        .order_by(Ticket.finish_due)
    ).all()
    by_unit: dict[str, dict[str, list[Ticket]]] = defaultdict(lambda: defaultdict(list))
    for t in rows:
        bucket = "overdue" if t.finish_due <= at else "today" if t.finish_due < day_end else "soon"
        by_unit[t.lead_unit][bucket].append(t)
    out: dict[str, str] = {}
    for code in sorted(by_unit):
        b = by_unit[code]
        unit = session.get(Unit, code)
        lines = [f"【早间提醒】{today:%Y-%m-%d} {unit.name if unit else code}"]
        lines += _section("🟥 已超期", b["overdue"])
        lines += _section("🟡 今日到期", b["today"])
        lines += _section(f"⏳ {SOON_WORKING_DAYS}个工作日内到期", b["soon"])
        lines.append("请及时办理；确需延期或退回的，请在时限前提出申请。")
        out[code] = "\n".join(lines)
    return out


def morning_digest(session: Session, today: date | None = None) -> int:
    """Queue the digest for every unit with something to say; returns the number of units told."""
    today = today or now().astimezone(CHINA_TZ).date()
    n = 0
    for code, text in digest_texts(session, today).items():
        if notify_unit(session, code, Reply(text), kind="digest", dedupe_key=f"digest:{code}:{today:%Y%m%d}"):
            n += 1
    log.info("morning digest %s: %d units", today, n)
    return n
