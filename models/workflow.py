"""The ticket workflow as plain service functions (no chat code): every step the seeds describe.

Each function takes a SQLAlchemy session, the ticket and the acting person, checks that the step is
allowed now, applies it under the ticket's policy preset, and appends one audit event. Nothing here
commits: the caller's unit of work does. Errors are ``WorkflowError`` with a Chinese message saying
why the step is not allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.catalog import CENTER
from models.clock import now
from models.db import conflict_insert
from models.errors import IllegalTransition, IncompleteReply, NotFound, PermissionDenied, WorkflowError
from models.policy import REQUEST_TYPES, Duration, Policy, load_policy
from models.settings import get_settings
from models.states import ALLOWED, HANDLING_STATES, STATUS_ZH
from models.tables import (
    Citizen,
    Rating,
    Ticket,
    TicketEvent,
    TicketReply,
    TicketRequest,
    TicketSequence,
    TicketUnit,
    Unit,
)
from models.workcalendar import get_calendar

TYPE_ZH = {
    "consultation": "咨询",
    "help": "求助",
    "complaint": "投诉",
    "report": "举报",
    "suggestion": "建议",
}
RATING_ZH = {"satisfied": "满意", "basic": "基本满意", "unsatisfied": "不满意", "none": "未评价"}
_PHONE_OK = re.compile(r"^[\d\-+ ()]{7,20}$")


@dataclass(frozen=True)
class Actor:
    """Who performs a step: a citizen, unit staff, center staff, or the system (scheduler)."""

    kind: str  # citizen | staff | center | system
    id: str
    unit_code: str | None = None
    role: str | None = None  # handler | leader | operator | supervisor
    name: str = ""

    @property
    def label(self) -> str:
        unit = f"@{self.unit_code}" if self.unit_code else ""
        return f"{self.kind}:{self.id}{unit}"


SYSTEM = Actor("system", "hotline")


# --------------------------------------------------------------------------- helpers


def policy_of(ticket: Ticket) -> Policy:
    return load_policy(ticket.policy)


def _check(ticket: Ticket, action: str) -> None:
    if ticket.status not in ALLOWED[action]:
        raise IllegalTransition(ticket.number, ticket.status, action)


def _event(
    session: Session,
    ticket: Ticket,
    actor: Actor,
    action: str,
    to_status: str | None = None,
    **payload: Any,
) -> TicketEvent:
    from_status = ticket.status
    if to_status is not None:
        ticket.status = to_status
    ev = TicketEvent(
        ticket=ticket,
        at=now(),
        actor=actor.label,
        action=action,
        from_status=from_status,
        to_status=ticket.status,
        payload={k: _jsonable(v) for k, v in payload.items()},
    )
    session.add(ev)  # written with the step's next flush (issue 8: a flush per event cost more than the event)
    return ev


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _next_number(session: Session, when: datetime) -> str:
    """Ticket numbers like 20261122-000123: a per-day counter, safe under concurrent writers.

    On PostgreSQL the number is taken in its own one-statement transaction (issue 8). Taken inside the
    step's transaction, the day's counter row stayed locked until that transaction committed, so every new
    ticket waited for the one before it: under load a third of the database sessions sampled were waiting
    for that row lock while holding a step worker. A number taken by a step that then rolls back is not
    reused: numbers are unique and increase through the day, but may skip one (a ticket number identifies a
    request; none of the five regulations in the seeds asks for numbers without gaps). SQLite has one writer
    at a time anyway, and a second connection there would wait for the step's own write lock, so it keeps
    the counter inside the transaction."""
    day = when.strftime("%Y%m%d")
    bind = session.get_bind()
    if isinstance(bind, Engine) and bind.dialect.name == "postgresql":
        table = TicketSequence.__table__
        upsert = (
            conflict_insert(session)(table)
            .values(day=day, last=1)
            .on_conflict_do_update(index_elements=["day"], set_={"last": table.c.last + 1})
            .returning(table.c.last)
        )
        with bind.begin() as conn:
            return f"{day}-{conn.execute(upsert).scalar_one():06d}"
    for _ in range(5):
        res = session.execute(
            update(TicketSequence)
            .where(TicketSequence.day == day)
            .values(last=TicketSequence.last + 1)
            .returning(TicketSequence.last)
        ).scalar_one_or_none()
        if res is not None:
            return f"{day}-{res:06d}"
        try:
            with session.begin_nested():
                session.add(TicketSequence(day=day, last=1))
            return f"{day}-{1:06d}"
        except IntegrityError:
            continue
    raise WorkflowError("工单编号生成失败，请稍后重试。")


def _clock_start(policy: Policy, at: datetime) -> datetime:
    """When the limits start counting: at dispatch, or 0:00 the next day (大连 第十三条)."""
    if policy.clock_start == "next_day":
        return datetime.combine(at.date() + timedelta(days=1), time(0), tzinfo=at.tzinfo)
    return at


def _require_unit(session: Session, code: str) -> Unit:
    unit = session.get(Unit, code)
    if unit is None or not unit.active:
        raise NotFound(f"没有代码为 {code} 的承办单位。")
    return unit


def _require_staff_of(ticket: Ticket, actor: Actor, *, lead_only: bool = False) -> TicketUnit:
    if actor.kind != "staff" or not actor.unit_code:
        raise PermissionDenied("只有承办单位工作人员可以办理此操作。")
    for tu in ticket.units:
        if tu.unit_code == actor.unit_code and (tu.role == "lead" or not lead_only):
            return tu
    if lead_only and any(tu.unit_code == actor.unit_code for tu in ticket.units):
        raise PermissionDenied("此操作须由主办单位办理，协办单位请将办理意见提交主办单位。")
    raise PermissionDenied(f"工单 {ticket.number} 不是交给贵单位办理的，无权操作。")


def _require_center(actor: Actor) -> None:
    if actor.kind not in ("center", "system"):
        raise PermissionDenied("此操作须由热线受理中心办理。")


def get_ticket(session: Session, number: str, *, for_update: bool = False) -> Ticket:
    stmt = select(Ticket).where(Ticket.number == number.strip())
    if for_update:
        stmt = stmt.with_for_update()
    ticket = session.scalars(stmt).one_or_none()
    if ticket is None:
        raise NotFound(f"没有找到编号为 {number} 的工单，请核对后再试。")
    return ticket


# --------------------------------------------------------------------------- intake


def create_ticket(
    session: Session,
    *,
    text: str,
    channel: str = "telegram",
    citizen: Citizen | None = None,
    policy: str | None = None,
    actor: Actor | None = None,
    **elements: Any,
) -> Ticket:
    """A new request as received (status ``received``), numbered, with its six elements if known."""
    text = (text or "").strip()
    if not text:
        raise WorkflowError("诉求内容为空，请描述您要反映的问题。")
    at = now()
    ticket = Ticket(
        number=_next_number(session, at),
        channel=channel,
        citizen_id=citizen.id if citizen else None,
        policy=policy or get_settings().policy,
        original_text=text,
        summary=elements.pop("summary", None) or text[:120],
        created_at=at,
        status="received",
        units=[],  # known empty: dispatching it later reads no unit rows (issue 8)
    )
    for key, value in elements.items():
        if not hasattr(Ticket, key):
            raise TypeError(f"unknown ticket field {key}")
        setattr(ticket, key, value)
    load_policy(ticket.policy)  # fail early on a bad preset name
    session.add(ticket)
    session.flush()
    _event(session, ticket, actor or SYSTEM, "receive", None, channel=channel)
    return ticket


def record_triage(
    session: Session,
    ticket: Ticket,
    actor: Actor = SYSTEM,
    *,
    type: str,
    units: list[str],
    confidence: float | None = None,
    urgent_level: str | None = None,
    needs_review: bool = False,
) -> Ticket:
    _check(ticket, "triage")
    if type not in REQUEST_TYPES:
        raise WorkflowError(f"未知的诉求类型：{type}")
    ticket.type = type
    ticket.urgent = bool(urgent_level)
    ticket.urgent_level = urgent_level
    ticket.suggested_units = list(units)
    ticket.triage_confidence = confidence
    ticket.verdict = "accept"
    _event(
        session,
        ticket,
        actor,
        "triage",
        "triaged",
        type=type,
        units=list(units),
        confidence=confidence,
        urgent=urgent_level,
        needs_review=needs_review,
    )
    return ticket


def retype(session: Session, ticket: Ticket, actor: Actor, *, type: str) -> None:
    """The center corrects the request type before dispatch (the limits follow the new type)."""
    _check(ticket, "dispatch")
    _require_center(actor)
    if type not in REQUEST_TYPES:
        raise WorkflowError(f"未知的诉求类型：{type}")
    old, ticket.type = ticket.type, type
    _event(session, ticket, actor, "retype", None, old=old, new=type)


def reject(session: Session, ticket: Ticket, actor: Actor, *, key: str) -> dict[str, str]:
    """不予受理: record the reason, its basis and where to go; returns what the citizen is told."""
    _check(ticket, "reject")
    policy = policy_of(ticket)
    ex = policy.exclusion(key)
    if ex is None:
        raise WorkflowError(f"本地政策（{policy.jurisdiction}）没有“{key}”这一不予受理情形。")
    ticket.verdict = "reject"
    ticket.reject_key = ex.key
    ticket.closed_at = now()
    told = {"reason": ex.reason, "key": ex.key, "wording": ex.wording, "go_to": ex.go_to, "basis": ex.cite}
    _event(session, ticket, actor, "reject", "rejected", **told)
    return told


def redirect(session: Session, ticket: Ticket, actor: Actor, *, line: str) -> None:
    """An emergency: the citizen was told to call ``line`` at once; nothing is queued."""
    _check(ticket, "redirect")
    if line not in ("110", "119", "120", "122", "96333"):
        raise WorkflowError(f"未知的紧急热线：{line}")
    ticket.verdict = "emergency"
    ticket.redirect = line
    ticket.closed_at = now()
    _event(session, ticket, actor, "redirect", "redirected", line=line)


def answer_from_kb(session: Session, ticket: Ticket, actor: Actor, *, entry_id: str, score: float) -> None:
    _check(ticket, "answer")
    ticket.kb_entry_id = entry_id
    ticket.verdict = "accept"
    ticket.closed_at = now()
    _event(session, ticket, actor, "answer", "answered", entry_id=entry_id, score=score)


def reopen_as_ticket(session: Session, ticket: Ticket, actor: Actor, *, note: str = "") -> None:
    """The citizen said the knowledge-base answer did not solve it: the request becomes a ticket."""
    _check(ticket, "reopen")
    ticket.closed_at = None
    _event(session, ticket, actor, "reopen", "triaged", note=note)


def add_info(session: Session, ticket: Ticket, actor: Actor, *, text: str) -> None:
    """追加: the citizen adds information to an open ticket."""
    _check(ticket, "add_info")
    text = (text or "").strip()
    if not text:
        raise WorkflowError("追加内容为空。")
    _event(session, ticket, actor, "add_info", None, text=text[:4000])


# --------------------------------------------------------------------------- dispatch and the unit's steps


def dispatch(
    session: Session,
    ticket: Ticket,
    actor: Actor,
    *,
    lead: str,
    co: Iterable[str] = (),
    type: str | None = None,
    urgent_level: str | None = None,
) -> Ticket:
    """转办 to a lead unit (主办) and optional co-handling units (会办); starts every clock."""
    _check(ticket, "dispatch")
    _require_center(actor)
    policy = policy_of(ticket)
    if type is not None:
        ticket.type = type
    if urgent_level is not None:
        ticket.urgent_level = urgent_level or None
        ticket.urgent = bool(urgent_level)
    if ticket.type not in REQUEST_TYPES:
        raise WorkflowError("派单前须确定诉求类型。")
    co = [c for c in dict.fromkeys(co) if c != lead]
    for code in [lead, *co]:
        _require_unit(session, code)
    if ticket.units:  # a new ticket has none: nothing to delete first, no flush (issue 8)
        ticket.units.clear()
        session.flush()  # the old rows go before new ones for the same units are inserted
    ticket.units.append(TicketUnit(unit_code=lead, role="lead", assigned_at=now()))
    for code in co:
        ticket.units.append(TicketUnit(unit_code=code, role="co", assigned_at=now()))
    ticket.lead_unit = lead
    _set_dispatch_deadlines(ticket, policy, now())
    ticket.verdict = "accept"
    _event(
        session,
        ticket,
        actor,
        "dispatch",
        "dispatched",
        lead=lead,
        co=co,
        sign_due=ticket.sign_due,
        finish_due=ticket.finish_due,
    )
    return ticket


def add_co_units(session: Session, ticket: Ticket, actor: Actor, *, units: Iterable[str]) -> list[str]:
    """The center adds co-handling units (协办/会办) to a dispatched ticket: the lead unit stays and answers
    for all (平利 第八条（四）; 渠县 第十条). Returns the codes actually added (already present ones are
    skipped); the lead's clocks do not change."""
    _check(ticket, "add_co")
    _require_center(actor)
    present = {tu.unit_code for tu in ticket.units}
    added = [c for c in dict.fromkeys(units) if c not in present and c != CENTER]
    if not added:
        raise WorkflowError("所选单位已在办理该工单，无需重复添加。")
    for code in added:
        _require_unit(session, code)
    for code in added:
        ticket.units.append(TicketUnit(unit_code=code, role="co", assigned_at=now()))
    _event(session, ticket, actor, "add_co", None, units=added, lead=ticket.lead_unit)
    return added


