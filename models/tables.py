"""The hotline's data model (SQLAlchemy 2 typed ORM).

Citizens' personal data (name, phone) lives in its own table, apart from tickets, and is shown
masked everywhere except to staff who ask for it; every such look is logged (渠府办〔2023〕66号
第十七条, 宿政办发〔2020〕55号 on confidentiality). Deadlines are columns so the scheduler can sweep them
with an index instead of recomputing anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

import models.knowledge  # noqa: F401  (registers the knowledge-base tables on the same metadata)
from models.base import Base, TZDateTime
from models.clock import now


class Unit(Base):
    """A handling unit (承办单位) or the hotline center, in the three-level network (宿州 工作规范)."""

    __tablename__ = "units"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    level: Mapped[int] = mapped_column(Integer, default=2)
    parent_code: Mapped[str | None] = mapped_column(ForeignKey("units.code"), nullable=True)
    duties: Mapped[str] = mapped_column(Text, default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Staff(Base):
    """A person working for a unit or the center, known by their chat account."""

    __tablename__ = "staff"
    __table_args__ = (UniqueConstraint("user_id", "unit_code", name="uq_staff_user_unit"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, index=True)
    display_name: Mapped[str] = mapped_column(String(100), default="")
    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"))
    role: Mapped[str] = mapped_column(String(20), default="handler")  # handler|leader|operator|supervisor
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)


class ChatBinding(Base):
    """A group chat bound to one unit or to the center."""

    __tablename__ = "chat_bindings"

    chat_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"), index=True)
    bound_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    bound_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class BindCode(Base):
    """A one-time code printed by `hotline bind`, posted as /bind CODE in a group."""

    __tablename__ = "bind_codes"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"))
    role: Mapped[str] = mapped_column(String(20), default="handler")
    expires_at: Mapped[datetime] = mapped_column(TZDateTime)
    used_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)


class Citizen(Base):
    __tablename__ = "citizens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(20), default="telegram")
    external_id: Mapped[str] = mapped_column(String(64))  # chat user id or console session id
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    pii: Mapped[CitizenPII | None] = relationship(back_populates="citizen", uselist=False)

    __table_args__ = (UniqueConstraint("channel", "external_id", name="uq_citizen_channel_ext"),)


class CitizenPII(Base):
    """Name and phone, kept apart from tickets; read only through models.privacy."""

    __tablename__ = "citizen_pii"

    citizen_id: Mapped[int] = mapped_column(ForeignKey("citizens.id"), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    phone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    citizen: Mapped[Citizen] = relationship(back_populates="pii")


class PIIAccess(Base):
    """Who looked at a citizen's contact details, when, and why."""

    __tablename__ = "pii_access_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    citizen_id: Mapped[int] = mapped_column(ForeignKey("citizens.id"), index=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), nullable=True)
    viewer: Mapped[str] = mapped_column(String(100))
    purpose: Mapped[str] = mapped_column(String(100), default="")
    at: Mapped[datetime] = mapped_column(TZDateTime, default=now)


class TicketSequence(Base):
    """Per-day counter behind ticket numbers like 20261122-000123."""

    __tablename__ = "ticket_sequences"

    day: Mapped[str] = mapped_column(String(8), primary_key=True)
    last: Mapped[int] = mapped_column(Integer, default=0)


