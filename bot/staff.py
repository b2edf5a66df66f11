"""The government side in group chats: each unit's group and the hotline center's group.

``handle_group(services, incoming) -> list[Reply]`` is a plain function (the Telegram handlers and the
tests call it). It returns what is said back in the chat the message came from; everything said to another
chat (the citizen, another unit, the center, a staff member's private chat) is queued in the outbox in the
same transaction as the change it reports.

Rules kept here:
- only registered staff of the group's unit may press buttons or use commands (bot/binding.py explains how
  people are registered); a button of the other side, a button for another unit's ticket, a button whose step
  has passed, or a command in the wrong chat is refused politely and the transaction is rolled back, so
  nothing changes;
- a multi-step answer (a reason, a date, a reply) is kept per person in the group (state key
  ``"<chat>:<user>"``), so two colleagues in one group never mix their answers;
- every card a group has seen is edited in place as the ticket moves (``refresh_cards``); the Telegram
  sender reports the message id of each card it delivers through ``record_card_message``;
- the citizen's full contact is revealed only to the staff member who asks, in their private chat, and the
  look is audited (渠府办〔2023〕66号 第十七条; 宿政办发〔2020〕55号 第十六条).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from bot import binding, staff_kb
from bot import staff_texts as tx
from bot.cards import center_reply_card, center_request_card, center_review_card, ticket_summary, unit_card
from bot.messages import Button, Incoming, Reply
from bot.outbox import enqueue, notify_citizen, notify_unit
from bot.services import Services
from bot.state import ChatState, load_state, save_state
from kb import store as kb_store
from models.catalog import CENTER
from models.clock import now
from models.db import conflict_insert
from models.errors import IllegalTransition, IncompleteReply, NotFound, PermissionDenied, WorkflowError
from models.privacy import contact_masked, mask_text, reveal_contact
from models.states import ALLOWED, HANDLING_STATES, STATUS_ZH
from models.tables import (
    Attachment,
    ChatBinding,
    Citizen,
    OutboxMessage,
    Rating,
    Staff,
    Ticket,
    TicketCard,
    TicketEvent,
    TicketUnit,
    Unit,
)
from models.workcalendar import get_calendar
from models.workflow import (
    RATING_ZH,
    TYPE_ZH,
    Actor,
    extension_refusal,
    get_ticket,
    latest_reply,
    pending_request,
    policy_of,
    request_appeal,
    request_extension,
    request_return,
    return_refusal,
    sign,
    submit_contribution,
    submit_reply,
)

log = logging.getLogger(__name__)

CARD_KINDS = ("card", "center_queue")  # outbox kinds whose rows are cards that may be edited later
UNIT_COMMANDS = frozenset({"pending", "appeal"})
CENTER_COMMANDS = frozenset({"supervise", "stats", "queue"})
SHARED_COMMANDS = frozenset({"help", "start", "cancel", "ticket", "kb", "invite"})
# states whose step can simply be answered again after a workflow error (a bad date, an incomplete reply)
RETRYABLE_STATES = frozenset({"ext_date", "reply", "kb_edit"})
# the unit is still expected to act on these (the /pending list)
PENDING_STATES = (
    "dispatched",
    "signed",
    "return_requested",
    "extension_requested",
    "reply_submitted",
    "redo",
)


class Refusal(Exception):
    """A polite refusal: shown as it is, and the whole step is rolled back."""


@dataclass
class GroupCtx:
    services: Services
    session: Session
    msg: Incoming
    binding: ChatBinding
    unit: Unit
    member: Staff | None
    st: ChatState

    @property
    def unit_code(self) -> str:
        return self.binding.unit_code

    @property
    def is_center(self) -> bool:
        return self.unit_code == CENTER

    @property
    def name(self) -> str:
        return tx.who(
            self.msg.display_name or (self.member.display_name if self.member else ""), self.msg.user_id
        )

    @property
    def actor(self) -> Actor:
        return Actor(
            "center" if self.is_center else "staff",
            str(self.msg.user_id),
            unit_code=self.unit_code,
            role=self.member.role if self.member else None,
            name=self.name,
        )

    def require_staff(self) -> Staff:
        if self.member is None:
            raise Refusal(tx.NOT_STAFF.format(unit=self.unit.name))
        return self.member


# --------------------------------------------------------------------------- entry point


def handle_group(services: Services, msg: Incoming) -> list[Reply]:
    """One thing a person did in a unit or center group (or /bind sent privately): one transaction."""
    with services.sessions() as session:
        try:
            replies = _handle(services, session, msg)
            session.commit()
        except BaseException:
            session.rollback()
            raise
    return replies


def command_name(command: str | None) -> str:
    """ "/Pending@hotline_bot" → "pending"."""
    return (command or "").lstrip("/").split("@", 1)[0].strip().lower()


def _handle(services: Services, session: Session, msg: Incoming) -> list[Reply]:
    command = command_name(msg.command)
    if msg.is_private:
        return [Reply(tx.BIND_PRIVATE if command in ("bind", "join") else tx.PRIVATE_GROUP_ONLY)]
    if command in ("bind", "join"):
        return binding.handle_bind(session, msg, command)
    try:
        chat_id = int(msg.chat_id)
    except ValueError:
        return [Reply(tx.NOT_BOUND)] if (command or msg.callback) else []
    bound = session.get(ChatBinding, chat_id)
    if bound is None:
        return [Reply(tx.NOT_BOUND)] if (command or msg.callback) else []
    key = f"{chat_id}:{msg.user_id}"
    st = load_state(session, msg.channel, key)
    before = (st.state, copy.deepcopy(st.data))
    ctx = GroupCtx(
        services,
        session,
        msg,
        bound,
        session.get(Unit, bound.unit_code),
        binding.staff_member(session, msg.user_id, bound.unit_code),
        st,
    )
    try:
        replies = _route(ctx)
    except Refusal as refusal:
        session.rollback()
        return [Reply(str(refusal))]
    except (WorkflowError, kb_store.KBError) as err:
        session.rollback()
        text = str(err)
        final = (
            IllegalTransition,
            PermissionDenied,
            NotFound,
            kb_store.KBNotFound,
            kb_store.KBPermissionError,
        )
        if ctx.st.state in RETRYABLE_STATES and not isinstance(err, final):
            text += tx.RETRY_HINT
        else:
            ctx.st.reset()
        replies = [Reply(text)]
    if (ctx.st.state, ctx.st.data) != before:
        save_state(session, msg.channel, key, ctx.st)
    return replies


def _route(ctx: GroupCtx) -> list[Reply]:
    msg = ctx.msg
    command = command_name(msg.command)
    if command:
        return _command(ctx, command, (msg.args or "").strip())
    if msg.callback:
        return _callback(ctx, msg.callback)
    if ctx.st.state == "idle":
        return []  # ordinary conversation between colleagues: not for the bot
    ctx.require_staff()
    text = (msg.text or msg.caption or "").strip()
    if not text:
        return [Reply(tx.TEXT_ONLY)]
    if ctx.st.state.startswith("kb_"):
        return staff_kb.kb_text(ctx, text)
    if ctx.is_center:
        from bot import center

        return center.flow_text(ctx, text)
    return _unit_text(ctx, text)


def _command(ctx: GroupCtx, command: str, args: str) -> list[Reply]:
    if command in ("help", "start"):
        return [Reply(tx.CENTER_HELP if ctx.is_center else tx.UNIT_HELP)]
    if command == "cancel":
        if ctx.st.state == "idle":
            return [Reply(tx.NOTHING_TO_CANCEL)]
        ctx.st.reset()
        return [Reply(tx.CANCELLED)]
    if command in UNIT_COMMANDS and ctx.is_center:
        raise Refusal(tx.UNIT_COMMAND_IN_CENTER.format(command=command))
    if command in CENTER_COMMANDS and not ctx.is_center:
        raise Refusal(tx.CENTER_COMMAND_IN_UNIT.format(command=command))
    if command not in UNIT_COMMANDS | CENTER_COMMANDS | SHARED_COMMANDS:
        return [Reply(tx.UNKNOWN_COMMAND)]
    member = ctx.require_staff()
    if command == "invite":
        return binding.handle_invite(ctx.session, ctx.msg, member, args)
    if command == "kb":
        return staff_kb.kb_command(ctx, args)
    if command == "ticket":
        return _ticket_command(ctx, args)
    if command == "pending":
        return _pending(ctx)
    if command == "appeal":
        ticket = _ticket_by_number(ctx, args, "appeal")
        return _start_appeal(ctx, ticket, _my_unit_on(ctx, ticket))
    from bot import center

    return center.command(ctx, command, args)


def _callback(ctx: GroupCtx, data: str) -> list[Reply]:
    parts = data.split(":")
    side = parts[0]
    if side == "u" and ctx.is_center:
        raise Refusal(tx.UNIT_BUTTON_IN_CENTER)
    if side == "c" and not ctx.is_center:
        raise Refusal(tx.CENTER_BUTTON_IN_UNIT)
    if side not in ("u", "c") or len(parts) < 3:
        raise Refusal(tx.STALE_GENERIC)
    ctx.require_staff()
    ticket = ticket_by_id(ctx.session, parts[2])
    if side == "c":
        from bot import center

        return center.button(ctx, parts[1], ticket, parts[3:])
    return _unit_button(ctx, parts[1], ticket)


# --------------------------------------------------------------------------- lookups and refusals


def ticket_by_id(session: Session, raw: str) -> Ticket:
    try:
        tid = int(raw)
    except ValueError:
        raise Refusal(tx.STALE_GENERIC) from None
    if not 0 < tid < 2**31:  # forged button data: out of any id column's range
        raise Refusal(tx.STALE_GENERIC)
    ticket = session.get(Ticket, tid, with_for_update=True)
    if ticket is None:
        raise Refusal(tx.STALE_GENERIC)
    return ticket


def _ticket_by_number(ctx: GroupCtx, args: str, command: str) -> Ticket:
    number = args.split()[0] if args.split() else ""
    if not number:
        raise Refusal(tx.ASK_NUMBER.format(command=command))
    try:
        return get_ticket(ctx.session, number, for_update=True)
    except NotFound:
        raise Refusal(tx.TICKET_NOT_FOUND.format(number=number[:30])) from None


def stale(ticket: Ticket) -> Refusal:
    return Refusal(tx.STALE.format(number=ticket.number, status=STATUS_ZH.get(ticket.status, ticket.status)))


def _my_unit_on(ctx: GroupCtx, ticket: Ticket) -> TicketUnit:
    for tu in ticket.units:
        if tu.unit_code == ctx.unit_code:
            return tu
    raise Refusal(tx.NOT_YOUR_TICKET.format(number=ticket.number, unit=ctx.unit.name))


def unit_name(session: Session, code: str | None) -> str:
    if not code:
        return "—"
    unit = session.get(Unit, code)
    return unit.name if unit else code


def _fmt(dt) -> str:
    return f"{dt:%Y-%m-%d %H:%M}" if dt else "—"


# --------------------------------------------------------------------------- cards and where they are


def appeal_open(session: Session, ticket: Ticket, unit_code: str) -> bool:
    """The lead unit may still ask the center to review an "unsatisfied" rating (甄别)."""
    if ticket.lead_unit != unit_code or not policy_of(ticket).appeal.allowed:
        return False
    rating = session.scalars(
        select(Rating).where(Rating.ticket_id == ticket.id).order_by(Rating.round.desc())
    ).first()
    if rating is None or rating.value != "unsatisfied" or rating.appeal is not None:
        return False
    return ticket.appeal_due is None or now() <= ticket.appeal_due


def unit_view(session: Session, ticket: Ticket, unit_code: str, *, headline: str | None = None) -> Reply:
    """A unit's card; a unit no longer on the ticket sees it without buttons."""
    if not any(tu.unit_code == unit_code for tu in ticket.units):
        lines = [
            f"📁 工单 {ticket.number} 已不由贵单位办理（已改派），以下仅供留档。",
            *ticket_summary(session, ticket),
        ]
        return Reply("\n".join(lines))
    card = unit_card(session, ticket, unit_code, headline=headline)
    if appeal_open(session, ticket, unit_code):
        card.buttons.insert(0, [Button("申请甄别", f"u:appeal:{ticket.id}")])
    return card


