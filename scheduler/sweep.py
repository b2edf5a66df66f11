"""The deadline sweep: one pass at ``models.clock.now()`` that finds what has come due and acts once.

What it does (every number comes from the ticket's policy preset):

* not signed by ``sign_due`` → 催办 the unit (``urge_sign``); an urgent ticket (whose ``sign_due`` is at
  the latest its first-response deadline ``respond_due``) not signed in time → an urgent 催办 at once,
  day or night (``urge_respond``);
* ``yellow_at`` reached while the unit still owes the reply → a yellow card in the unit's group
  (``yellow``; 宿州 工作规范 四（五）红黄牌警示提醒制度);
* ``finish_due`` passed while the unit still owes the reply → the ticket is marked overdue and supervised
  at once, a red card goes to the unit and a supervision notice to the center (``red``); the policy's
  escalation for the unit's n-th overdue (渠府办〔2023〕66号 第十九条（一）: first → 县行政审批局约谈,
  second → 县纪委监委约谈) is recorded as an event and a notice (``escalation``);
* one survey reminder ``survey.reminder_after`` after the reply (``survey_reminder``), and when
  ``survey_due`` passes without a rating the ticket is archived as "no rating" (``survey_expired``).

Acting once: each action first inserts its ``Notice`` row (ticket, kind, deadline) with INSERT … ON
CONFLICT DO NOTHING, and only the transaction whose insert went through acts; on PostgreSQL the ticket
row is also taken with FOR UPDATE SKIP LOCKED, so two scheduler processes never act on the same ticket
at once. A missed minute (or a scheduler that was down) is caught up by the next sweep, because every
query asks "deadline ≤ now and no notice for it yet", never "deadline in the last minute".

Quiet hours: pushes that are not urgent wait for 08:00 (no pushes 22:00–08:00). Reminders (urge, yellow,
survey reminder) are simply not issued at night and are issued by the first sweep after 08:00, when the
ticket is checked again (a unit that signed at 07:50 gets no urge). Overdue is a fact, not a reminder: a
deadline passing at night marks the ticket overdue at once, and its red card and supervision notice
are queued in the outbox for 08:00.

Every query is an index range on a deadline column (tickets' (status, deadline) indexes) plus a NOT
EXISTS probe on the notices' unique index, so 100,000 open tickets sweep in well under a second
(scheduler/bench.py).
"""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, time, timedelta
from functools import lru_cache

from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from bot.cards import ticket_summary, unit_card
from bot.citizen import survey_message
from bot.messages import Reply
from bot.outbox import chats_of_unit, enqueue, notify_citizen
from models.catalog import CENTER
from models.clock import CHINA_TZ, now
from models.db import conflict_insert
from models.policy import Duration, Policy, load_policy, preset_names
from models.settings import get_settings
from models.tables import Notice, Ticket, TicketEvent, Unit
from models.workcalendar import get_calendar
from models.workflow import SYSTEM, TYPE_ZH, expire_survey, latest_reply, mark_overdue, supervise, urge

log = logging.getLogger(__name__)

QUIET_START = time(22, 0)
QUIET_END = time(8, 0)
# the unit still owes the reply: the finish clock is its own (a ticket waiting for the center's review of
# a reply or a return is not chased)
CHASE_STATES = ("dispatched", "signed", "redo", "extension_requested")
NOTICE_KINDS = (
    "urge_sign",
    "urge_respond",
    "yellow",
    "red",
    "escalation",
    "survey_reminder",
    "survey_expired",
)


@dataclass
class SweepStats:
    at: datetime
    quiet: bool = False
    urged: int = 0
    urgent_urged: int = 0
    yellow: int = 0
    red: int = 0
    escalations: int = 0
    survey_reminders: int = 0
    surveys_expired: int = 0
    candidates: int = 0
    skipped: int = 0  # locked by another process, changed since selected, or already done by another
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def acted(self) -> int:
        return (
            self.urged
            + self.urgent_urged
            + self.yellow
            + self.red
            + self.survey_reminders
            + self.surveys_expired
        )

    def as_dict(self) -> dict:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        data["acted"] = self.acted
        return data


# --------------------------------------------------------------------------- time helpers


def in_quiet_hours(at: datetime) -> bool:
    local = at.astimezone(CHINA_TZ).timetz().replace(tzinfo=None)
    return local >= QUIET_START or local < QUIET_END