def _urgent_rule(policy: Policy, level: str | None):
    if not level or not policy.urgent:
        return None
    return policy.urgent.get(level) or next(iter(policy.urgent.values()))


def _set_dispatch_deadlines(ticket: Ticket, policy: Policy, at: datetime) -> None:
    cal = get_calendar()
    start = _clock_start(policy, at)
    ticket.dispatched_at = at
    ticket.clock_start = start
    ticket.signed_at = None
    ticket.signed_by = None
    ticket.sign_due = cal.add(start, policy.sign.duration)
    ticket.return_due = cal.add(start, policy.returns.window.duration)
    rule = _urgent_rule(policy, ticket.urgent_level) if ticket.urgent else None
    if rule is not None:
        ticket.respond_due = cal.add(at, rule.respond)  # urgent clocks run from receipt, not next day
        ticket.finish_due = cal.add(at, rule.finish)
        ticket.sign_due = min(ticket.sign_due, ticket.respond_due)
        ticket.return_due = min(ticket.return_due, ticket.respond_due)
    else:
        ticket.respond_due = None
        ticket.finish_due = cal.add(start, policy.limit_for(ticket.type))
    ticket.base_finish_due = ticket.finish_due
    # scheduler (issue 7): the yellow-card point for the new finish deadline
    limit = Duration.parse(rule.finish) if rule is not None else policy.limit_for(ticket.type)
    ticket.yellow_at = warning_point(policy, at if rule is not None else start, ticket.finish_due, limit)