class Ticket(Base):
    __tablename__ = "tickets"
    __table_args__ = (
        Index("ix_tickets_status_finish", "status", "finish_due"),
        Index("ix_tickets_status_sign", "status", "sign_due"),
        Index("ix_tickets_status_survey", "status", "survey_due"),
        # scheduler (issue 7): the sweep finds yellow cards that have come due by this index
        Index("ix_tickets_status_yellow", "status", "yellow_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[str] = mapped_column(String(20), unique=True)
    channel: Mapped[str] = mapped_column(String(20), default="telegram")
    citizen_id: Mapped[int | None] = mapped_column(ForeignKey("citizens.id"), nullable=True, index=True)
    policy: Mapped[str] = mapped_column(String(32))
    original_text: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text, default="")
    # the six elements (六要素): time, place, person, cause, process, result
    ev_time: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ev_place: Mapped[str | None] = mapped_column(String(300), nullable=True)
    ev_person: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ev_cause: Mapped[str | None] = mapped_column(Text, nullable=True)
    ev_process: Mapped[str | None] = mapped_column(Text, nullable=True)
    ev_result: Mapped[str | None] = mapped_column(Text, nullable=True)
    latitude: Mapped[float | None] = mapped_column(Float, nullable=True)
    longitude: Mapped[float | None] = mapped_column(Float, nullable=True)

    type: Mapped[str | None] = mapped_column(String(20), nullable=True)
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    urgent_level: Mapped[str | None] = mapped_column(String(20), nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(20), nullable=True)
    reject_key: Mapped[str | None] = mapped_column(String(40), nullable=True)
    redirect: Mapped[str | None] = mapped_column(String(10), nullable=True)
    kb_entry_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    triage_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    suggested_units: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    lead_unit: Mapped[str | None] = mapped_column(ForeignKey("units.code"), nullable=True, index=True)

    status: Mapped[str] = mapped_column(String(30), default="received", index=True)
    supervised: Mapped[bool] = mapped_column(Boolean, default=False)
    overdue: Mapped[bool] = mapped_column(Boolean, default=False)
    terminal: Mapped[bool] = mapped_column(Boolean, default=False)  # 终结办理
    repeat_of_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), nullable=True)
    final_rating: Mapped[str | None] = mapped_column(String(20), nullable=True)

    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    dispatched_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    signed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    signed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    replied_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)

    # deadlines, all computed from the policy at the step that starts them
    clock_start: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    sign_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    return_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    respond_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)  # urgent first response
    finish_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    base_finish_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)  # before extensions
    survey_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    appeal_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    # scheduler (issue 7): the yellow-card warning point for finish_due, set with it in models/workflow.py
    yellow_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)

    extension_count: Mapped[int] = mapped_column(Integer, default=0)
    return_count: Mapped[int] = mapped_column(Integer, default=0)
    redo_count: Mapped[int] = mapped_column(Integer, default=0)
    urge_count: Mapped[int] = mapped_column(Integer, default=0)
    overdue_count: Mapped[int] = mapped_column(Integer, default=0)

    units: Mapped[list[TicketUnit]] = relationship(
        back_populates="ticket", cascade="all, delete-orphan", order_by="TicketUnit.id"
    )
    events: Mapped[list[TicketEvent]] = relationship(
        back_populates="ticket", cascade="all, delete-orphan", order_by="TicketEvent.id"
    )

    @property
    def co_units(self) -> list[str]:
        return [u.unit_code for u in self.units if u.role == "co"]


