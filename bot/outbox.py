"""The transactional outbox: every notification is a row written in the same transaction as the change
it reports, then delivered by a sender that retries with back-off until the channel accepts it.

A message is delivered at most once per row (a row is claimed before it is sent, and a dedupe key stops
the same notice from being queued twice) and at least once (a failed send stays pending with a later
``next_attempt_at``; Telegram's 429 ``retry_after`` is honoured).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bot.inbox import is_disconnect, with_db_retry
from bot.messages import URGENT, Reply
from models.clock import now
from models.db import conflict_insert
from models.privacy import mask_text
from models.tables import ChatBinding, Citizen, OutboxMessage

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 12
CLAIM_TIMEOUT = timedelta(seconds=60)  # issue 8: was 2 min; sends stop after SEND_WINDOW
SEND_WINDOW = timedelta(seconds=20)
# issue 8: a send's record that meets a database outage is tried again this often, for this long: a send starts
# at most SEND_WINDOW into its claim (60 s) and a step's reply at once (its claim: REPLY_CLAIM, 45 s), so the
# record still lands before the claim ends and the message is not sent again
RECORD_RETRY_EVERY = 1.0
RECORD_RETRY_FOR = 20.0
# issue 8: an emergency notice (outbox kind URGENT) is tried again after URGENT_FIRST_RETRY seconds, doubling,
# after a failed send, instead of 2 s, 4 s ... as other messages are
URGENT_FIRST_RETRY = 0.5


# issue 8: Core statements on the table, not ORM ones on the class: the ORM's bulk-update path cost more CPU than
# the statements (these rows are never loaded as objects in the writing session)
_OUTBOX = OutboxMessage.__table__
_MARK_SENT = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("sent_id"))
    .values(status="sent", sent_at=bindparam("sent_at_"), sent_message_id=bindparam("sent_mid"))
)


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
    values = dict(
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
        msg = OutboxMessage(**values)
        session.add(msg)
        session.flush()
        return msg
    insert = conflict_insert(session)
    if insert is not None:
        # issue 8: one statement, where a savepoint around the insert took three (SAVEPOINT, INSERT, RELEASE)
        # and a flush; a key already queued (by this process or another) inserts nothing and returns no row
        stmt = (
            insert(OutboxMessage)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(OutboxMessage)
        )
        return session.scalars(stmt).one_or_none()
    msg = OutboxMessage(**values)
    try:  # pragma: no cover - the product runs on PostgreSQL or SQLite
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
    deferred: bool = False  # issue 8: not tried (held behind an earlier failure); costs no attempt
    rest: Reply | None = None  # issue 8: sent, except this part (a two-message Reply), to be queued
    # issue 8: more to write when the send is recorded, in the same transaction (e.g. where a ticket card was
    # posted); run in a savepoint, so that its failure never makes a delivered message "unsent"
    after: Callable[[Session], None] | None = field(default=None, repr=False, compare=False)


Sender = Callable[[OutboxMessage], Awaitable[SendResult]]


# issue 8: a row's way out: pending -> claimed (taken by a sender, not yet tried) -> sending (its HTTP request
# is about to start; a step's direct reply is written so) -> sent | pending (retry) | failed. A claim ends
# at ``next_attempt_at``: a "claimed" row whose sender died was certainly not sent and goes out again
# without doubt; a "sending" row whose sender died may have reached Telegram (which has no idempotency
# key), so sending it again may deliver it twice; it is sent again all the same (a lost reply is worse
# than a repeated one) and marked, so that such repeats can be told from any other.
UNCONFIRMED = "unconfirmed: the sender stopped during its send; sent again (possibly delivered twice)"


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
                    OutboxMessage.status.in_(("claimed", "sending")) & (OutboxMessage.next_attempt_at <= at),
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
            if row.status == "sending":
                log.warning("outbox message %s: its sender stopped during the send; sending again", row.id)
                row.last_error = UNCONFIRMED + (f" | {row.last_error}" if row.last_error else "")
            row.status = "claimed"
            row.attempts += 1
            row.next_attempt_at = at + CLAIM_TIMEOUT
        s.flush()
        s.expunge_all()
    return rows


def mark_sending(factory: sessionmaker[Session], ids: list[int]) -> set[int]:
    """Mark claimed rows "sending" just before their requests start; returns the ids marked (a row whose
    claim was taken over meanwhile is not, and must not be sent)."""
    if not ids:
        return set()

    def write() -> set[int]:
        with factory.begin() as s:
            res = s.execute(
                update(_OUTBOX)
                .where(_OUTBOX.c.id.in_(ids), _OUTBOX.c.status == "claimed")
                .values(status="sending")
                .returning(_OUTBOX.c.id)
            )
            return set(res.scalars())

    return with_db_retry(write)


class GroupCommit:
    """issue 8: a group commit. Items handed in while a ``write`` is running go together into the next one,
    so under load one transaction serves many callers and alone a caller waits for nobody. ``write(items)``
    runs in ``executor`` (None: asyncio's default threads); each caller gets the whole write's return value,
    or its exception."""

    def __init__(self, write: Callable[[list[Any]], Any], executor: ThreadPoolExecutor | None = None) -> None:
        self.write, self.executor = write, executor
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._lock: asyncio.Lock | None = None  # made in the loop that first uses it

    async def __call__(self, item: Any) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting.append((item, done))
        async with self._lock:
            if not done.done():  # not written by the transaction that just ended: this caller writes
                batch, self._waiting = self._waiting, []
                try:
                    out = await loop.run_in_executor(self.executor, self.write, [i for i, _ in batch])
                except Exception as err:
                    for _, fut in batch:
                        fut.set_exception(err)
                else:
                    for _, fut in batch:
                        fut.set_result(out)
        return await done


def _mark_sending_or_none(factory: sessionmaker[Session], ids: list[int]) -> set[int]:
    """``mark_sending`` for a group of senders; a failure marks none of them (they stay claimed)."""
    try:
        return mark_sending(factory, ids)
    except Exception:
        log.exception("could not mark %d outbox messages as being sent", len(ids))
        return set()


def _apply_result(session: Session, row: OutboxMessage, result: SendResult, at) -> None:
    if result.ok:
        # last_error is kept: it tells what the delivery went through (and a possible double delivery)
        row.status, row.sent_at, row.sent_message_id = "sent", at, result.message_id
        if result.rest is not None:
            enqueue(session, channel=row.channel, chat_id=row.chat_id, reply=result.rest, kind=row.kind)
        return
    if result.deferred:  # issue 8: never tried, so it costs no attempt
        row.attempts = max(0, row.attempts - 1)
        row.status = "pending"
        row.next_attempt_at = at + timedelta(seconds=result.retry_after or 0)
        return
    flag = UNCONFIRMED + " | " if (row.last_error or "").startswith(UNCONFIRMED) else ""
    row.last_error = flag + mask_text(result.error or "")[:400]
    if result.permanent or row.attempts >= MAX_ATTEMPTS:
        row.status = "failed"
        log.warning("outbox message %s failed for good: %s", row.id, row.last_error)
        return
    if result.retry_after is not None:
        backoff = result.retry_after
    elif row.kind == URGENT:  # an emergency notice: 0.5 s, 1 s, 2 s ... (the next flush takes it, within 1 s)
        backoff = min(300.0, URGENT_FIRST_RETRY * 2.0 ** (row.attempts - 1))
    else:
        backoff = min(300.0, 2.0**row.attempts)
    row.status = "pending"
    row.next_attempt_at = at + timedelta(seconds=backoff)


def record_results(factory: sessionmaker[Session], results: dict[int, SendResult]) -> None:
    """Record the outcome of several sends in one transaction (issue 8: retried if the database
    connection drops, so a delivered message is not sent again when its claim ends)."""
    if not results:
        return

    def write() -> None:
        at = now()
        plain = [
            {"sent_id": i, "sent_at_": at, "sent_mid": r.message_id}
            for i, r in results.items()
            if r.ok and r.rest is None
        ]
        others = [i for i, r in results.items() if not (r.ok and r.rest is None)]
        with factory.begin() as s:
            if plain:  # the common case, in one statement (no rows loaded)
                s.execute(_MARK_SENT, plain)
            if others:
                for row in s.scalars(select(OutboxMessage).where(OutboxMessage.id.in_(others))).all():
                    _apply_result(s, row, results[row.id], at)
            for i, r in results.items():
                if r.ok and r.after is not None:
                    try:
                        with s.begin_nested():
                            r.after(s)
                    except Exception as err:
                        if is_disconnect(err):  # the whole transaction is gone: write it again
                            raise
                        log.exception("could not record what followed the send of outbox message %s", i)

    with_db_retry(write)


class ResultRecorder:
    """issue 8: records send results as soon as they are known, sharing transactions: results that come in
    while one transaction is being written go together in the next (a ``GroupCommit``), so recording costs
    little under load and the gap between a send and its record stays a few milliseconds."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        # its own thread: under load the shared worker threads have a queue, and every millisecond a
        # record waits there is a millisecond in which a crash makes a sent message go out again
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-record")
        self._group = GroupCommit(self._write, self._thread)
        # the bot is stopping: a write that meets an outage gives up at once (its messages' claims end and they
        # go out again after the restart, flagged as possibly sent twice)
        self.stopping: Callable[[], bool] = lambda: False

    def _write(self, items: list[tuple[int, SendResult]]) -> None:
        """issue 8: a database outage longer than ``with_db_retry``'s quick retries (a restart takes seconds)
        is waited out, every ``RECORD_RETRY_EVERY`` s for ``RECORD_RETRY_FOR`` s, well inside the messages'
        claims: a delivered message whose record was dropped would be sent a second time when its claim ends.
        Its callers (and the chat's next step) wait meanwhile, as they would for the database anyway."""
        batch = dict(items)  # a message recorded twice meanwhile: its last result
        give_up = time.monotonic() + RECORD_RETRY_FOR
        while True:
            try:
                record_results(self.factory, batch)
                return
            except Exception as err:
                if not is_disconnect(err) or self.stopping() or time.monotonic() >= give_up:
                    log.exception("could not record %d sends", len(batch))  # their claims end: sent again
                    return
                log.warning("database away while recording %d sends; trying again", len(batch))
            time.sleep(RECORD_RETRY_EVERY)

    async def record(self, msg_id: int, result: SendResult) -> None:
        await self._group((msg_id, result))


def record_result(factory: sessionmaker[Session], msg_id: int, result: SendResult) -> None:
    record_results(factory, {msg_id: result})


async def deliver_due(
    factory: sessionmaker[Session],
    channel: str,
    send: Sender,
    limit: int = 50,
    concurrency: int = 8,
    recorder: ResultRecorder | None = None,
) -> int:
    """Send what is due once; returns how many were delivered.

    issue 8: the database work runs in a worker thread (it used to block the event loop, and with it every
    conversation); chats are served concurrently, each chat's messages in order, a chat's later messages
    are held back when one fails, and a 429 stops the whole batch for its retry_after (Telegram's flood
    control is per bot). No send starts after ``SEND_WINDOW``, so every send ends well inside the claim.
    """
    batch = await asyncio.to_thread(claim_batch, factory, channel, limit)
    if not batch:
        return 0
    recorder = recorder or ResultRecorder(factory)
    mark = GroupCommit(partial(_mark_sending_or_none, factory), recorder._thread)  # the senders of one flush
    started = asyncio.get_running_loop().time()
    gate = asyncio.Semaphore(concurrency)
    results: dict[int, SendResult] = {}  # deferred ones, recorded together at the end
    delivered = [0]
    pause: dict[str, float] = {}  # "retry_after" once Telegram asked us to slow down

    async def run_chat(msgs: list[OutboxMessage]) -> None:
        held: SendResult | None = None
        for k, msg in enumerate(msgs):
            late = asyncio.get_running_loop().time() - started > SEND_WINDOW.total_seconds()
            if held is not None or pause or late:
                wait = pause.get("retry_after") or (held.retry_after if held else None)
                results[msg.id] = SendResult(ok=False, deferred=True, retry_after=wait)
                continue
            async with gate:
                if msg.id not in await mark(msg.id):
                    # not ours any more, or the database is away: this one and the chat's later ones stay
                    # claimed, untouched, and are taken again (in order) when the claim ends
                    log.warning("outbox: %d messages for one chat left to their claim's end", len(msgs) - k)
                    return
                try:
                    result = await send(msg)
                except Exception as err:  # a bug in a sender must not lose the message
                    log.exception("sender crashed on outbox message %s", msg.id)
                    result = SendResult(ok=False, error=repr(err))
            # recorded at once, not with the batch: a crash between a send and its record means the
            # message is sent again when its claim ends, so that gap must stay short
            await recorder.record(msg.id, result)
            delivered[0] += int(result.ok)
            if result.retry_after is not None:
                pause["retry_after"] = max(pause.get("retry_after", 0.0), result.retry_after)
            if not result.ok and not result.permanent:
                held = result

    chats: dict[str, list[OutboxMessage]] = {}
    for msg in batch:
        chats.setdefault(msg.chat_id, []).append(msg)
    await asyncio.gather(*(run_chat(msgs) for msgs in chats.values()))
    await asyncio.to_thread(record_results, factory, results)  # the deferred ones
    return delivered[0]


def pending_count(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return len(s.scalars(select(OutboxMessage.id).where(OutboxMessage.status != "sent")).all())