def quiet_until(at: datetime) -> datetime:
    """The moment a push held back at ``at`` may go: ``at`` itself outside quiet hours, else 08:00."""
    if not in_quiet_hours(at):
        return at
    local = at.astimezone(CHINA_TZ)
    day = (
        local.date() if local.timetz().replace(tzinfo=None) < QUIET_END else local.date() + timedelta(days=1)
    )
    return datetime.combine(day, QUIET_END, tzinfo=CHINA_TZ)


def notice_key(when: datetime | None) -> str:
    """A deadline as a Notice key: China time to the second (a new deadline gives a new key)."""
    return when.astimezone(CHINA_TZ).strftime("%Y-%m-%dT%H:%M:%S") if when else ""


def _t(when: datetime | None) -> str:
    return f"{when.astimezone(CHINA_TZ):%m-%d %H:%M}" if when else "—"


def _span_zh(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days}天{hours}小时" if hours else f"{days}天"
    if hours:
        return f"{hours}小时{mins}分钟" if mins else f"{hours}小时"
    return f"{mins}分钟"


def short_cite(cite: str) -> str:
    """The document and article of a preset's cite, without the explanation in brackets."""
    return cite.split("（")[0].split("；")[0].split("：")[0].strip()


def _span(d: Duration, *, longest: bool) -> timedelta:
    """A duration as real time: working days at their shortest (no days off) or longest (a Golden Week)."""
    if d.unit == "wd":
        return timedelta(days=d.amount * 7 / 5 + 9) if longest else timedelta(days=d.amount)
    if d.unit == "d":
        return timedelta(days=d.amount)
    return timedelta(hours=d.amount) if d.unit == "h" else timedelta(minutes=d.amount)


@lru_cache(maxsize=1)
def _survey_bounds() -> tuple[timedelta, timedelta]:
    """Over every preset: the shortest survey reminder delay, and the longest gap between the reminder and
    the survey's end (window − reminder_after). Safe bounds for the SQL query; each ticket is then checked
    exactly against its own policy."""
    reminder: timedelta | None = None
    gap = timedelta(0)
    for name in set(preset_names()) | {get_settings().policy}:
        try:
            survey = load_policy(name).survey
            r = Duration.parse(survey.reminder_after)
            w = Duration.parse(survey.window)
        except (KeyError, ValueError):
            continue
        short = _span(r, longest=False)
        reminder = short if reminder is None else min(reminder, short)
        gap = max(gap, _span(w, longest=True) - short)
    return reminder or timedelta(days=1), gap or timedelta(days=3)


# --------------------------------------------------------------------------- once-only claims


def claim(session: Session, ticket_id: int, kind: str, key: str, unit_code: str | None, at: datetime) -> bool:
    """Record that (ticket, kind, key) is being issued; False when it already was (by anyone).

    PostgreSQL and SQLite: INSERT … ON CONFLICT DO NOTHING on the notices' unique constraint; a concurrent
    insert of the same key waits for the other transaction and then does nothing.
    """
    values = {"ticket_id": ticket_id, "kind": kind, "key": key, "unit_code": unit_code, "at": at}
    insert = conflict_insert(session)
    if insert is not None:
        stmt = (
            insert(Notice)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["ticket_id", "kind", "key"])
            .returning(Notice.id)
        )
        return session.execute(stmt).scalar_one_or_none() is not None
    try:  # other databases: a savepoint around a plain insert
        with session.begin_nested():
            session.add(Notice(**values))
        return True
    except IntegrityError:
        return False


def _no_notice(kinds: tuple[str, ...], issued_after: ColumnElement) -> ColumnElement:
    """No notice of ``kinds`` issued at or after the deadline ``issued_after``: a notice about an earlier
    deadline was issued before the current deadline was set (deadlines are set in the future), so it
    does not hide the current one."""
    return ~exists().where(Notice.ticket_id == Ticket.id, Notice.kind.in_(kinds), Notice.at >= issued_after)


# --------------------------------------------------------------------------- pushes


def _push_unit(
    session: Session,
    unit_code: str,
    reply: Reply,
    *,
    ticket_id: int,
    kind: str,
    dedupe: str,
    not_before: datetime | None = None,
) -> int:
    """Queue ``reply`` for every group of ``unit_code``; ``not_before`` holds it in the outbox until then."""
    n = 0
    for chat in chats_of_unit(session, unit_code):
        msg = enqueue(
            session,
            channel="telegram",
            chat_id=chat,
            reply=reply,
            ticket_id=ticket_id,
            kind=kind,
            dedupe_key=f"{dedupe}:{chat}",
        )
        if msg is not None:
            if not_before is not None and not_before > msg.next_attempt_at:
                msg.next_attempt_at = not_before
            n += 1
    if n == 0:
        log.warning("no group bound to unit %s: %s for ticket %s not delivered", unit_code, kind, ticket_id)
    return n