# --------------------------------------------------------------------------- scheduler (issue 7)


def warning_point(policy: Policy, start: datetime, due: datetime, limit: Duration | None = None) -> datetime:
    """When the yellow card for ``due`` is shown: once ``yellow_fraction`` of the time from ``start`` to
    ``due`` has passed, or ``yellow_before`` before ``due``, whichever comes first. Limits counted in hours
    get only the fraction (宿迁 第十八条 sets no "one working day before"), and a "before" point that is not
    after ``start`` is ignored (a 1-working-day limit is not yellow from the start)."""
    rule = policy.warning
    point = start + (due - start) * rule.yellow_fraction
    if rule.yellow_before and not (limit is not None and limit.unit in ("h", "m")):
        before = _subtract(get_calendar(), due, Duration.parse(rule.yellow_before))
        if start < before < point:
            point = before
    return point


def sign(session: Session, ticket: Ticket, actor: Actor) -> None:
    """签收. The lead unit's signature moves the ticket; co-units' signatures are recorded."""
    tu = _require_staff_of(ticket, actor)
    if tu.signed_at is not None:
        raise WorkflowError(f"贵单位已于 {tu.signed_at:%m-%d %H:%M} 签收工单 {ticket.number}，无需重复签收。")
    if tu.role == "lead":
        _check(ticket, "sign")
    elif ticket.status not in HANDLING_STATES | {"dispatched"}:
        raise IllegalTransition(ticket.number, ticket.status, "sign")
    at = now()
    tu.signed_at, tu.signed_by = at, actor.label
    if tu.role == "lead":
        ticket.signed_at, ticket.signed_by = at, actor.label
        late = ticket.sign_due is not None and at > ticket.sign_due
        _event(session, ticket, actor, "sign", "signed", unit=tu.unit_code, late=late, who=actor.name)
    else:
        _event(session, ticket, actor, "co_sign", None, unit=tu.unit_code, who=actor.name)


