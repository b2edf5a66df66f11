"""The transactional outbox: every notification is a row written in the same transaction as the change
it reports, then delivered by a sender that retries with back-off until the channel accepts it.

A message is delivered at most once per row (a row is claimed before it is sent, and a dedupe key stops
the same notice from being queued twice) and at least once (a failed send stays pending with a later
``next_attempt_at``; Telegram's 429 ``retry_after`` is honoured).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bot.messages import Reply
from models.clock import now
from models.privacy import mask_text
from models.tables import ChatBinding, Citizen, OutboxMessage

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 12
CLAIM_TIMEOUT = timedelta(minutes=2)


def enqueue(
    session: Session,
    *,
    channel: str,
    chat_id: str | int,
    reply: Reply,
    ticket_id: int | None = None,
    kind: str = "message",
    dedupe_key: str | None = None,
) -> OutboxMessage | None:
    """Queue one message; returns None when a message with the same dedupe key was already queued."""
    msg = OutboxMessage(
        channel=channel,
        chat_id=str(chat_id),
        text=reply.text,
        markup=reply.to_markup(),
        ticket_id=ticket_id,
        kind=kind,
        dedupe_key=dedupe_key,
        edit_message_id=reply.edit_message_id,
        next_attempt_at=now(),
        created_at=now(),
    )
    if dedupe_key is None:
        session.add(msg)
        session.flush()
        return msg
    try:
        with session.begin_nested():
            session.add(msg)
        return msg
    except IntegrityError:
        return None


def chats_of_unit(session: Session, unit_code: str) -> list[int]:
    return list(session.scalars(select(ChatBinding.chat_id).where(ChatBinding.unit_code == unit_code)))


def notify_unit(
    session: Session,
    unit_code: str,
    reply: Reply,
    *,
    ticket_id: int | None = None,
    kind: str = "unit",
    dedupe_key: str | None = None,
) -> int:
    """Queue a message to every group bound to ``unit_code`` (``center`` for the hotline center)."""
    n = 0
    for chat in chats_of_unit(session, unit_code):
        key = f"{dedupe_key}:{chat}" if dedupe_key else None
        if enqueue(
            session,
            channel="telegram",
            chat_id=chat,
            reply=reply,
            ticket_id=ticket_id,
            kind=kind,
            dedupe_key=key,
        ):
            n += 1
    return n


def notify_citizen(
    session: Session,
    citizen_id: int | None,
    reply: Reply,
    *,
    ticket_id: int | None = None,
    kind: str = "citizen",
    dedupe_key: str | None = None,
) -> bool:
    if citizen_id is None:
        return False
    citizen = session.get(Citizen, citizen_id)
    if citizen is None:
        return False
    return (
        enqueue(
            session,
            channel=citizen.channel,
            chat_id=citizen.external_id,
            reply=reply,
            ticket_id=ticket_id,
            kind=kind,
            dedupe_key=dedupe_key,
        )
        is not None
    )


# --------------------------------------------------------------------------- delivery


@dataclass
class SendResult:
    ok: bool
    message_id: int | None = None
    retry_after: float | None = None  # seconds, from a 429
    permanent: bool = False  # e.g. the user blocked the bot: never retry
    error: str | None = None


Sender = Callable[[OutboxMessage], Awaitable[SendResult]]


def claim_batch(factory: sessionmaker[Session], channel: str, limit: int = 50) -> list[OutboxMessage]:
    """Take due messages for sending; a claimed row is invisible to other senders for a while."""
    at = now()
    with factory.begin() as s:
        stmt = (
            select(OutboxMessage)
            .where(
                OutboxMessage.channel == channel,
                or_(
                    OutboxMessage.status == "pending",
                    (OutboxMessage.status == "sending") & (OutboxMessage.next_attempt_at <= at),
                ),
                OutboxMessage.next_attempt_at <= at,
            )
            .order_by(OutboxMessage.id)
            .limit(limit)
        )
        if s.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = list(s.scalars(stmt))
        for row in rows:
            row.status = "sending"
            row.attempts += 1
            row.next_attempt_at = at + CLAIM_TIMEOUT
        s.flush()
        s.expunge_all()
    return rows


def record_result(factory: sessionmaker[Session], msg_id: int, result: SendResult) -> None:
    at = now()
    with factory.begin() as s:
        row = s.get(OutboxMessage, msg_id)
        if row is None:
            return
        if result.ok:
            row.status, row.sent_at, row.sent_message_id, row.last_error = "sent", at, result.message_id, None
            return
        row.last_error = mask_text(result.error or "")[:500]
        if result.permanent or row.attempts >= MAX_ATTEMPTS:
            row.status = "failed"
            log.warning("outbox message %s failed for good: %s", msg_id, row.last_error)
            return
        backoff = result.retry_after if result.retry_after is not None else min(300.0, 2.0**row.attempts)
        row.status = "pending"
        row.next_attempt_at = at + timedelta(seconds=backoff)


async def deliver_due(factory: sessionmaker[Session], channel: str, send: Sender, limit: int = 50) -> int:
    """Send what is due once; returns how many were delivered."""
    delivered = 0
    for msg in claim_batch(factory, channel, limit):
        try:
            result = await send(msg)
        except Exception as err:  # a bug in a sender must not lose the message
            log.exception("sender crashed on outbox message %s", msg.id)
            result = SendResult(ok=False, error=repr(err))
        record_result(factory, msg.id, result)
        delivered += int(result.ok)
    return delivered


def pending_count(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return len(s.scalars(select(OutboxMessage.id).where(OutboxMessage.status != "sent")).all())