class TicketUnit(Base):
    """A unit on a ticket: the lead (主办) or a co-handling unit (会办/协办)."""

    __tablename__ = "ticket_units"
    __table_args__ = (UniqueConstraint("ticket_id", "unit_code", name="uq_ticket_unit"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"), index=True)
    role: Mapped[str] = mapped_column(String(10))  # lead | co
    assigned_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    signed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    signed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    contribution: Mapped[str | None] = mapped_column(Text, nullable=True)  # a co-unit's part of the reply
    ticket: Mapped[Ticket] = relationship(back_populates="units")


class TicketRequest(Base):
    """A unit's request that the center decides: return (退回), extension (延期) or appeal (甄别)."""

    __tablename__ = "ticket_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # return | extension | appeal
    unit_code: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    suggestion: Mapped[str | None] = mapped_column(Text, nullable=True)  # 转送建议 for returns
    new_due: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    prev_status: Mapped[str] = mapped_column(String(30))
    requested_by: Mapped[str] = mapped_column(String(100))
    requested_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    decision: Mapped[str] = mapped_column(String(20), default="pending")  # pending|approved|refused
    decided_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    decision_note: Mapped[str | None] = mapped_column(Text, nullable=True)


class TicketReply(Base):
    """A unit's answer (办结), reviewed by the center before the citizen sees it."""

    __tablename__ = "ticket_replies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    unit_code: Mapped[str] = mapped_column(String(32))
    handler: Mapped[str] = mapped_column(String(100))
    phone: Mapped[str] = mapped_column(String(32))
    result: Mapped[str] = mapped_column(Text)
    basis: Mapped[str] = mapped_column(Text)
    terminal: Mapped[bool] = mapped_column(Boolean, default=False)
    submitted_by: Mapped[str] = mapped_column(String(100))
    submitted_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    review: Mapped[str] = mapped_column(String(20), default="pending")  # pending|approved|refused
    reviewed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    review_note: Mapped[str | None] = mapped_column(Text, nullable=True)


class Rating(Base):
    """The citizen's revisit rating for one round (1 = first reply, 2 = after the redo)."""

    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("ticket_id", "round", name="uq_rating_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    value: Mapped[str] = mapped_column(String(20))  # satisfied|basic|unsatisfied|none
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    rated_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    appeal: Mapped[str | None] = mapped_column(String(20), nullable=True)  # pending|upheld|rejected


class Attachment(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # photo | document | voice | location
    file_ref: Mapped[str] = mapped_column(String(300))  # the channel's file id
    caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)


class TicketEvent(Base):
    """Append-only audit log: every transition and every notable action on a ticket."""

    __tablename__ = "ticket_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(40))
    from_status: Mapped[str | None] = mapped_column(String(30), nullable=True)
    to_status: Mapped[str | None] = mapped_column(String(30), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ticket: Mapped[Ticket] = relationship(back_populates="events")


class ScreeningEvent(Base):
    """Messages that never became tickets: emergencies redirected and rejections (logged, masked)."""

    __tablename__ = "screening_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    citizen_id: Mapped[int | None] = mapped_column(ForeignKey("citizens.id"), nullable=True)
    verdict: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str] = mapped_column(String(40))  # redirect line or reject key
    text_masked: Mapped[str] = mapped_column(Text)


class OutboxMessage(Base):
    """A message waiting to be delivered to a chat; sent once, retried with back-off."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(20), default="telegram")
    chat_id: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(Text)
    markup: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(30), default="message")
    dedupe_key: Mapped[str | None] = mapped_column(String(120), unique=True, nullable=True)
    edit_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending|sent|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    sent_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    sent_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Conversation(Base):
    """A chat's conversation state, so a restart mid-conversation loses nothing."""

    __tablename__ = "conversations"

    channel: Mapped[str] = mapped_column(String(20), primary_key=True)
    chat_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(40), default="idle")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime, default=now, onupdate=now)


class TicketCard(Base):
    """Where a ticket's card was posted, so it can be edited in place as the ticket moves."""

    __tablename__ = "ticket_cards"
    __table_args__ = (UniqueConstraint("ticket_id", "chat_id", name="uq_card_ticket_chat"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Notice(Base):
    """Reminders, yellow/red cards and supervision notices already issued (one row = sent once)."""

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("ticket_id", "kind", "key", name="uq_notice_once"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(30))  # urge_sign|yellow|red|supervise|survey|survey_reminder
    key: Mapped[str] = mapped_column(String(60), default="")  # e.g. the deadline it is about
    unit_code: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    at: Mapped[datetime] = mapped_column(TZDateTime, default=now)


class InboundUpdate(Base):
    """issue 8: a chat update the bot has taken from Telegram, kept until it has been processed.

    Recorded before Telegram is told the update was received (the next getUpdates offset, or the webhook's
    200), and marked done in the same transaction as the conversation step it causes; a bot killed in
    between finds it pending after restart and processes it then, and a replayed update is recognised by its
    id, so a step happens exactly once. The raw payload (which may hold a phone number from a shared
    contact) is erased as soon as the update is done.
    """

    __tablename__ = "inbound_updates"
    __table_args__ = (Index("ix_inbound_pending", "done_at", "received_at"),)

    update_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    chat_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    received_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
    done_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)  # done|group|flood|ignored|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # replays after a crash


class TicketEmbedding(Base):
    """The e5 sentence embedding of a ticket's text (float32 bytes), for finding earlier tickets about the same
    event (triage/similar.py); ``model`` names the encoder so vectors of another model are never compared."""

    __tablename__ = "ticket_embeddings"

    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), primary_key=True, autoincrement=False)
    model: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)


class TicketFollower(Base):
    """A citizen who joined an open ticket about the same public event instead of opening a duplicate
    (the same broken streetlight reported by several neighbours); told of the outcome with the reporter."""

    __tablename__ = "ticket_followers"
    __table_args__ = (UniqueConstraint("ticket_id", "citizen_id", name="uq_ticket_follower"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    citizen_id: Mapped[int] = mapped_column(ForeignKey("citizens.id"), index=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)  # what this citizen wrote
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=now)