def _last_center_action(session: Session, ticket: Ticket) -> str:
    ev = session.scalars(
        select(TicketEvent)
        .where(TicketEvent.ticket_id == ticket.id, TicketEvent.actor.like("center:%"))
        .order_by(TicketEvent.id.desc())
    ).first()
    if ev is None:
        return "已处理"
    return f"已处理：{tx.EVENT_ZH.get(ev.action, ev.action)}（{ev.at:%m-%d %H:%M}）"


def center_view(session: Session, ticket: Ticket) -> Reply:
    """The center's card for a ticket: the queue card of what waits for the center, or a done view."""
    status = ticket.status
    if status in ("received", "triaged"):
        return center_review_card(session, ticket)
    kind = {"return_requested": "return", "extension_requested": "extension"}.get(status)
    if kind:
        req = pending_request(session, ticket, kind)
        if req is not None:
            return center_request_card(session, ticket, req)
    if status == "reply_submitted":
        return center_reply_card(session, ticket)
    appeal = pending_request(session, ticket, "appeal")
    if appeal is not None:
        return center_request_card(session, ticket, appeal)
    done = Reply("\n".join([f"✅ {_last_center_action(session, ticket)}", *ticket_summary(session, ticket)]))
    if status in ALLOWED["add_co"]:
        done.buttons = [[Button("添加协办", f"c:copick:{ticket.id}")]]
    return done