def request_return(
    session: Session, ticket: Ticket, actor: Actor, *, reason: str, suggestion: str | None = None
) -> TicketRequest:
    """申请退回: not this unit's duty or outside the hotline's scope; with reason and a suggestion."""
    _check(ticket, "request_return")
    tu = _require_staff_of(ticket, actor, lead_only=True)
    policy = policy_of(ticket)
    if not (reason or "").strip():
        raise WorkflowError("申请退回须注明退回理由和依据。")
    rule = policy.returns
    refusal = return_refusal(ticket)
    if refusal:
        raise WorkflowError(refusal)
    at = now()
    late = ticket.return_due is not None and at > ticket.return_due
    if late and rule.late == "refuse":
        raise WorkflowError(
            f"已超过退回时限（{rule.window.duration.zh()}，{rule.window.cite}），不能退回，请继续办理。"
        )
    if late:
        # 渠县 第十一条（二）: a late return is accepted for review but counts as overdue handling
        ticket.overdue = True
        ticket.overdue_count += 1
    req = TicketRequest(
        ticket_id=ticket.id,
        kind="return",
        unit_code=tu.unit_code,
        reason=reason.strip(),
        suggestion=(suggestion or "").strip() or None,
        late=late,
        prev_status=ticket.status,
        requested_by=actor.label,
        requested_at=at,
    )
    session.add(req)
    _event(
        session,
        ticket,
        actor,
        "request_return",
        "return_requested",
        reason=reason,
        late=late,
        suggestion=suggestion,
    )
    return req


def designated_final(ticket: Ticket) -> bool:
    """指定办理: once a unit has returned the ticket and the center has named the unit that handles it
    (coordination after a disputed duty), the policy may forbid returning it again (平利 第九条; 渠县 第十条
    "通过上述方式确定的主办单位和协办单位……不得退回"; 大连 第十五条 "指定的承办单位不得推诿")."""
    return policy_of(ticket).returns.designated_final and ticket.return_count > 0


def return_refusal(ticket: Ticket) -> str | None:
    """Why the lead unit may not ask to return the ticket again, in Chinese; None when it may (the
    return window is checked when the request is made)."""
    rule = policy_of(ticket).returns
    if rule.max_count is not None and ticket.return_count >= rule.max_count:
        return f"该工单已退回 {ticket.return_count} 次，不能再退回（{rule.cite}）。"
    if designated_final(ticket):
        return (
            f"工单 {ticket.number} 是热线中心在退回后协调指定贵单位办理的，指定的承办单位不得再退回，"
            f"请继续办理（{rule.cite}）。"
        )
    return None


