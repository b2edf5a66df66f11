"""The hotline center's group: confirming triage, deciding returns, extensions, replies and appeals,
supervision, the queue and the day's numbers. Called from ``bot.staff.handle_group``.

Every decision is a workflow step (models/workflow.py) and notifies the right chats through the outbox:
the unit gets its card or a notice, the citizen hears progress (dispatch, an approved extension with the new
date, the approved reply followed by the revisit survey), and the center's own card is edited in place.
"""

from __future__ import annotations

from datetime import datetime, time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot import staff_texts as tx
from bot import texts as citizen_texts
from bot.citizen import survey_message
from bot.messages import Button, Reply
from bot.outbox import notify_citizen, notify_unit
from bot.staff import (
    GroupCtx,
    Refusal,
    _fmt,
    center_view,
    pending_request,
    refresh_cards,
    send_unit_cards,
    stale,
    tell_citizen,
    tell_unit,
    unit_name,
    unit_view,
)
from models.catalog import CENTER, unit_codes
from models.clock import CHINA_TZ, now
from models.errors import NotFound
from models.privacy import mask_text
from models.states import ALLOWED, HANDLING_STATES
from models.tables import Rating, Ticket, TicketEvent, TicketRequest, Unit
from models.workflow import (
    TYPE_ZH,
    Actor,
    add_co_units,
    decide_appeal,
    decide_extension,
    decide_return,
    dispatch,
    get_ticket,
    latest_reply,
    policy_of,
    reject,
    retype,
    review_reply,
    supervise,
)
from triage.similar import followers

PAGE_SIZE = 10  # units per page of the picker: 2 per row, 5 rows
MENU = "m"  # last part of a button that sits on a menu message (the menu is replaced by the result)

EXCLUSION_ZH = {
    "litigation": "须诉讼解决",
    "arbitration": "须仲裁解决",
    "reconsideration": "须行政复议",
    "info_disclosure": "政府信息公开",
    "petition": "已进入信访",
    "discipline": "纪检监察事项",
    "court_procuratorate": "法院检察院事项",
    "npc_cppcc": "人大政协事项",
    "party_committee": "党委部门事项",
    "secrets": "涉及国家或商业秘密",
    "privacy": "涉及他人隐私",
    "public_order": "违反公序良俗",
    "handled": "已终结办理",
    "military": "军队武警事项",
    "abuse": "恶意攻击骚扰",
    "no_content": "无实质内容",
    "illegal_request": "诉求违法",
    "out_of_jurisdiction": "不属本地管辖",
    "over_two_years": "超过两年",
    "mediated_consumer": "消费纠纷已调解",
    "no_legal_basis": "无法律政策依据",
    "no_real_name": "未实名无法核实",
    "unverifiable": "无法核实",
    "private_matter": "私人民事纠纷",
    "incomplete": "要素不全",
}


def _menu_reply(ctx: GroupCtx, text: str, extra: list[str]) -> Reply:
    """The result of a menu choice replaces the menu (so its buttons disappear)."""
    reply = Reply(text)
    if extra and extra[-1] == MENU and ctx.msg.callback_message_id:
        reply.edit_message_id = ctx.msg.callback_message_id
    return reply


# --------------------------------------------------------------------------- buttons


def button(ctx: GroupCtx, action: str, ticket: Ticket, extra: list[str]) -> list[Reply]:
    handler = _BUTTONS.get(action)
    if handler is None:
        raise Refusal(tx.STALE_GENERIC)
    return handler(ctx, ticket, extra)


def _unit_arg(ctx: GroupCtx, extra: list[str]) -> Unit:
    code = extra[0] if extra else ""
    unit = ctx.session.get(Unit, code) if code else None
    if unit is None or not unit.active or unit.code == CENTER:
        raise Refusal(tx.STALE_GENERIC)
    return unit