def _view_for_chat(session: Session, ticket: Ticket, chat_id: int) -> Reply | None:
    bound = session.get(ChatBinding, chat_id)
    if bound is None:
        return None
    if bound.unit_code == CENTER:
        return center_view(session, ticket)
    return unit_view(session, ticket, bound.unit_code)


def refresh_cards(session: Session, ticket: Ticket) -> int:
    """Bring every card of ``ticket`` up to date: a card still waiting in the outbox is rewritten, a card
    already delivered is edited in place (an edit queued with its message id). Returns how many."""
    session.flush()
    delivered = {
        int(c.chat_id): c.message_id
        for c in session.scalars(select(TicketCard).where(TicketCard.ticket_id == ticket.id))
        if c.message_id is not None
    }
    waiting: dict[int, OutboxMessage] = {}
    rows = session.scalars(
        select(OutboxMessage)
        .where(
            OutboxMessage.ticket_id == ticket.id,
            OutboxMessage.kind.in_(CARD_KINDS),
            OutboxMessage.status == "pending",
            OutboxMessage.edit_message_id.is_(None),
        )
        .order_by(OutboxMessage.id.desc())
    )
    for row in rows:
        if (row.markup or {}).get("buttons"):
            try:
                waiting.setdefault(int(row.chat_id), row)
            except ValueError:
                continue
    n = 0
    for chat_id in sorted(set(delivered) | set(waiting)):
        view = _view_for_chat(session, ticket, chat_id)
        if view is None:
            continue
        row = waiting.get(chat_id)
        if row is not None:
            done = session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == row.id, OutboxMessage.status == "pending")
                .values(text=view.text, markup=view.to_markup() or {"buttons": []})
            ).rowcount
            if done:
                n += 1
                continue
        if chat_id in delivered:
            view.edit_message_id = delivered[chat_id]
            enqueue(
                session,
                channel="telegram",
                chat_id=chat_id,
                reply=view,
                ticket_id=ticket.id,
                kind="card_edit",
            )
            n += 1
    return n