def extension_refusal(ticket: Ticket) -> str | None:
    """Why the ticket may get no (further) extension under its policy, in Chinese; None when it may."""
    rule = policy_of(ticket).extension
    if ticket.type in rule.not_for:
        return f"{TYPE_ZH[ticket.type]}类工单不予延期（{rule.cite}）。"
    if rule.not_for_urgent and ticket.urgent:
        return f"突发（紧急）类工单不予延期，请按紧急时限办结（{rule.cite}）。"
    if ticket.extension_count >= rule.max_count:
        return f"该工单已延期 {ticket.extension_count} 次，已达上限（{rule.cite}）。"
    return None


def pending_request(session: Session, ticket: Ticket, kind: str) -> TicketRequest | None:
    """The newest undecided return/extension/appeal request of a ticket, if any."""
    return session.scalars(
        select(TicketRequest)
        .where(
            TicketRequest.ticket_id == ticket.id,
            TicketRequest.kind == kind,
            TicketRequest.decision == "pending",
        )
        .order_by(TicketRequest.id.desc())
    ).first()


def _pending_request(session: Session, ticket: Ticket, kind: str) -> TicketRequest:
    req = pending_request(session, ticket, kind)
    if req is None:
        raise NotFound(f"工单 {ticket.number} 没有待审核的申请。")
    return req


def decide_return(
    session: Session,
    ticket: Ticket,
    actor: Actor,
    *,
    approve: bool,
    note: str = "",
    new_lead: str | None = None,
    co: Iterable[str] = (),
) -> None:
    """The center decides a return: re-dispatch (to ``new_lead``), back to the center's queue, or refuse."""
    _check(ticket, "decide_return")
    _require_center(actor)
    if not approve and not note.strip():
        raise WorkflowError("不同意退回须说明理由。")
    req = _pending_request(session, ticket, "return")
    req.decision = "approved" if approve else "refused"
    req.decided_by, req.decided_at, req.decision_note = actor.label, now(), note
    if not approve:
        _event(session, ticket, actor, "return_refused", req.prev_status, note=note)
        return
    ticket.return_count += 1
    _event(session, ticket, actor, "return_approved", "triaged", note=note, from_unit=req.unit_code)
    if new_lead:
        dispatch(session, ticket, actor, lead=new_lead, co=co)


def request_extension(
    session: Session, ticket: Ticket, actor: Actor, *, reason: str, new_due: datetime
) -> TicketRequest:
    """申请延期 within the policy's count and length limits."""
    _check(ticket, "request_extension")
    tu = _require_staff_of(ticket, actor, lead_only=True)
    policy = policy_of(ticket)
    rule = policy.extension
    cal = get_calendar()
    at = now()
    if not (reason or "").strip():
        raise WorkflowError("申请延期须说明理由。")
    refusal = extension_refusal(ticket)
    if refusal:
        raise WorkflowError(refusal)
    if (
        rule.needs_leader_from
        and ticket.extension_count + 1 >= rule.needs_leader_from
        and actor.role != "leader"
    ):
        raise PermissionDenied(f"第 {ticket.extension_count + 1} 次延期须由单位负责人申请（{rule.cite}）。")
    due = ticket.finish_due
    if due is None:
        raise WorkflowError("该工单没有办理时限，无需延期。")
    latest_ask = due
    if rule.request_before_expiry:
        before = Duration.parse(rule.request_before_expiry)
        latest_ask = _subtract(cal, due, before)
    if at > latest_ask:
        raise WorkflowError(
            "延期须在办理时限到期前提出"
            + (
                f"（至少提前{Duration.parse(rule.request_before_expiry).zh()}）"
                if rule.request_before_expiry
                else ""
            )
            + f"，本工单时限为 {due:%Y-%m-%d %H:%M}（{rule.cite}）。"
        )
    if new_due.tzinfo is None:
        new_due = new_due.replace(tzinfo=due.tzinfo)
    if new_due <= due:
        raise WorkflowError(f"延期后的时限须晚于现时限 {due:%Y-%m-%d %H:%M}。")
    caps: list[tuple[datetime, str]] = []
    if rule.max_each:
        caps.append((cal.add(due, rule.max_each), f"每次延期不超过{Duration.parse(rule.max_each).zh()}"))
    if rule.same_as_limit and ticket.type:
        lim = policy.limit_for(ticket.type)
        caps.append((cal.add(due, lim), f"每次延期不超过原办理时限{lim.zh()}"))
    if rule.max_total:
        base = ticket.base_finish_due or due
        caps.append((cal.add(base, rule.max_total), f"延期累计不超过{Duration.parse(rule.max_total).zh()}"))
    for cap, text in caps:
        if new_due > cap:
            raise WorkflowError(f"{text}，最晚可延至 {cap:%Y-%m-%d %H:%M}（{rule.cite}）。")
    req = TicketRequest(
        ticket_id=ticket.id,
        kind="extension",
        unit_code=tu.unit_code,
        reason=reason.strip(),
        new_due=new_due,
        prev_status=ticket.status,
        requested_by=actor.label,
        requested_at=at,
    )
    session.add(req)
    _event(session, ticket, actor, "request_extension", "extension_requested", reason=reason, new_due=new_due)
    return req