def _unit_name(session: Session, code: str | None) -> str:
    unit = session.get(Unit, code) if code else None
    return unit.name if unit else (code or "—")


def _count_notices(session: Session, kind: str, unit_code: str, since: datetime | None = None) -> int:
    stmt = select(func.count(Notice.id)).where(Notice.kind == kind, Notice.unit_code == unit_code)
    if since is not None:
        stmt = stmt.where(Notice.at >= since)
    return int(session.scalar(stmt) or 0)


def _month_start(at: datetime) -> datetime:
    local = at.astimezone(CHINA_TZ)
    return datetime(local.year, local.month, 1, tzinfo=CHINA_TZ)


# --------------------------------------------------------------------------- the actions


def _act_sign(session: Session, t: Ticket, at: datetime, policy: Policy, stats: SweepStats) -> None:
    if t.status != "dispatched" or t.sign_due is None or t.sign_due > at:
        stats.skipped += 1
        return
    urgent = bool(t.urgent)
    if not urgent and in_quiet_hours(at):
        return  # picked up again at 08:00
    kind = "urge_respond" if urgent else "urge_sign"
    due = t.sign_due
    if not claim(session, t.id, kind, notice_key(due), t.lead_unit, at):
        stats.skipped += 1
        return
    if urgent:
        level = policy.urgent.get(t.urgent_level or "") or next(iter(policy.urgent.values()), None)
        name = level.name_zh if level else "紧急事项"
        cite = f"（{short_cite(level.cite)}）" if level else ""
        headline = (
            f"🚨 紧急催办：本工单为{name}，须在 {_t(t.respond_due or due)} 前反馈初步响应意见，"
            f"签收时限 {_t(due)} 已过仍未签收，请立即签收并处置{cite}。"
        )
        note = "紧急事项超过签收/首次响应时限自动催办"
        stats.urgent_urged += 1
    else:
        headline = (
            f"⏰ 催办：本工单签收时限为 {_t(due)}，现已超时未签收，请立即签收；不属于贵单位职责的，"
            f"请申请退回并注明理由和转送建议（{short_cite(policy.sign.cite)}）。"
        )
        note = "超过签收时限自动催办"
        stats.urged += 1
    urge(session, t, SYSTEM, note=note)
    for tu in t.units:
        if tu.signed_at is None:
            _push_unit(
                session,
                tu.unit_code,
                unit_card(session, t, tu.unit_code, headline=headline),
                ticket_id=t.id,
                kind=kind,
                dedupe=f"{kind}:{t.id}:{notice_key(due)}",
            )


def _act_yellow(session: Session, t: Ticket, at: datetime, policy: Policy, stats: SweepStats) -> None:
    if (
        t.status not in CHASE_STATES
        or t.yellow_at is None
        or t.yellow_at > at
        or t.finish_due is None
        or t.finish_due <= at
    ):
        stats.skipped += 1
        return
    if in_quiet_hours(at) and not t.urgent:
        return
    unit = t.lead_unit
    if not claim(session, t.id, "yellow", notice_key(t.finish_due), unit, at):
        stats.skipped += 1
        return
    stats.yellow += 1
    if not unit:
        return
    n = _count_notices(session, "yellow", unit, _month_start(at))
    headline = (
        f"🟡 黄牌预警：本工单办结时限为 {_t(t.finish_due)}，剩余约 {_span_zh(t.finish_due - at)}，请抓紧办理；"
        f"确需延期的，请在时限前申请。本月贵单位第 {n} 张黄牌（{short_cite(policy.warning.cite)}）。"
    )
    _push_unit(
        session,
        unit,
        unit_card(session, t, unit, headline=headline),
        ticket_id=t.id,
        kind="yellow",
        dedupe=f"yellow:{t.id}:{notice_key(t.finish_due)}",
    )