def _changed_since(session: Session, ticket_id: int, since: datetime) -> bool:
    """The ticket has an event at or after ``since`` (at: a frozen test clock gives both the same time)."""
    return (
        session.scalar(
            select(TicketEvent.id).where(TicketEvent.ticket_id == ticket_id, TicketEvent.at >= since).limit(1)
        )
        is not None
    )


def _remember_card(session: Session, ticket_id: int, chat_id: int, message_id: int) -> None:
    """Where the ticket's card in ``chat_id`` now is: one upsert on PostgreSQL and SQLite (issue 8: a read, an
    insert and a flush before)."""
    insert = conflict_insert(session)
    if insert is not None:
        stmt = insert(TicketCard.__table__).values(ticket_id=ticket_id, chat_id=chat_id, message_id=message_id)
        session.execute(
            stmt.on_conflict_do_update(index_elements=["ticket_id", "chat_id"], set_={"message_id": message_id})
        )
        return
    row = session.scalars(  # pragma: no cover - the product runs on PostgreSQL or SQLite
        select(TicketCard).where(TicketCard.ticket_id == ticket_id, TicketCard.chat_id == chat_id)
    ).one_or_none()
    if row is None:  # pragma: no cover
        session.add(TicketCard(ticket_id=ticket_id, chat_id=chat_id, message_id=message_id))
    else:  # pragma: no cover
        row.message_id = message_id
    session.flush()  # pragma: no cover


def record_card_message(session: Session, outbox_msg: OutboxMessage, message_id: int | None) -> None:
    """Hook for the sender: a card was delivered as ``message_id``; remember it so it can be edited later.

    Only new messages with buttons about a ticket count as cards (edits and plain notices do not)."""
    if message_id is None or outbox_msg.ticket_id is None or outbox_msg.edit_message_id is not None:
        return
    if outbox_msg.kind not in CARD_KINDS or not (outbox_msg.markup or {}).get("buttons"):
        return
    try:
        chat_id = int(outbox_msg.chat_id)
    except ValueError:
        return
    _remember_card(session, outbox_msg.ticket_id, chat_id, message_id)
    # a step that moved the ticket while this card was on its way (a press right after it arrived) could not
    # edit it: it had no message id yet. If its buttons are stale now, edit it the way refresh_cards would.
    # Every change to a ticket leaves an event (models/workflow.py): without one since the card was queued,
    # its buttons are current and the card need not be drawn again (issue 8: drawing it cost more than the
    # rest of recording the send).
    if outbox_msg.created_at is not None and not _changed_since(
        session, outbox_msg.ticket_id, outbox_msg.created_at
    ):
        return
    ticket = session.get(Ticket, outbox_msg.ticket_id)
    view = _view_for_chat(session, ticket, chat_id) if ticket is not None else None
    if view is not None and (view.to_markup() or {"buttons": []}) != (outbox_msg.markup or {"buttons": []}):
        view.edit_message_id = message_id
        enqueue(
            session, channel="telegram", chat_id=chat_id, reply=view, ticket_id=ticket.id, kind="card_edit"
        )


# --------------------------------------------------------------------------- notifications


def send_unit_cards(session: Session, ticket: Ticket, *, headline: str | None = None) -> None:
    """A new card to every unit on the ticket (after a dispatch or a re-dispatch)."""
    for tu in ticket.units:
        notify_unit(
            session,
            tu.unit_code,
            unit_view(session, ticket, tu.unit_code, headline=headline),
            ticket_id=ticket.id,
            kind="card",
            dedupe_key=f"card:{ticket.id}:{ticket.return_count}",
        )


def tell_unit(session: Session, unit_code: str | None, text: str, ticket: Ticket) -> None:
    if unit_code:
        notify_unit(session, unit_code, Reply(text), ticket_id=ticket.id, kind="notice")


def tell_citizen(session: Session, ticket: Ticket, text: str) -> None:
    notify_citizen(session, ticket.citizen_id, Reply(text), ticket_id=ticket.id, kind="progress")


def to_center(session: Session, ticket: Ticket, card: Reply, key: str) -> None:
    notify_unit(session, CENTER, card, ticket_id=ticket.id, kind="center_queue", dedupe_key=key)