def _subtract(cal, due: datetime, d: Duration) -> datetime:
    if d.unit == "wd":
        t = due
        for _ in range(int(d.amount)):
            t -= timedelta(days=1)
            while not cal.is_workday(t.date()):
                t -= timedelta(days=1)
        return t
    return due - (cal.add(due, d) - due)


def decide_extension(
    session: Session, ticket: Ticket, actor: Actor, *, approve: bool, note: str = ""
) -> None:
    _check(ticket, "decide_extension")
    _require_center(actor)
    if not approve and not note.strip():
        raise WorkflowError("不同意延期须说明理由。")
    req = _pending_request(session, ticket, "extension")
    req.decision = "approved" if approve else "refused"
    req.decided_by, req.decided_at, req.decision_note = actor.label, now(), note
    if approve:
        old = ticket.finish_due
        ticket.finish_due = req.new_due
        ticket.extension_count += 1
        ticket.yellow_at = warning_point(policy_of(ticket), now(), req.new_due)  # scheduler (issue 7)
        _event(
            session,
            ticket,
            actor,
            "extension_approved",
            req.prev_status,
            old_due=old,
            new_due=req.new_due,
            note=note,
        )
    else:
        _event(session, ticket, actor, "extension_refused", req.prev_status, note=note)


REPLY_FIELDS_ZH = {
    "unit": "承办单位",
    "handler": "经办人",
    "phone": "联系电话",
    "result": "办理结果",
    "basis": "法律法规或政策依据",
}


def submit_contribution(session: Session, ticket: Ticket, actor: Actor, *, text: str) -> None:
    """A co-handling unit submits its part to the lead unit (渠县 第十条: the lead answers for all)."""
    tu = _require_staff_of(ticket, actor)
    if tu.role != "co":
        raise WorkflowError("主办单位请直接提交办结答复。")
    if ticket.status not in HANDLING_STATES | {"dispatched"}:
        raise IllegalTransition(ticket.number, ticket.status, "submit_reply")
    if not (text or "").strip():
        raise WorkflowError("协办意见为空。")
    tu.contribution = text.strip()
    _event(session, ticket, actor, "co_reply", None, unit=tu.unit_code, text=text.strip()[:4000])


def submit_reply(
    session: Session,
    ticket: Ticket,
    actor: Actor,
    *,
    result: str,
    basis: str,
    handler: str,
    phone: str,
    terminal: bool = False,
) -> TicketReply:
    """提交办结. A reply names the handling unit, the handler, a contact phone, the result and its basis
    (宿州 工作规范 on reply quality); an incomplete one is refused with the missing items listed."""
    _check(ticket, "submit_reply")
    tu = _require_staff_of(ticket, actor, lead_only=True)
    values = {"unit": tu.unit_code, "handler": handler, "phone": phone, "result": result, "basis": basis}
    missing = [REPLY_FIELDS_ZH[k] for k, v in values.items() if not (v or "").strip()]
    if phone and phone.strip() and not _PHONE_OK.match(phone.strip()):
        missing.append("有效的联系电话")
    if result and 0 < len(result.strip()) < 10:
        missing.append("具体的办理结果（不少于10个字）")
    if missing:
        raise IncompleteReply(missing)
    reply = TicketReply(
        ticket_id=ticket.id,
        unit_code=tu.unit_code,
        handler=handler.strip(),
        phone=phone.strip(),
        result=result.strip(),
        basis=basis.strip(),
        terminal=terminal,
        submitted_by=actor.label,
        submitted_at=now(),
    )
    session.add(reply)
    late = ticket.finish_due is not None and now() > ticket.finish_due
    _event(
        session,
        ticket,
        actor,
        "submit_reply",
        "reply_submitted",
        terminal=terminal,
        late=late,
        prev=ticket.status,
    )
    return reply


def latest_reply(session: Session, ticket: Ticket) -> TicketReply | None:
    return session.scalars(
        select(TicketReply).where(TicketReply.ticket_id == ticket.id).order_by(TicketReply.id.desc())
    ).first()


def review_reply(session: Session, ticket: Ticket, actor: Actor, *, approve: bool, note: str = "") -> None:
    """The center reviews a reply: approve (the citizen gets it and the survey) or send it back."""
    _check(ticket, "review_reply")
    _require_center(actor)
    if not approve and not note.strip():
        raise WorkflowError("退回办结答复须说明理由。")
    reply = latest_reply(session, ticket)
    if reply is None:
        raise NotFound(f"工单 {ticket.number} 没有待审核的办结答复。")
    reply.review = "approved" if approve else "refused"
    reply.reviewed_by, reply.reviewed_at, reply.review_note = actor.label, now(), note
    back_to = "redo" if ticket.redo_count > 0 else "signed"
    if not approve:
        _event(session, ticket, actor, "reply_refused", back_to, note=note)
        return
    policy = policy_of(ticket)
    at = now()
    ticket.replied_at = at
    ticket.terminal = ticket.terminal or reply.terminal
    ticket.survey_due = get_calendar().add(at, policy.survey.window)
    _event(
        session,
        ticket,
        actor,
        "reply_approved",
        "replied",
        note=note,
        survey_due=ticket.survey_due,
        terminal=reply.terminal,
    )