def _lock_unit(session: Session, unit_code: str) -> None:
    """Serialise the per-unit overdue count between two schedulers (PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Unit.code).where(Unit.code == unit_code).with_for_update())


def _act_red(session: Session, t: Ticket, at: datetime, policy: Policy, stats: SweepStats) -> None:
    if t.status not in CHASE_STATES or t.finish_due is None or t.finish_due > at:
        stats.skipped += 1
        return
    unit = t.lead_unit
    key = notice_key(t.finish_due)
    if unit:
        _lock_unit(session, unit)
    if not claim(session, t.id, "red", key, unit, at):
        stats.skipped += 1
        return
    stats.red += 1
    mark_overdue(session, t, SYSTEM, which="finish")
    supervise(session, t, SYSTEM, note=f"超过办结时限 {_t(t.finish_due)} 自动督办")
    not_before = None if t.urgent else quiet_until(at)
    escalation = ""
    if unit:
        nth = _count_notices(session, "red", unit)  # this unit's overdue tickets, this one included
        steps = policy.warning.escalation
        if steps and claim(session, t.id, "escalation", key, unit, at):
            step = steps[min(nth, len(steps)) - 1]
            escalation = f"该单位第 {nth} 次超期：{step}（{short_cite(policy.warning.cite)}）"
            session.add(
                TicketEvent(
                    ticket_id=t.id,
                    at=at,
                    actor=SYSTEM.label,
                    action="escalate",
                    from_status=t.status,
                    to_status=t.status,
                    payload={"unit": unit, "nth": nth, "step": step, "basis": policy.warning.cite},
                )
            )
            stats.escalations += 1
        month = _count_notices(session, "red", unit, _month_start(at))
        headline = (
            f"🟥 红牌：本工单已超过办结时限 {_t(t.finish_due)}，已记为超期并由热线中心督办，"
            f"请立即办理并提交办结。本月贵单位第 {month} 张红牌。"
        )
        _push_unit(
            session,
            unit,
            unit_card(session, t, unit, headline=headline),
            ticket_id=t.id,
            kind="red",
            dedupe=f"red:{t.id}:{key}",
            not_before=not_before,
        )
    lines = [
        f"【超期督办】工单 {t.number}（{TYPE_ZH.get(t.type or '', '未分类')}，主办：{_unit_name(session, unit)}）"
        f"已超过办结时限 {_t(t.finish_due)} 仍未办结，已自动督办。"
    ]
    if escalation:
        lines.append(escalation)
    lines += ticket_summary(session, t)[1:]
    _push_unit(
        session,
        CENTER,
        Reply("\n".join(lines)),
        ticket_id=t.id,
        kind="supervise",
        dedupe=f"supervise:{t.id}:{key}",
        not_before=not_before,
    )


def _act_survey_reminder(
    session: Session, t: Ticket, at: datetime, policy: Policy, stats: SweepStats
) -> None:
    if t.status != "replied" or t.replied_at is None or (t.survey_due is not None and t.survey_due <= at):
        stats.skipped += 1
        return
    if get_calendar().add(t.replied_at, policy.survey.reminder_after) > at:
        return  # another preset's shorter reminder brought it into the query
    if in_quiet_hours(at):
        return
    key = notice_key(t.replied_at)
    if not claim(session, t.id, "survey_reminder", key, t.lead_unit, at):
        stats.skipped += 1
        return
    stats.survey_reminders += 1
    reply = latest_reply(session, t)
    survey = survey_message(t, reply.result if reply else "", _unit_name(session, t.lead_unit))
    until = f"，{_t(t.survey_due)} 前未评价的将按“未评价”归档" if t.survey_due else ""
    notify_citizen(
        session,
        t.citizen_id,
        Reply(
            f"【回访提醒】您还没有对工单办理情况进行评价{until}。\n\n{survey.text}", buttons=survey.buttons
        ),
        ticket_id=t.id,
        kind="survey_reminder",
        dedupe_key=f"survey_reminder:{t.id}:{key}",
    )


def _act_survey_expired(session: Session, t: Ticket, at: datetime, policy: Policy, stats: SweepStats) -> None:
    if t.status != "replied" or t.survey_due is None or t.survey_due > at:
        stats.skipped += 1
        return
    if not claim(session, t.id, "survey_expired", notice_key(t.survey_due), t.lead_unit, at):
        stats.skipped += 1
        return
    expire_survey(session, t, SYSTEM)  # archived as "no rating", never counted as satisfied
    stats.surveys_expired += 1


# --------------------------------------------------------------------------- candidates


Action = Callable[[Session, Ticket, datetime, Policy, SweepStats], None]


def _candidates(session: Session, at: datetime, limit: int | None) -> list[tuple[str, int]]:
    """(step, ticket id) of everything that may have come due, oldest deadline first, per step."""
    quiet = in_quiet_hours(at)
    night = (Ticket.urgent.is_(True),) if quiet else ()
    queries = {
        "sign": select(Ticket.id)
        .where(
            Ticket.status == "dispatched",
            Ticket.sign_due <= at,
            *night,
            _no_notice(("urge_sign", "urge_respond"), Ticket.sign_due),
        )
        .order_by(Ticket.sign_due),
        "red": select(Ticket.id)
        .where(
            Ticket.status.in_(CHASE_STATES), Ticket.finish_due <= at, _no_notice(("red",), Ticket.finish_due)
        )
        .order_by(Ticket.finish_due),
        # an overdue ticket's red card (issued after yellow_at) also ends its yellow candidacy
        "yellow": select(Ticket.id)
        .where(
            Ticket.status.in_(CHASE_STATES),
            Ticket.yellow_at <= at,
            *night,
            _no_notice(("yellow", "red"), Ticket.yellow_at),
        )
        .order_by(Ticket.yellow_at),
        "survey_expired": select(Ticket.id)
        .where(Ticket.status == "replied", Ticket.survey_due <= at)
        .order_by(Ticket.survey_due),
    }
    if not quiet:
        reminder, gap = _survey_bounds()
        queries["survey_reminder"] = (
            select(Ticket.id)
            .where(
                Ticket.status == "replied",
                # survey_due = replied_at + window: an index range on (status, survey_due)
                Ticket.survey_due > at,
                Ticket.survey_due <= at + gap,
                Ticket.replied_at <= at - reminder,
                _no_notice(("survey_reminder",), Ticket.replied_at),
            )
            .order_by(Ticket.replied_at)
        )
    out: list[tuple[str, int]] = []
    for step, stmt in queries.items():
        if limit is not None:
            stmt = stmt.limit(limit)
        out += [(step, tid) for tid in session.scalars(stmt)]
    return out


ACTIONS: dict[str, Action] = {
    "sign": _act_sign,
    "red": _act_red,  # before yellow: a ticket that is already overdue gets no yellow card
    "yellow": _act_yellow,
    "survey_expired": _act_survey_expired,  # before the reminder: an expired survey gets no reminder
    "survey_reminder": _act_survey_reminder,
}


def _process(
    factory: sessionmaker[Session], step: str, ticket_id: int, at: datetime, stats: SweepStats
) -> None:
    """One candidate in its own transaction, with the ticket row locked (PostgreSQL: SKIP LOCKED)."""
    with factory.begin() as session:
        stmt = select(Ticket).where(Ticket.id == ticket_id)
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        ticket = session.scalars(stmt).one_or_none()
        if ticket is None:  # another scheduler (or a person) holds the ticket: next minute
            stats.skipped += 1
            return
        ACTIONS[step](session, ticket, at, load_policy(ticket.policy), stats)


def sweep(factory: sessionmaker[Session], *, limit: int | None = None) -> SweepStats:
    """One pass at ``models.clock.now()``; ``limit`` caps the tickets taken per step (the rest next time)."""
    started = _time.perf_counter()
    at = now()
    stats = SweepStats(at=at, quiet=in_quiet_hours(at))
    with factory() as session:
        found = _candidates(session, at, limit)
    stats.candidates = len(found)
    order = {step: i for i, step in enumerate(ACTIONS)}
    for step, ticket_id in sorted(found, key=lambda c: order[c[0]]):
        try:
            _process(factory, step, ticket_id, at, stats)
        except OperationalError as err:  # SQLite busy / PostgreSQL lock timeout: the next sweep retries
            stats.skipped += 1
            stats.errors.append(f"{step}:{ticket_id}: {err.__class__.__name__}")
            log.warning("sweep: %s for ticket %s deferred: %s", step, ticket_id, err)
    stats.seconds = _time.perf_counter() - started
    if stats.acted:
        log.info(
            "sweep %s: urge %d, urgent %d, yellow %d, red %d, escalation %d, survey reminder %d, expired %d",
            _t(at),
            stats.urged,
            stats.urgent_urged,
            stats.yellow,
            stats.red,
            stats.escalations,
            stats.survey_reminders,
            stats.surveys_expired,
        )
    return stats