def notify_rating(session: Session, ticket: Ticket) -> None:
    """Hook for the citizen conversation after a rating: tell the lead unit the result and, when the policy
    lets it dispute an "unsatisfied" (渠府办〔2023〕66号 第十二条（一）), give it the 申请甄别 button."""
    rating = session.scalars(
        select(Rating).where(Rating.ticket_id == ticket.id).order_by(Rating.round.desc())
    ).first()
    if rating is None or not ticket.lead_unit:
        return
    comment = f"（{mask_text(rating.comment)[:300]}）" if rating.comment else ""
    headline = tx.UNIT_RATED.format(
        number=ticket.number, value=RATING_ZH.get(rating.value, rating.value), comment=comment
    )
    if appeal_open(session, ticket, ticket.lead_unit):
        due = f"，如有异议可在 {_fmt(ticket.appeal_due)} 前申请甄别" if ticket.appeal_due else ""
        headline += due
    refresh_cards(session, ticket)  # first, so the new card keeps its headline
    notify_unit(
        session,
        ticket.lead_unit,
        unit_view(session, ticket, ticket.lead_unit, headline=headline),
        ticket_id=ticket.id,
        kind="card",
        dedupe_key=f"rated:{ticket.id}:{rating.round}",
    )


# --------------------------------------------------------------------------- the unit's buttons


def _unit_button(ctx: GroupCtx, action: str, ticket: Ticket) -> list[Reply]:
    tu = _my_unit_on(ctx, ticket)
    if action == "sign":
        return _sign(ctx, ticket, tu)
    if action == "return":
        return _start_return(ctx, ticket, tu)
    if action == "extend":
        return _start_extension(ctx, ticket, tu)
    if action == "reply":
        return _start_reply(ctx, ticket, tu)
    if action == "co":
        return _start_co(ctx, ticket, tu)
    if action == "appeal":
        return _start_appeal(ctx, ticket, tu)
    if action == "detail":
        return [Reply(ticket_detail(ctx.session, ticket))]
    if action == "contact":
        return _reveal(ctx, ticket)
    if action == "card":
        return [unit_view(ctx.session, ticket, ctx.unit_code)]
    raise Refusal(tx.STALE_GENERIC)


def _sign(ctx: GroupCtx, ticket: Ticket, tu: TicketUnit) -> list[Reply]:
    if tu.signed_at is not None:
        raise Refusal(f"工单 {ticket.number} 贵单位已于 {tu.signed_at:%m-%d %H:%M} 签收，无需重复签收。")
    if tu.role == "lead" and ticket.status != "dispatched":
        raise stale(ticket)
    if tu.role == "co" and ticket.status not in HANDLING_STATES | {"dispatched"}:
        raise stale(ticket)
    sign(ctx.session, ticket, ctx.actor)
    if tu.role == "lead":
        tell_citizen(ctx.session, ticket, tx.CITIZEN_SIGNED.format(number=ticket.number, unit=ctx.unit.name))
    refresh_cards(ctx.session, ticket)
    return [Reply(tx.SIGNED.format(number=ticket.number, unit=ctx.unit.name, who=ctx.name))]


def _lead_step(ticket: Ticket, tu: TicketUnit, action: str) -> None:
    if ticket.status not in ALLOWED[action]:
        raise stale(ticket)
    if tu.role != "lead":
        raise Refusal(tx.LEAD_ONLY)


def _start_return(ctx: GroupCtx, ticket: Ticket, tu: TicketUnit) -> list[Reply]:
    _lead_step(ticket, tu, "request_return")
    refusal = return_refusal(ticket)
    if refusal:  # said before the reason is typed, not after
        raise Refusal(refusal)
    ctx.st.start("ret_reason", tid=ticket.id, number=ticket.number)
    return [Reply(f"工单 {ticket.number}：" + tx.ASK_RETURN_REASON.format(who=ctx.name))]


def _start_extension(ctx: GroupCtx, ticket: Ticket, tu: TicketUnit) -> list[Reply]:
    _lead_step(ticket, tu, "request_extension")
    refusal = extension_refusal(ticket)
    if refusal:
        raise Refusal(refusal)
    ctx.st.start("ext_reason", tid=ticket.id, number=ticket.number)
    return [Reply(f"工单 {ticket.number}：" + tx.ASK_EXT_REASON.format(who=ctx.name))]


def _start_reply(ctx: GroupCtx, ticket: Ticket, tu: TicketUnit) -> list[Reply]:
    _lead_step(ticket, tu, "submit_reply")
    ctx.st.start("reply", tid=ticket.id, number=ticket.number, fields={}, asking="result")
    return [
        Reply(f"工单 {ticket.number}：" + tx.REPLY_TEMPLATE.format(who=ctx.name)),
        Reply(tx.REPLY_ASK["result"]),
    ]


def _start_co(ctx: GroupCtx, ticket: Ticket, tu: TicketUnit) -> list[Reply]:
    if tu.role != "co":
        raise Refusal(tx.CO_ONLY)
    if ticket.status not in HANDLING_STATES | {"dispatched"}:
        raise stale(ticket)
    ctx.st.start("co_text", tid=ticket.id, number=ticket.number)
    lead = unit_name(ctx.session, ticket.lead_unit)
    return [Reply(f"工单 {ticket.number}：" + tx.ASK_CO_TEXT.format(who=ctx.name, lead=lead))]