# --------------------------------------------------------------------------- revisit, redo, appeal


def rate(session: Session, ticket: Ticket, actor: Actor, *, value: str, comment: str | None = None) -> str:
    """回访评价. Returns what happened: ``archived``, ``redo`` or the policy's second-unsatisfied action."""
    _check(ticket, "rate")
    if value not in ("satisfied", "basic", "unsatisfied"):
        raise WorkflowError("评价只能是 满意、基本满意 或 不满意。")
    if value == "unsatisfied" and not (comment or "").strip():
        raise WorkflowError("请告诉我们不满意的原因，以便承办单位重新办理。")
    policy = policy_of(ticket)
    at = now()
    rnd = ticket.redo_count + 1
    session.add(Rating(ticket_id=ticket.id, round=rnd, value=value, comment=comment, rated_at=at))
    if policy.appeal.allowed and value == "unsatisfied" and policy.appeal.window:
        ticket.appeal_due = get_calendar().add(at, policy.appeal.window)
    if value != "unsatisfied":
        ticket.final_rating = value
        ticket.closed_at = at
        _event(session, ticket, actor, "rate", "archived", value=value, round=rnd, comment=comment)
        return "archived"
    if ticket.redo_count < policy.redo.max_count and not ticket.terminal:
        ticket.redo_count += 1
        limit = Duration.parse(policy.redo.limit) if policy.redo.limit else policy.limit_for(ticket.type)
        ticket.finish_due = get_calendar().add(at, limit)
        ticket.base_finish_due = ticket.finish_due
        ticket.yellow_at = warning_point(policy, at, ticket.finish_due, limit)  # scheduler (issue 7)
        ticket.survey_due = None
        _event(
            session,
            ticket,
            actor,
            "rate",
            "redo",
            value=value,
            round=rnd,
            comment=comment,
            finish_due=ticket.finish_due,
            basis=policy.redo.cite,
        )
        return "redo"
    action = policy.redo.second_unsatisfied
    ticket.final_rating = "unsatisfied"
    ticket.closed_at = at
    if action in ("manual_revisit", "supervise", "rectify"):
        ticket.supervised = True
    _event(
        session,
        ticket,
        actor,
        "rate",
        "archived",
        value=value,
        round=rnd,
        comment=comment,
        then=action,
        basis=policy.redo.cite,
    )
    return action


def expire_survey(session: Session, ticket: Ticket, actor: Actor = SYSTEM) -> None:
    """No answer within the survey window: archived as "no rating", never counted as satisfied."""
    _check(ticket, "archive")
    at = now()
    session.add(Rating(ticket_id=ticket.id, round=ticket.redo_count + 1, value="none", rated_at=at))
    ticket.final_rating = "none"
    ticket.closed_at = at
    _event(session, ticket, actor, "survey_expired", "archived")


def _latest_unsatisfied(session: Session, ticket: Ticket) -> Rating:
    rating = session.scalars(
        select(Rating).where(Rating.ticket_id == ticket.id).order_by(Rating.round.desc())
    ).first()
    if rating is None or rating.value != "unsatisfied":
        raise WorkflowError(f"工单 {ticket.number} 没有不满意评价，无需甄别。")
    return rating


def request_appeal(session: Session, ticket: Ticket, actor: Actor, *, reason: str) -> TicketRequest:
    """甄别: the unit disputes an "unsatisfied" rating within the policy's window."""
    tu = _require_staff_of(ticket, actor, lead_only=True)
    policy = policy_of(ticket)
    if not policy.appeal.allowed:
        raise WorkflowError(f"本地政策未设甄别程序（{policy.appeal.cite}）。")
    rating = _latest_unsatisfied(session, ticket)
    if rating.appeal is not None:
        raise WorkflowError("该评价已申请过甄别。")
    if ticket.appeal_due is not None and now() > ticket.appeal_due:
        raise WorkflowError(
            f"已超过甄别申请时限 {ticket.appeal_due:%Y-%m-%d %H:%M}（{policy.appeal.cite}）。"
        )
    if not (reason or "").strip():
        raise WorkflowError("申请甄别须说明理由并提供佐证。")
    rating.appeal = "pending"
    req = TicketRequest(
        ticket_id=ticket.id,
        kind="appeal",
        unit_code=tu.unit_code,
        reason=reason.strip(),
        prev_status=ticket.status,
        requested_by=actor.label,
        requested_at=now(),
    )
    session.add(req)
    _event(session, ticket, actor, "appeal", None, reason=reason, round=rating.round)
    return req


