"""Ticket cards for the unit and center groups: the ticket at a glance, with the buttons of its step.

Button data is ``u:<action>:<ticket id>`` for units and ``c:<action>:<ticket id>`` for the center, so
a button that outlives its step is recognised by checking the ticket's current status.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.messages import Button, Reply
from models.privacy import contact_masked, mask_text
from models.states import STATUS_ZH
from models.tables import Attachment, Citizen, Ticket, TicketRequest, Unit
from models.workflow import TYPE_ZH, latest_reply, return_refusal


def _t(dt: datetime | None) -> str:
    return f"{dt:%m-%d %H:%M}" if dt else "—"


def _unit_name(session: Session, code: str | None) -> str:
    if not code:
        return "—"
    unit = session.get(Unit, code)
    return unit.name if unit else code


def ticket_summary(session: Session, ticket: Ticket, *, photos: int | None = None) -> list[str]:
    """The lines every card shares; the citizen's contact is masked. ``photos``: the number of the ticket's
    photos when the caller knows it (a ticket filed in this step), else counted."""
    citizen = session.get(Citizen, ticket.citizen_id) if ticket.citizen_id else None
    if photos is None:
        photos = session.scalar(
            select(func.count(Attachment.id)).where(Attachment.ticket_id == ticket.id, Attachment.kind == "photo")
        )
    flags = []
    if ticket.urgent:
        flags.append("🔴紧急")
    if ticket.supervised:
        flags.append("督办")
    if ticket.overdue:
        flags.append("已超期")
    if ticket.repeat_of_id:
        flags.append("重复诉求")
    lines = [
        f"【工单 {ticket.number}】{TYPE_ZH.get(ticket.type or '', '未分类')} {' '.join(flags)}".rstrip(),
        f"状态：{STATUS_ZH.get(ticket.status, ticket.status)}",
        f"主办：{_unit_name(session, ticket.lead_unit)}"
        + (
            f"；协办：{'、'.join(_unit_name(session, c) for c in ticket.co_units)}" if ticket.co_units else ""
        ),
        f"时限：签收 {_t(ticket.sign_due)}｜办结 {_t(ticket.finish_due)}"
        + (f"｜首次响应 {_t(ticket.respond_due)}" if ticket.respond_due else ""),
        f"时间：{ticket.ev_time or '—'}　地点：{ticket.ev_place or '—'}",
        f"诉求人：{contact_masked(citizen)}",
        f"内容：{mask_text(ticket.original_text)[:600]}",
    ]
    if photos:
        lines.append(f"附图：{photos}张（点“详情”查看）")
    return lines


def unit_card(
    session: Session, ticket: Ticket, unit_code: str, *, headline: str | None = None, photos: int | None = None
) -> Reply:
    """The card a unit's group sees, with the buttons of the ticket's current step."""
    lines = ([f"📌 {headline}"] if headline else []) + ticket_summary(session, ticket, photos=photos)
    role = next((tu.role for tu in ticket.units if tu.unit_code == unit_code), None)
    signed = next((tu.signed_at for tu in ticket.units if tu.unit_code == unit_code), None)
    if role == "co":
        lines.insert(0, "（贵单位为协办单位，请将办理意见提交主办单位）")
    tid = ticket.id
    rows: list[list[Button]] = []
    if ticket.status == "dispatched" or (role == "co" and signed is None and ticket.status != "archived"):
        first = [Button("签收", f"u:sign:{tid}")]
        # only the lead unit may ask to return it, and not when the center designated it (指定办理)
        if role == "lead" and return_refusal(ticket) is None:
            first.append(Button("申请退回", f"u:return:{tid}"))
        rows.append(first)
    elif ticket.status in ("signed", "redo"):
        if role == "lead":
            rows.append([Button("提交办结", f"u:reply:{tid}"), Button("申请延期", f"u:extend:{tid}")])
            if return_refusal(ticket) is None:
                rows.append([Button("申请退回", f"u:return:{tid}")])
        else:
            rows.append([Button("提交协办意见", f"u:co:{tid}")])
    rows.append([Button("详情", f"u:detail:{tid}"), Button("查看联系方式", f"u:contact:{tid}")])
    return Reply("\n".join(lines), buttons=rows)


def center_review_card(session: Session, ticket: Ticket, *, photos: int | None = None) -> Reply:
    """Low-confidence triage waiting for a person: confirm type and unit, reassign, or reject."""
    lines = ["🟡 待人工确认分类和承办单位", *ticket_summary(session, ticket, photos=photos)]
    suggested = [u for u in (ticket.suggested_units or []) if session.get(Unit, u) is not None]
    if ticket.triage_confidence is not None:
        lines.append(f"模型置信度：{ticket.triage_confidence:.2f}")
    lines.append("建议承办：" + ("、".join(_unit_name(session, u) for u in suggested[:3]) or "无"))
    tid = ticket.id
    rows = [[Button(f"派给{_unit_name(session, u)}", f"c:disp:{tid}:{u}") for u in suggested[:2]]]
    rows.append(
        [
            Button("改类型", f"c:type:{tid}"),
            Button("改派其他单位", f"c:pick:{tid}"),
            Button("不予受理", f"c:reject:{tid}"),
        ]
    )
    return Reply("\n".join(lines), buttons=[r for r in rows if r])


def center_request_card(session: Session, ticket: Ticket, req: TicketRequest) -> Reply:
    """A return or extension request for the center to decide."""
    kind = {"return": "退回申请", "extension": "延期申请", "appeal": "甄别申请"}[req.kind]
    lines = [f"🟠 {kind}：{_unit_name(session, req.unit_code)}", f"理由：{mask_text(req.reason)}"]
    if req.suggestion:
        lines.append(f"转送建议：{req.suggestion}")
    if req.new_due:
        lines.append(f"申请延至：{req.new_due:%Y-%m-%d %H:%M}（现时限 {_t(ticket.finish_due)}）")
    if req.late:
        lines.append("⚠️ 超过退回时限，按政策视为超期办理件")
    lines += ticket_summary(session, ticket)
    tid = ticket.id
    code = {"return": "ret", "extension": "ext", "appeal": "app"}[req.kind]
    rows = [[Button("同意", f"c:{code}ok:{tid}"), Button("不同意", f"c:{code}no:{tid}")]]
    if req.kind == "return":
        rows[0].append(Button("同意并改派", f"c:pick:{tid}"))
        rows.append([Button("添加协办", f"c:copick:{tid}")])
    return Reply("\n".join(lines), buttons=rows)


def center_reply_card(session: Session, ticket: Ticket) -> Reply:
    reply = latest_reply(session, ticket)
    lines = ["🟢 办结答复待审核"]
    if reply is not None:
        lines += [
            f"承办单位：{_unit_name(session, reply.unit_code)}　经办人：{reply.handler}　电话：{reply.phone}",
            f"办理结果：{reply.result}",
            f"依据：{reply.basis}",
        ]
        if reply.terminal:
            lines.append("（申请终结办理）")
    lines += ticket_summary(session, ticket)
    tid = ticket.id
    return Reply(
        "\n".join(lines),
        buttons=[[Button("审核通过", f"c:repok:{tid}"), Button("退回重办", f"c:repno:{tid}")]],
    )