def _start_appeal(ctx: GroupCtx, ticket: Ticket, tu: TicketUnit) -> list[Reply]:
    if tu.role != "lead":
        raise Refusal(tx.LEAD_ONLY)
    policy = policy_of(ticket)
    if not policy.appeal.allowed:
        raise Refusal(f"本地政策未设甄别程序（{policy.appeal.cite}）。")
    if not appeal_open(ctx.session, ticket, ctx.unit_code):
        raise Refusal(f"工单 {ticket.number} 没有可申请甄别的不满意评价，或已申请过、已超过申请时限。")
    ctx.st.start("appeal_reason", tid=ticket.id, number=ticket.number)
    return [Reply(f"工单 {ticket.number}：" + tx.ASK_APPEAL_REASON.format(who=ctx.name))]


def _reveal(ctx: GroupCtx, ticket: Ticket) -> list[Reply]:
    if ticket.citizen_id is None:
        return [Reply(f"工单 {ticket.number} 没有关联的诉求人。")]
    name, phone = reveal_contact(
        ctx.session, ticket.citizen_id, ctx.actor.label, ticket_id=ticket.id, purpose="承办单位办理联系"
    )
    if name or phone:
        text = tx.CONTACT_PRIVATE.format(
            number=ticket.number, name=name or "（未留姓名）", phone=phone or "（未留电话）"
        )
    else:
        text = tx.CONTACT_NONE.format(number=ticket.number)
    enqueue(
        ctx.session,
        channel=ctx.msg.channel,
        chat_id=ctx.msg.user_id,
        reply=Reply(text),
        ticket_id=ticket.id,
        kind="pii",
    )
    log.info("contact of ticket %s revealed to %s", ticket.number, ctx.actor.label)
    return [Reply(tx.CONTACT_SENT_GROUP.format(who=ctx.name))]


# --------------------------------------------------------------------------- the unit's typed answers


def _flow_ticket(ctx: GroupCtx) -> Ticket:
    ticket = ctx.session.get(Ticket, ctx.st.data.get("tid"), with_for_update=True)
    if ticket is None:
        ctx.st.reset()
        raise Refusal(tx.STALE_GENERIC)
    return ticket


def _unit_text(ctx: GroupCtx, text: str) -> list[Reply]:
    state, d = ctx.st.state, ctx.st.data
    ticket = _flow_ticket(ctx)
    s = ctx.session
    if state == "ret_reason":
        d["reason"] = text
        ctx.st.state = "ret_suggest"
        return [Reply(tx.ASK_RETURN_SUGGESTION)]
    if state == "ret_suggest":
        suggestion = None if tx.is_none_answer(text) else text
        req = request_return(s, ticket, ctx.actor, reason=d["reason"], suggestion=suggestion)
        ctx.st.reset()
        to_center(s, ticket, center_request_card(s, ticket, req), f"req:{req.id}")
        refresh_cards(s, ticket)
        return [Reply(tx.RETURN_SENT.format(number=ticket.number))]
    if state == "ext_reason":
        d["reason"] = text
        ctx.st.state = "ext_date"
        rule = policy_of(ticket).extension
        cap = f"（{rule.cite}）" if rule.cite else ""
        return [Reply(tx.ASK_EXT_DATE.format(due=_fmt(ticket.finish_due), cap=cap))]
    if state == "ext_date":
        if ticket.finish_due is None:
            raise WorkflowError("该工单没有办理时限，无需延期。")
        new_due = tx.parse_new_due(text, ticket.finish_due, now().date(), get_calendar())
        if new_due is None:
            return [Reply(tx.EXT_DATE_UNCLEAR)]
        req = request_extension(s, ticket, ctx.actor, reason=d["reason"], new_due=new_due)
        ctx.st.reset()
        to_center(s, ticket, center_request_card(s, ticket, req), f"req:{req.id}")
        refresh_cards(s, ticket)
        return [Reply(tx.EXT_SENT.format(number=ticket.number, due=_fmt(req.new_due)))]
    if state == "reply":
        return _reply_step(ctx, ticket, text)
    if state == "co_text":
        submit_contribution(s, ticket, ctx.actor, text=text)
        ctx.st.reset()
        tell_unit(
            s,
            ticket.lead_unit,
            tx.UNIT_CO_REPLY.format(unit=ctx.unit.name, number=ticket.number, text=mask_text(text)[:1500]),
            ticket,
        )
        refresh_cards(s, ticket)
        return [Reply(tx.CO_SENT.format(lead=unit_name(s, ticket.lead_unit)))]
    if state == "appeal_reason":
        req = request_appeal(s, ticket, ctx.actor, reason=text)
        ctx.st.reset()
        to_center(s, ticket, center_request_card(s, ticket, req), f"req:{req.id}")
        refresh_cards(s, ticket)
        return [Reply(tx.APPEAL_SENT.format(number=ticket.number))]
    ctx.st.reset()
    return []


_REPLY_ORDER = ("result", "basis", "handler", "phone")


def _next_reply_field(fields: dict[str, str]) -> str | None:
    return next((f for f in _REPLY_ORDER if not (fields.get(f) or "").strip()), None)