def decide_appeal(session: Session, ticket: Ticket, actor: Actor, *, approve: bool, note: str = "") -> None:
    """Upheld: the rating no longer counts against the unit (and a pending redo is closed)."""
    _require_center(actor)
    req = _pending_request(session, ticket, "appeal")
    rating = _latest_unsatisfied(session, ticket)
    req.decision = "approved" if approve else "refused"
    req.decided_by, req.decided_at, req.decision_note = actor.label, now(), note
    rating.appeal = "upheld" if approve else "rejected"
    to = None
    if approve and ticket.status == "redo":
        to = "archived"
        ticket.closed_at = now()
        ticket.final_rating = "appeal_upheld"
    elif approve:
        ticket.final_rating = "appeal_upheld"
    _event(session, ticket, actor, "appeal_decided", to, approve=approve, note=note)


# --------------------------------------------------------------------------- supervision


def supervise(session: Session, ticket: Ticket, actor: Actor, *, note: str = "") -> None:
    """督办: flag the ticket for supervision (any open state)."""
    _check(ticket, "supervise")
    ticket.supervised = True
    _event(session, ticket, actor, "supervise", None, note=note)


def urge(session: Session, ticket: Ticket, actor: Actor, *, note: str = "") -> None:
    """催办: remind the unit; counted."""
    _check(ticket, "urge")
    ticket.urge_count += 1
    _event(session, ticket, actor, "urge", None, note=note, count=ticket.urge_count)


def mark_overdue(session: Session, ticket: Ticket, actor: Actor = SYSTEM, *, which: str = "finish") -> bool:
    """Flag a ticket overdue (once per deadline); returns False when it already was."""
    if ticket.overdue and which == "finish":
        return False
    ticket.overdue = True
    ticket.overdue_count += 1
    _event(session, ticket, actor, "overdue", None, which=which, count=ticket.overdue_count)
    return True


# --------------------------------------------------------------------------- repeat complaints


def _bigrams(text: str) -> set[str]:
    t = re.sub(r"\W", "", text)
    return {t[i : i + 2] for i in range(len(t) - 1)}


def text_overlap(a: str, b: str) -> float:
    """A plain lexical similarity (character bigram Jaccard) used when no embedding model is given."""
    x, y = _bigrams(a), _bigrams(b)
    return len(x & y) / len(x | y) if x and y else 0.0


def find_repeat(
    session: Session,
    ticket: Ticket,
    *,
    same_issue: Callable[[str, str], bool] | None = None,
) -> Ticket | None:
    """重复投诉 by the 宿迁 definition (宿政办发〔2020〕55号): the same citizen raises the same issue again
    within the policy's window after the earlier ticket closed, or raises it again while the earlier one
    has been open longer than the policy's ``unresolved_after``."""
    if ticket.citizen_id is None:
        return None
    policy = policy_of(ticket)
    cal = get_calendar()
    same = same_issue or (lambda a, b: text_overlap(a, b) >= 0.35)
    at = ticket.created_at or now()
    # earlier tickets only: the step's pending changes (to this ticket) need not be written first (issue 8)
    with session.no_autoflush:
        earlier = session.scalars(
            select(Ticket)
            .where(
                Ticket.citizen_id == ticket.citizen_id,
                Ticket.id != ticket.id,
                Ticket.status.notin_(("rejected", "redirected")),
            )
            .order_by(Ticket.id.desc())
            .limit(50)
        ).all()
    for old in earlier:
        if not same(ticket.original_text, old.original_text):
            continue
        if old.closed_at is not None and old.status in ("archived", "answered"):
            if at <= cal.add(old.closed_at, policy.repeat.after_close):
                return old
        elif policy.repeat.unresolved_after and at >= cal.add(old.created_at, policy.repeat.unresolved_after):
            return old
    return None


def flag_repeat(session: Session, ticket: Ticket, old: Ticket, actor: Actor = SYSTEM) -> None:
    ticket.repeat_of_id = old.id
    _event(session, ticket, actor, "repeat", None, of=old.number, basis=policy_of(ticket).repeat.cite)


# --------------------------------------------------------------------------- history


def history(session: Session, ticket: Ticket) -> list[TicketEvent]:
    return list(
        session.scalars(
            select(TicketEvent).where(TicketEvent.ticket_id == ticket.id).order_by(TicketEvent.id)
        )
    )


def replay_status(events: Iterable[TicketEvent]) -> str:
    """Rebuild a ticket's status from its event log alone (the log is the ticket's history)."""
    status = "received"
    for ev in events:
        if ev.from_status is not None and ev.from_status != status:
            raise WorkflowError(f"事件日志不连续：事件 {ev.id} 起始状态 {ev.from_status}，应为 {status}")
        status = ev.to_status or status
    return status


def describe_status(ticket: Ticket) -> str:
    return STATUS_ZH.get(ticket.status, ticket.status)