def _dispatch(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """Confirm the triage: dispatch to the chosen unit (starts every clock)."""
    if ticket.status not in ALLOWED["dispatch"]:
        raise stale(ticket)
    unit = _unit_arg(ctx, extra)
    s = ctx.session
    dispatch(s, ticket, ctx.actor, lead=unit.code)
    send_unit_cards(s, ticket)
    tell_citizen(
        s,
        ticket,
        tx.CITIZEN_DISPATCHED.format(number=ticket.number, unit=unit.name, due=_fmt(ticket.finish_due)),
    )
    refresh_cards(s, ticket)
    return [_menu_reply(ctx, f"✅ 工单 {ticket.number} 已派给{unit.name}（{ctx.name}）。", extra)]


def _type_menu(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    if ticket.status not in ALLOWED["dispatch"]:
        raise stale(ticket)
    rows = [
        [Button(zh, f"c:settype:{ticket.id}:{t}:{MENU}") for t, zh in list(TYPE_ZH.items())[i : i + 3]]
        for i in (0, 3)
    ]
    return [Reply(tx.PICK_TYPE.format(number=ticket.number), buttons=rows)]


def _set_type(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """改类型 before dispatch; the limits follow the new type when the ticket is dispatched.

    Recorded as a ``retype`` audit event (no status change)."""
    if ticket.status not in ALLOWED["dispatch"]:
        raise stale(ticket)
    new = extra[0] if extra else ""
    if new not in TYPE_ZH:
        raise Refusal(tx.STALE_GENERIC)
    retype(ctx.session, ticket, ctx.actor, type=new)
    refresh_cards(ctx.session, ticket)
    return [
        _menu_reply(
            ctx, f"工单 {ticket.number} 的类型已改为“{TYPE_ZH[new]}”，请在卡片上选择承办单位派单。", extra
        )
    ]


def _unit_choices(ctx: GroupCtx, exclude: set[str]) -> list[Unit]:
    order = {code: i for i, code in enumerate(unit_codes())}
    units = ctx.session.scalars(select(Unit).where(Unit.code != CENTER, Unit.active.is_(True))).all()
    return sorted((u for u in units if u.code not in exclude), key=lambda u: (order.get(u.code, 999), u.code))


def _pick(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """The unit catalog in pages of buttons: dispatch (triage) or re-dispatch (approved return)."""
    if ticket.status in ALLOWED["dispatch"]:
        action, exclude = "disp", set()
    elif ticket.status == "return_requested":
        req = pending_request(ctx.session, ticket, "return")
        action, exclude = "retto", {req.unit_code} if req else set()
    else:
        raise stale(ticket)
    return [_picker(ctx, ticket, _unit_choices(ctx, exclude), action, "pick", extra, tx.PICK_UNIT)]


def _picker(
    ctx: GroupCtx,
    ticket: Ticket,
    units: list[Unit],
    action: str,
    nav_action: str,
    extra: list[str],
    title: str,
) -> Reply:
    """Units as buttons ``c:<action>:<ticket>:<unit>:m``, two a row, with ``c:<nav_action>`` page turns."""
    pages = max(1, -(-len(units) // PAGE_SIZE))
    try:
        page = min(max(1, int(extra[0])), pages) if extra else 1
    except ValueError:
        page = 1
    chunk = units[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    rows = [
        [Button(u.name, f"c:{action}:{ticket.id}:{u.code}:{MENU}") for u in chunk[i : i + 2]]
        for i in range(0, len(chunk), 2)
    ]
    nav = []
    if page > 1:
        nav.append(Button("⬅️ 上一页", f"c:{nav_action}:{ticket.id}:{page - 1}"))
    if page < pages:
        nav.append(Button("下一页 ➡️", f"c:{nav_action}:{ticket.id}:{page + 1}"))
    if nav:
        rows.append(nav)
    reply = Reply(title.format(number=ticket.number, page=page, pages=pages), buttons=rows)
    if extra and ctx.msg.callback_message_id:  # turning a page edits the picker in place
        reply.edit_message_id = ctx.msg.callback_message_id
    return reply


# --------------------------------------------------------------------------- co-handling units (协办)


def add_co_handling(session: Session, ticket: Ticket, actor: Actor, units: list[str]) -> list[str]:
    """The center adds co-handling units to a ticket the lead unit works on (渠府办〔2023〕66号 第十条: the
    center names the lead and the co-handling units; the lead answers for all). Each new unit's group gets
    the card, the lead unit is told, every card of the ticket is brought up to date. Returns the codes
    added; raises ``WorkflowError`` (Chinese) when none can be."""
    added = add_co_units(session, ticket, actor, units=units)
    names = "、".join(unit_name(session, c) for c in added)
    lead = unit_name(session, ticket.lead_unit)
    refresh_cards(session, ticket)  # first, so the new cards keep their headline
    for code in added:
        notify_unit(
            session,
            code,
            unit_view(session, ticket, code, headline=tx.CO_ADDED_CARD.format(lead=lead)),
            ticket_id=ticket.id,
            kind="card",
            dedupe_key=f"co:{ticket.id}:{code}",
        )
    tell_unit(session, ticket.lead_unit, tx.UNIT_CO_ADDED.format(number=ticket.number, units=names), ticket)
    return added


def _co_pick(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """添加协办: the units not yet on the ticket, in pages of buttons."""
    if ticket.status not in ALLOWED["add_co"]:
        raise stale(ticket)
    on_ticket = {tu.unit_code for tu in ticket.units}
    return [_picker(ctx, ticket, _unit_choices(ctx, on_ticket), "coadd", "copick", extra, tx.PICK_CO_UNIT)]


def _co_add(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    if ticket.status not in ALLOWED["add_co"]:
        raise stale(ticket)
    unit = _unit_arg(ctx, extra)
    if any(tu.unit_code == unit.code for tu in ticket.units):
        raise Refusal(f"{unit.name}已在办理工单 {ticket.number}，无需重复添加。")
    add_co_handling(ctx.session, ticket, ctx.actor, [unit.code])
    return [
        _menu_reply(
            ctx, f"✅ 已为工单 {ticket.number} 添加协办单位{unit.name}（{ctx.name}），已通知主办单位。", extra
        )
    ]


def _return_to(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """Approve a return and re-dispatch to another unit in one step."""
    if ticket.status != "return_requested":
        raise stale(ticket)
    unit = _unit_arg(ctx, extra)
    s = ctx.session
    req = pending_request(s, ticket, "return")
    old = req.unit_code if req else None
    decide_return(s, ticket, ctx.actor, approve=True, note=f"同意退回，改派{unit.name}", new_lead=unit.code)
    send_unit_cards(s, ticket)
    tell_unit(
        s, old, tx.UNIT_RETURN_APPROVED.format(number=ticket.number, where=f"，已改派{unit.name}"), ticket
    )
    tell_citizen(
        s,
        ticket,
        tx.CITIZEN_REDISPATCHED.format(number=ticket.number, unit=unit.name, due=_fmt(ticket.finish_due)),
    )
    refresh_cards(s, ticket)
    return [_menu_reply(ctx, f"✅ 已同意退回，工单 {ticket.number} 改派{unit.name}。", extra)]


def _return_ok(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """Approve a return without naming a unit: the ticket comes back to the center to be dispatched."""
    if ticket.status != "return_requested":
        raise stale(ticket)
    s = ctx.session
    req = pending_request(s, ticket, "return")
    old = req.unit_code if req else None
    decide_return(s, ticket, ctx.actor, approve=True, note="同意退回")
    tell_unit(
        s, old, tx.UNIT_RETURN_APPROVED.format(number=ticket.number, where="，工单已收回热线中心"), ticket
    )
    refresh_cards(s, ticket)
    return [Reply(f"✅ 已同意退回，工单 {ticket.number} 回到待派单，请在卡片上重新选择承办单位。")]


def _ext_ok(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    if ticket.status != "extension_requested":
        raise stale(ticket)
    s = ctx.session
    req = pending_request(s, ticket, "extension")
    decide_extension(s, ticket, ctx.actor, approve=True, note="同意延期")
    due = _fmt(ticket.finish_due)
    tell_unit(s, ticket.lead_unit, tx.UNIT_EXT_APPROVED.format(number=ticket.number, due=due), ticket)
    # 渠府办〔2023〕66号 第十一条（三）: the citizen is told about an approved extension
    reason = mask_text(req.reason)[:100] if req else "办理需要"
    tell_citizen(
        s, ticket, tx.CITIZEN_EXTENDED.format(number=ticket.number, reason=f"承办单位说明“{reason}”", due=due)
    )
    refresh_cards(s, ticket)
    return [Reply(f"✅ 已同意工单 {ticket.number} 延期至 {due}。")]


def _reply_ok(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    if ticket.status != "reply_submitted":
        raise stale(ticket)
    s = ctx.session
    review_reply(s, ticket, ctx.actor, approve=True, note="审核通过")
    reply = latest_reply(s, ticket)
    unit = unit_name(s, reply.unit_code if reply else ticket.lead_unit)
    text = reply.result if reply else ""
    if reply is not None:
        text += f"\n依据：{reply.basis}\n经办人：{reply.handler}　联系电话：{reply.phone}"
    notify_citizen(
        s,
        ticket.citizen_id,
        survey_message(ticket, text, unit),
        ticket_id=ticket.id,
        kind="survey",
        dedupe_key=f"survey:{ticket.id}:{ticket.redo_count}",
    )
    for citizen_id in followers(s, ticket):
        notify_citizen(
            s,
            citizen_id,
            Reply(f"您关注的工单 {ticket.number} 已有答复（{unit}）：\n{text}"),
            ticket_id=ticket.id,
            kind="progress",
            dedupe_key=f"follow:{ticket.id}:{ticket.redo_count}:{citizen_id}",
        )
    tell_unit(s, ticket.lead_unit, tx.UNIT_REPLY_APPROVED.format(number=ticket.number), ticket)
    refresh_cards(s, ticket)
    return [Reply(f"✅ 工单 {ticket.number} 的答复已审核通过，已发送诉求人并开始回访。")]


def _appeal_ok(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    if pending_request(ctx.session, ticket, "appeal") is None:
        raise stale(ticket)
    decide_appeal(ctx.session, ticket, ctx.actor, approve=True, note="甄别成立")
    tell_unit(
        ctx.session,
        ticket.lead_unit,
        tx.UNIT_APPEAL_DECIDED.format(number=ticket.number, result="成立", note="该不满意评价不计入考核。"),
        ticket,
    )
    refresh_cards(ctx.session, ticket)
    return [Reply(f"✅ 工单 {ticket.number} 甄别成立。")]


_REFUSABLE = {
    "retno": ("return", lambda s, t: t.status == "return_requested"),
    "extno": ("extension", lambda s, t: t.status == "extension_requested"),
    "repno": ("reply", lambda s, t: t.status == "reply_submitted"),
    "appno": ("appeal", lambda s, t: pending_request(s, t, "appeal") is not None),
}


def _ask_refusal_reason(ctx: GroupCtx, ticket: Ticket, action: str) -> list[Reply]:
    kind, still_open = _REFUSABLE[action]
    if not still_open(ctx.session, ticket):
        raise stale(ticket)
    ctx.st.start("c_refuse", kind=kind, tid=ticket.id, number=ticket.number)
    return [Reply(f"工单 {ticket.number}：" + tx.ASK_REFUSE_REASON[kind].format(who=ctx.name))]


def _reject_menu(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    if ticket.status not in ALLOWED["reject"]:
        raise stale(ticket)
    policy = policy_of(ticket)
    buttons = [
        Button(EXCLUSION_ZH.get(ex.key, ex.key), f"c:rj:{ticket.id}:{ex.key}:{MENU}")
        for ex in policy.exclusions
    ]
    rows = [buttons[i : i + 2] for i in range(0, len(buttons), 2)]
    return [Reply(tx.PICK_REJECT.format(number=ticket.number, document=policy.document), buttons=rows)]


def _reject(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    """不予受理 with one of the policy's exclusions: the citizen hears why, the basis and where to go."""
    if ticket.status not in ALLOWED["reject"]:
        raise stale(ticket)
    key = extra[0] if extra else ""
    if not key or policy_of(ticket).exclusion(key) is None:
        raise Refusal(tx.STALE_GENERIC)
    told = reject(ctx.session, ticket, ctx.actor, key=key)
    tell_citizen(
        ctx.session,
        ticket,
        f"工单 {ticket.number}：" + citizen_texts.rejected(told["wording"], told["go_to"], told["basis"]),
    )
    refresh_cards(ctx.session, ticket)
    return [
        _menu_reply(
            ctx, f"工单 {ticket.number} 已不予受理（{EXCLUSION_ZH.get(key, key)}），已告知诉求人。", extra
        )
    ]


def _show(ctx: GroupCtx, ticket: Ticket, extra: list[str]) -> list[Reply]:
    return [center_view(ctx.session, ticket)]


_BUTTONS = {
    "disp": _dispatch,
    "type": _type_menu,
    "settype": _set_type,
    "pick": _pick,
    "retto": _return_to,
    "retok": _return_ok,
    "extok": _ext_ok,
    "repok": _reply_ok,
    "appok": _appeal_ok,
    "reject": _reject_menu,
    "rj": _reject,
    "show": _show,
    "copick": _co_pick,
    "coadd": _co_add,
    **{a: (lambda action: lambda ctx, t, extra: _ask_refusal_reason(ctx, t, action))(a) for a in _REFUSABLE},
}


# --------------------------------------------------------------------------- typed reasons


def flow_text(ctx: GroupCtx, text: str) -> list[Reply]:
    if ctx.st.state != "c_refuse":
        ctx.st.reset()
        return []
    d = ctx.st.data
    s = ctx.session
    ticket = s.get(Ticket, d.get("tid"), with_for_update=True)
    if ticket is None:
        ctx.st.reset()
        raise Refusal(tx.STALE_GENERIC)
    kind = d.get("kind")
    note = text.strip()
    if kind == "return":
        decide_return(s, ticket, ctx.actor, approve=False, note=note)
        tell_unit(s, ticket.lead_unit, tx.UNIT_RETURN_REFUSED.format(number=ticket.number, note=note), ticket)
    elif kind == "extension":
        decide_extension(s, ticket, ctx.actor, approve=False, note=note)
        tell_unit(
            s,
            ticket.lead_unit,
            tx.UNIT_EXT_REFUSED.format(number=ticket.number, note=note, due=_fmt(ticket.finish_due)),
            ticket,
        )
    elif kind == "reply":
        review_reply(s, ticket, ctx.actor, approve=False, note=note)
        tell_unit(s, ticket.lead_unit, tx.UNIT_REPLY_REFUSED.format(number=ticket.number, note=note), ticket)
    elif kind == "appeal":
        decide_appeal(s, ticket, ctx.actor, approve=False, note=note)
        tell_unit(
            s,
            ticket.lead_unit,
            tx.UNIT_APPEAL_DECIDED.format(number=ticket.number, result="不成立", note=f"理由：{note}"),
            ticket,
        )
    else:
        ctx.st.reset()
        return []
    ctx.st.reset()
    refresh_cards(s, ticket)
    return [Reply(f"已处理工单 {ticket.number}：不同意，理由已告知承办单位。")]


# --------------------------------------------------------------------------- commands


def command(ctx: GroupCtx, name: str, args: str) -> list[Reply]:
    if name == "supervise":
        return _supervise(ctx, args)
    if name == "stats":
        return [Reply(day_stats(ctx))]
    if name == "queue":
        return _queue(ctx)
    raise Refusal(tx.UNKNOWN_COMMAND)


def _supervise(ctx: GroupCtx, args: str) -> list[Reply]:
    number, _, note = args.partition(" ")
    if not number:
        raise Refusal(tx.ASK_NUMBER.format(command="supervise"))
    try:
        ticket = get_ticket(ctx.session, number, for_update=True)
    except NotFound:
        raise Refusal(tx.TICKET_NOT_FOUND.format(number=number[:30])) from None
    note = note.strip()
    supervise(ctx.session, ticket, ctx.actor, note=note)
    text = tx.UNIT_SUPERVISED.format(number=ticket.number, note=f"，督办意见：{note}" if note else "")
    for tu in ticket.units:
        tell_unit(ctx.session, tu.unit_code, text, ticket)
    refresh_cards(ctx.session, ticket)
    return [Reply(f"✅ 已督办工单 {ticket.number}，已通知承办单位。")]


def _today_start() -> datetime:
    return datetime.combine(now().astimezone(CHINA_TZ).date(), time(0), tzinfo=CHINA_TZ)


def day_stats(ctx: GroupCtx) -> str:
    """Today's numbers for the center (China time, from midnight)."""
    s = ctx.session
    start = _today_start()

    def events(action: str) -> int:
        return (
            s.scalar(
                select(func.count(TicketEvent.id)).where(
                    TicketEvent.action == action, TicketEvent.at >= start
                )
            )
            or 0
        )

    received = s.scalar(select(func.count(Ticket.id)).where(Ticket.created_at >= start)) or 0
    at = now()
    open_states = tuple(HANDLING_STATES | {"dispatched"})
    overdue = (
        s.scalar(
            select(func.count(Ticket.id)).where(
                Ticket.status.in_(open_states), (Ticket.overdue.is_(True)) | (Ticket.finish_due < at)
            )
        )
        or 0
    )
    ratings = s.execute(
        select(Rating.value, func.count(Rating.id)).where(Rating.rated_at >= start).group_by(Rating.value)
    ).all()
    counts = dict(ratings)
    rated = sum(v for k, v in counts.items() if k != "none")
    good = counts.get("satisfied", 0) + counts.get("basic", 0)
    satisfaction = f"{good / rated:.0%}（{good}/{rated}）" if rated else "暂无评价"
    return "\n".join(
        [
            f"📊 今日统计（{start:%Y-%m-%d}，截至 {at:%H:%M}）",
            f"受理：{received}",
            f"派单：{events('dispatch')}",
            f"签收：{events('sign')}",
            f"答复（审核通过）：{events('reply_approved')}",
            f"在办超期：{overdue}",
            f"满意率：{satisfaction}；满意 {counts.get('satisfied', 0)}，基本满意 {counts.get('basic', 0)}，"
            f"不满意 {counts.get('unsatisfied', 0)}",
        ]
    )


_QUEUE_LABEL = {
    "triaged": "待确认分类派单",
    "return_requested": "退回申请",
    "extension_requested": "延期申请",
    "reply_submitted": "办结答复待审核",
}


def _queue(ctx: GroupCtx) -> list[Reply]:
    s = ctx.session
    waiting = list(
        s.scalars(select(Ticket).where(Ticket.status.in_(tuple(_QUEUE_LABEL))).order_by(Ticket.id))
    )
    appeal_ids = set(
        s.scalars(
            select(TicketRequest.ticket_id).where(
                TicketRequest.kind == "appeal", TicketRequest.decision == "pending"
            )
        )
    )
    waiting += [t for t in s.scalars(select(Ticket).where(Ticket.id.in_(appeal_ids))) if t not in waiting]
    if not waiting:
        return [Reply("热线中心当前没有待处理事项。")]
    lines = [f"热线中心待处理 {len(waiting)} 项："]
    buttons = []
    for t in waiting[:40]:
        label = _QUEUE_LABEL.get(t.status) or "甄别申请"
        if t.id in appeal_ids and t.status not in _QUEUE_LABEL:
            label = "甄别申请"
        lines.append(f"· {t.number} {label}｜{unit_name(s, t.lead_unit)}｜{mask_text(t.summary or '')[:20]}")
        if len(buttons) < 10:
            buttons.append([Button(f"处理 {t.number}", f"c:show:{t.id}")])
    return [Reply("\n".join(lines), buttons=buttons)]