def _reply_step(ctx: GroupCtx, ticket: Ticket, text: str) -> list[Reply]:
    """The reply, one item per message or all at once in labelled lines; submitted when complete."""
    d = ctx.st.data
    fields: dict[str, str] = d.setdefault("fields", {})
    labelled = tx.parse_labelled(text)
    if labelled:
        for key, value in labelled.items():
            if key == "terminal":
                d["terminal"] = value.strip() in ("是", "确认", "yes", "y", "1")
            elif value:
                fields[key] = value
        return _submit_reply(ctx, ticket)
    fields[d.get("asking") or _next_reply_field(fields) or "result"] = text
    nxt = _next_reply_field(fields)
    if nxt is not None:
        d["asking"] = nxt
        return [Reply(tx.REPLY_ASK[nxt])]
    return _submit_reply(ctx, ticket)


def _submit_reply(ctx: GroupCtx, ticket: Ticket) -> list[Reply]:
    d = ctx.st.data
    fields = d["fields"]
    s = ctx.session
    try:
        reply = submit_reply(
            s,
            ticket,
            ctx.actor,
            result=fields.get("result", ""),
            basis=fields.get("basis", ""),
            handler=fields.get("handler", ""),
            phone=fields.get("phone", ""),
            terminal=bool(d.get("terminal")),
        )
    except IncompleteReply as err:
        # 宿州 工作规范 on reply quality: refused with the missing items listed; keep what was good
        for field in tx.missing_fields(err.missing):
            fields.pop(field, None)
        nxt = _next_reply_field(fields) or "result"
        d["asking"] = nxt
        return [Reply(f"{err}\n{tx.REPLY_ASK[nxt]}")]
    ctx.st.reset()
    to_center(s, ticket, center_reply_card(s, ticket), f"reply:{reply.id}")
    refresh_cards(s, ticket)
    return [Reply(tx.REPLY_SENT.format(number=ticket.number))]


# --------------------------------------------------------------------------- /ticket, /pending, detail


def _ticket_command(ctx: GroupCtx, args: str) -> list[Reply]:
    ticket = _ticket_by_number(ctx, args, "ticket")
    detail = ticket_detail(ctx.session, ticket)
    if ctx.is_center:
        view = center_view(ctx.session, ticket)
    else:
        _my_unit_on(ctx, ticket)
        view = unit_view(ctx.session, ticket, ctx.unit_code)
    return [Reply(detail, buttons=view.buttons)]


def _pending(ctx: GroupCtx) -> list[Reply]:
    rows = ctx.session.scalars(
        select(Ticket)
        .join(TicketUnit, TicketUnit.ticket_id == Ticket.id)
        .where(TicketUnit.unit_code == ctx.unit_code, Ticket.status.in_(PENDING_STATES))
        .order_by(Ticket.finish_due, Ticket.id)
    ).all()
    if not rows:
        return [Reply(f"{ctx.unit.name}目前没有待办工单。")]
    at = now()
    lines = [f"{ctx.unit.name}待办工单 {len(rows)} 件（按办结时限排序）："]
    buttons = []
    for t in rows[:30]:
        flags = ""
        if t.overdue or (t.finish_due and t.finish_due < at):
            flags += " ⚠️已超期"
        if t.supervised:
            flags += " 督办"
        role = next((tu.role for tu in t.units if tu.unit_code == ctx.unit_code), "lead")
        co = "（协办）" if role == "co" else ""
        lines.append(
            f"· {t.number}{co} {STATUS_ZH.get(t.status, t.status)}｜办结 {_fmt(t.finish_due)}{flags}"
            f"｜{mask_text(t.summary or t.original_text)[:20]}"
        )
        if len(buttons) < 8:
            buttons.append([Button(f"查看 {t.number}", f"u:card:{t.id}")])
    if len(rows) > 30:
        lines.append(f"……另有 {len(rows) - 30} 件未列出")
    return [Reply("\n".join(lines), buttons=buttons)]


def _actor_zh(session: Session, label: str) -> str:
    kind, _, rest = label.partition(":")
    if kind == "citizen":
        return "诉求人"
    if kind == "system":
        return "系统"
    if kind == "center":
        return "热线中心"
    unit = rest.partition("@")[2]
    return unit_name(session, unit) if unit else "承办单位"


def _event_detail(ev: TicketEvent) -> str:
    p = ev.payload or {}
    if ev.action in ("request_return", "request_extension", "appeal") and p.get("reason"):
        return "：" + mask_text(str(p["reason"]))[:80]
    if ev.action in ("return_refused", "extension_refused", "reply_refused", "supervise") and p.get("note"):
        return "：" + mask_text(str(p["note"]))[:80]
    if ev.action == "rate" and p.get("value"):
        return "：" + RATING_ZH.get(p["value"], p["value"])
    if ev.action == "add_info" and p.get("text"):
        return "：" + mask_text(str(p["text"]))[:80]
    if ev.action == "dispatch" and p.get("lead"):
        return f"：{p['lead']}"
    return ""


def ticket_detail(session: Session, ticket: Ticket) -> str:
    """Every field of a ticket, its history and how many photos it has; the citizen's contact masked."""
    citizen = session.get(Citizen, ticket.citizen_id) if ticket.citizen_id else None
    photos = (
        session.scalar(
            select(func.count(Attachment.id)).where(
                Attachment.ticket_id == ticket.id, Attachment.kind == "photo"
            )
        )
        or 0
    )
    others = (
        session.scalar(
            select(func.count(Attachment.id)).where(
                Attachment.ticket_id == ticket.id, Attachment.kind != "photo"
            )
        )
        or 0
    )
    flags = [
        f
        for f, on in (
            ("紧急", ticket.urgent),
            ("督办", ticket.supervised),
            ("已超期", ticket.overdue),
            ("重复诉求", bool(ticket.repeat_of_id)),
            ("终结办理", ticket.terminal),
        )
        if on
    ]
    lines = [
        f"【工单 {ticket.number} 详情】{TYPE_ZH.get(ticket.type or '', '未分类')}"
        + (f"（{'、'.join(flags)}）" if flags else ""),
        f"状态：{STATUS_ZH.get(ticket.status, ticket.status)}　受理：{_fmt(ticket.created_at)}",
        f"诉求内容：{mask_text(ticket.original_text)}",
        "六要素：",
        f"  时间：{ticket.ev_time or '—'}",
        f"  地点：{mask_text(ticket.ev_place or '—')}",
        f"  人物：{mask_text(ticket.ev_person or '—')}",
        f"  起因：{mask_text(ticket.ev_cause or '—')[:200]}",
        f"  经过：{mask_text(ticket.ev_process or '—')[:200]}",
        f"  结果：{mask_text(ticket.ev_result or '—')[:200]}",
    ]
    if ticket.latitude is not None and ticket.longitude is not None:
        lines.append(f"位置坐标：{ticket.latitude:.5f},{ticket.longitude:.5f}")
    lines.append(f"诉求人：{contact_masked(citizen)}（完整联系方式请点“查看联系方式”，查看将被记录）")
    lines.append(f"附件：图片 {photos} 张" + (f"，其他 {others} 个" if others else ""))
    units = []
    for tu in ticket.units:
        signed = f"已签收 {tu.signed_at:%m-%d %H:%M}" if tu.signed_at else "未签收"
        units.append(
            f"{unit_name(session, tu.unit_code)}（{'主办' if tu.role == 'lead' else '协办'}，{signed}）"
        )
    lines.append("承办单位：" + ("；".join(units) or "待派单"))
    lines.append(
        f"时限：签收 {_fmt(ticket.sign_due)}｜退回 {_fmt(ticket.return_due)}｜办结 {_fmt(ticket.finish_due)}"
        + (
            f"（原 {_fmt(ticket.base_finish_due)}）"
            if ticket.base_finish_due and ticket.base_finish_due != ticket.finish_due
            else ""
        )
        + (f"｜首次响应 {_fmt(ticket.respond_due)}" if ticket.respond_due else "")
        + (f"｜回访 {_fmt(ticket.survey_due)}" if ticket.survey_due else "")
        + (f"｜甄别 {_fmt(ticket.appeal_due)}" if ticket.appeal_due else "")
    )
    lines.append(
        f"计数：延期 {ticket.extension_count}｜退回 {ticket.return_count}｜重办 {ticket.redo_count}"
        f"｜催办 {ticket.urge_count}｜超期 {ticket.overdue_count}"
    )
    for tu in ticket.units:
        if tu.contribution:
            lines.append(
                f"协办意见（{unit_name(session, tu.unit_code)}）：{mask_text(tu.contribution)[:500]}"
            )
    reply = latest_reply(session, ticket)
    if reply is not None:
        review = {"pending": "待审核", "approved": "已通过", "refused": "已退回"}.get(
            reply.review, reply.review
        )
        lines.append(f"最近答复（{review}）：{reply.result[:500]}")
        lines.append(f"  依据：{reply.basis[:200]}　经办人：{reply.handler}　电话：{reply.phone}")
    for r in session.scalars(select(Rating).where(Rating.ticket_id == ticket.id).order_by(Rating.round)):
        appeal = {"pending": "，甄别中", "upheld": "，甄别成立", "rejected": "，甄别不成立"}.get(
            r.appeal or "", ""
        )
        comment = f"：{mask_text(r.comment)[:100]}" if r.comment else ""
        lines.append(f"第{r.round}轮评价：{RATING_ZH.get(r.value, r.value)}{appeal}{comment}")
    events = list(
        session.scalars(
            select(TicketEvent).where(TicketEvent.ticket_id == ticket.id).order_by(TicketEvent.id)
        )
    )
    lines.append("办理记录：")
    if len(events) > 30:
        lines.append(f"  ……（前 {len(events) - 30} 条略）")
    for ev in events[-30:]:
        lines.append(
            f"  {ev.at:%m-%d %H:%M} {tx.EVENT_ZH.get(ev.action, ev.action)}"
            f"（{_actor_zh(session, ev.actor)}）{_event_detail(ev)}"
        )
    return "\n".join(lines)
