"""The inbox (issue 8): every update taken from Telegram is processed exactly once, across crashes.

Telegram forgets an update once the bot has acknowledged it (the next getUpdates offset, or a webhook's
200), and python-telegram-bot acknowledges as soon as updates are queued, before they are processed. So:

1. ``record_updates`` writes each update to ``inbound_updates`` *before* it is acknowledged;
2. ``Step.claim`` marks it done in the same transaction as the conversation step it causes, and a
   replayed update (Telegram sending it again after a restart, or our own replay) finds it done and is
   skipped;
3. ``Step.keep_replies`` writes the step's replies to the outbox in that transaction too, claimed for the
   direct send that follows: if the bot dies before sending, the outbox delivers them when the claim ends;
4. ``pending_updates`` hands a restarted (or surviving) bot the updates recorded but never done;
5. staff steps (bot/staff.py runs its own transaction) get the same: ``StepSessions`` gives the step a
   session that has already claimed the update and holds its commit until the replies are kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Update, bindparam, delete, func, null, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, PendingRollbackError
from sqlalchemy.orm import Session, sessionmaker

from bot.messages import URGENT, Reply
from models.clock import now
from models.db import conflict_insert
from models.tables import InboundUpdate, OutboxMessage

log = logging.getLogger(__name__)

# How long a reply written by a step stays reserved for the direct send that follows it. Longer than the
# slowest send can take (the Telegram request timeouts in bot/telegram_app.py add up to ~30 s), so the
# outbox never sends a reply the direct path is still sending; short enough that a reply orphaned by a
# crash goes out within a minute.
REPLY_CLAIM = timedelta(seconds=45)
MAX_REPLAYS = 3  # an update whose step crashed the bot this often is given up (and logged)
T = TypeVar("T")


def is_disconnect(err: BaseException) -> bool:
    """A database error that a fresh connection may not have (dropped connection, restart, lock)."""
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        return True
    if isinstance(err, PendingRollbackError) and "invalid transaction" in str(err):
        return True  # the connection dropped earlier in this transaction and the error was handled there
    return isinstance(err, (OperationalError, InterfaceError))


def with_db_retry(fn: Callable[[], T], *, attempts: int = 4, first_wait: float = 0.05) -> T:
    """Run a whole transaction again when the database connection dropped under it (it was rolled back,
    so running it again is safe). Blocking: call it in a worker thread."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts - 1 or not is_disconnect(err):
                raise
            log.warning("database connection lost (%s); retrying", type(err).__name__)
            time.sleep(first_wait * 3**attempt)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- recording


def _insert_ignore(session: Session, rows: list[dict[str, Any]]) -> None:
    insert = conflict_insert(session)
    if insert is None:  # pragma: no cover - the product runs on PostgreSQL or SQLite
        for row in rows:
            if session.get(InboundUpdate, row["update_id"]) is None:
                session.add(InboundUpdate(**row))
        return
    # one cached statement for any number of rows (``.values(rows)`` compiled a new one per batch size)
    session.execute(insert(InboundUpdate).on_conflict_do_nothing(index_elements=["update_id"]), rows)


def record_updates(factory: sessionmaker[Session], items: Iterable[tuple[int, str | None, dict]]) -> int:
    """Record updates as pending (ignoring ids already known); one transaction. Returns how many."""
    at = now()
    rows = [
        dict(update_id=uid, chat_id=chat, payload=payload, received_at=at, attempts=0)
        for uid, chat, payload in items
    ]
    if not rows:
        return 0
    with factory.begin() as s:
        _insert_ignore(s, rows)
    return len(rows)


def mark_done(factory: sessionmaker[Session], update_id: int, outcome: str) -> bool:
    """Mark an update done outside a conversation step (flood notice, ignored, failed, group claim).
    Returns False when it was already done."""
    with factory.begin() as s:
        return _claim(s, update_id, None, outcome)[0]


class Overtaken(Exception):
    """The chat has an earlier update still pending (its step is held up by an outage in another bot process,
    or that process died): the channel runs it first, then this one (``Step.claim``)."""

    def __init__(self, chat_id: str, update_id: int) -> None:
        super().__init__(f"chat {chat_id} has updates before {update_id} still pending")


@lru_cache(maxsize=4)
def _claim_statement(locked: bool, count_older: bool) -> Update:
    """The claim's UPDATE, built once (issue 8: building it and its cache key anew for every step cost more
    CPU than running it). A Core UPDATE of the table, not an ORM one of the class (the ORM's bulk-update path
    cost more CPU than the statement; no InboundUpdate object of this update is loaded in a step's session).
    Parameters: ``b_update_id``, ``b_at``, ``b_outcome``, ``lock_key`` (``locked``), ``b_chat_id`` (``count_older``)."""
    table = InboundUpdate.__table__
    query = update(table).where(table.c.update_id == bindparam("b_update_id"), table.c.done_at.is_(None))
    if locked:
        query = query.where(func.pg_advisory_xact_lock(bindparam("lock_key", type_=BigInteger)).is_not(None))
    query = query.values(
        done_at=bindparam("b_at", type_=table.c.done_at.type),
        outcome=bindparam("b_outcome", type_=table.c.outcome.type),
        payload=null(),
    )
    if count_older:  # in the claim's own round trip (the pending rows are few: ix_inbound_pending)
        earlier = table.alias("earlier")
        query = query.returning(
            select(func.count())
            .select_from(earlier)
            .where(
                earlier.c.chat_id == bindparam("b_chat_id"),
                earlier.c.done_at.is_(None),
                earlier.c.update_id < bindparam("b_update_id"),
            )
            .scalar_subquery()
        )
    return query


def _claim(
    session: Session,
    update_id: int,
    chat_id: str | None,
    outcome: str,
    lock_key: int | None = None,
    count_older: bool = False,
) -> tuple[bool, int]:
    """Mark the update done: (False, 0) when it was done before, else (True, how many earlier updates of the
    chat are still pending; counted only with ``count_older``, by the claiming statement itself).
    ``lock_key`` (PostgreSQL): the chat's advisory lock, taken by the claiming UPDATE itself (issue 8: one
    round trip, not two; PostgreSQL evaluates it in the filter of the one row the primary key finds), and on
    its own when no pending row matched."""
    query = _claim_statement(lock_key is not None, count_older)
    params = {"b_update_id": update_id, "b_at": now(), "b_outcome": outcome, "lock_key": lock_key, "b_chat_id": chat_id}
    if count_older:
        row = session.execute(query, params).first()
        if row is not None:
            return True, row[0]
    elif session.execute(query, params).rowcount == 1:
        return True, 0
    if lock_key is not None:
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
    if session.get(InboundUpdate, update_id) is not None:
        return False, 0  # done before: a replay
    try:  # never recorded (it came by a path without the inbox): record it as done now
        with session.begin_nested():
            session.add(InboundUpdate(update_id=update_id, chat_id=chat_id, done_at=now(), outcome=outcome))
        return True, 0
    except IntegrityError:
        return False, 0


def chat_lock_key(channel: str, chat_id: str) -> int:
    """A stable signed 64-bit number for a chat (PostgreSQL advisory lock key)."""
    digest = hashlib.blake2b(f"{channel}:{chat_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class Step:
    """One update's conversation step; pass it to ``handle_citizen(..., step=...)``."""

    update_id: int
    chat_id: str
    channel: str = "telegram"
    outbox_ids: list[int] = field(default_factory=list)
    replayed: bool = False
    state: str | None = None  # the conversation's state after the step (a hint for the channel)
    in_order: bool = False  # raise Overtaken when an earlier update of the chat is pending (see ``claim``)

    def claim(self, session: Session) -> bool:
        """First statement of the step's transaction: False when the update was already processed.

        On PostgreSQL it also takes a transaction lock on the chat, so that two bot processes (webhooks
        behind a load balancer) never run two steps of one conversation at the same time. With
        ``in_order``, it raises ``Overtaken`` (rolling the claim back with the transaction) when an earlier
        update of the chat is still pending, so that the channel can run that one first."""
        self.outbox_ids = []
        key = chat_lock_key(self.channel, self.chat_id) if session.bind.dialect.name == "postgresql" else None
        claimed, older = _claim(session, self.update_id, self.chat_id, "done", key, self.in_order)
        if older:
            raise Overtaken(self.chat_id, self.update_id)
        self.replayed = not claimed
        return not self.replayed

    def keep_replies(self, session: Session, replies: list[Reply]) -> None:
        """Last statement of the step's transaction: the replies, durable and reserved for the direct send."""
        at = now()
        rows = [
            OutboxMessage(
                channel=self.channel,
                chat_id=str(r.chat_id or self.chat_id),
                text=r.text,
                markup=r.to_markup(),
                kind=URGENT if r.urgent else "reply",
                edit_message_id=r.edit_message_id,
                status="sending",
                attempts=1,
                next_attempt_at=at + REPLY_CLAIM,
                created_at=at,
            )
            for r in replies
        ]
        session.add_all(rows)
        session.flush()
        self.outbox_ids = [row.id for row in rows]


# --------------------------------------------------------------------------- recovery


def pending_before(factory: sessionmaker[Session], chat_id: str, update_id: int) -> list[dict[str, Any]]:
    """Payloads of the chat's updates before ``update_id`` still pending, oldest first (``Overtaken``)."""
    with factory() as s:
        return list(
            s.scalars(
                select(InboundUpdate.payload)
                .where(
                    InboundUpdate.chat_id == chat_id,
                    InboundUpdate.done_at.is_(None),
                    InboundUpdate.update_id < update_id,
                    InboundUpdate.payload.is_not(None),
                )
                .order_by(InboundUpdate.update_id)
            )
        )


def pending_updates(
    factory: sessionmaker[Session], received_before: datetime, limit: int = 500
) -> list[dict[str, Any]]:
    """Payloads of updates recorded by ``received_before`` and never done (their bot died), oldest
    first; each call counts as a replay, and an update replayed ``MAX_REPLAYS`` times is given up."""
    out: list[dict[str, Any]] = []
    with factory.begin() as s:
        rows = s.scalars(
            select(InboundUpdate)
            .where(InboundUpdate.done_at.is_(None), InboundUpdate.received_at <= received_before)
            .order_by(InboundUpdate.update_id)
            .limit(limit)
        ).all()
        for row in rows:
            if row.attempts >= MAX_REPLAYS or not row.payload:
                log.error(
                    "update %s could not be processed after %s replays; given up", row.update_id, row.attempts
                )
                row.done_at, row.outcome, row.payload = now(), "failed", None
                continue
            row.attempts += 1
            out.append(dict(row.payload))
    return out


def prune(factory: sessionmaker[Session], older_than: timedelta = timedelta(days=2)) -> int:
    """Forget done updates after a while (Telegram never re-sends an update older than a day)."""
    with factory.begin() as s:
        res = s.execute(
            delete(InboundUpdate).where(
                InboundUpdate.done_at.is_not(None), InboundUpdate.done_at < now() - older_than
            )
        )
    return res.rowcount or 0


# --------------------------------------------------------------------------- staff steps (issue 8)


class Replayed(Exception):
    """The update was processed before (raised instead of opening the step's session)."""


class HeldSession(Session):
    """The session of one staff step. bot/staff.py opens, commits and closes its session itself; this one
    holds the commit and the close (a commit only flushes) until ``StepSessions.finish`` has added the step's
    replies, so the step, its "processed" mark and its replies commit together, as a citizen step's do."""

    held = True
    rolled_back = False

    def commit(self) -> None:
        if self.held:
            self.flush()
            return
        super().commit()

    def rollback(self) -> None:
        self.rolled_back = True  # the claim went with it: ``finish`` claims again
        super().rollback()

    def close(self) -> None:
        if not self.held:
            super().close()


class StepSessions:
    """A session factory for one staff step (``handle_group(replace(services, sessions=StepSessions(...)))``):
    the session it makes has already claimed the update (``Step.claim``: a replay raises ``Replayed``
    before the step runs); ``finish(replies)`` keeps the replies and commits; ``discard()`` after a failure."""

    def __init__(self, factory: sessionmaker[Session], step: Step) -> None:
        self.factory, self.step = factory, step
        self.session: HeldSession | None = None

    def __call__(self, **kw: Any) -> Session:
        if self.session is not None:
            raise RuntimeError("one session per staff step")
        self.session = HeldSession(**{**self.factory.kw, **kw})
        if not self.step.claim(self.session):
            self.discard()
            raise Replayed(self.step.update_id)
        return self.session

    def finish(self, replies: list[Reply]) -> list[Reply]:
        """Commit the step with its replies; [] when another process did it meanwhile (after a rollback)."""
        s = self.session
        if s is None:  # the step needed no database
            with self.factory.begin() as s2:
                if not self.step.claim(s2):
                    return []
                self.step.keep_replies(s2, replies)
            return replies
        try:
            if s.rolled_back and not self.step.claim(s):
                s.held = False
                s.rollback()
                return []
            self.step.keep_replies(s, replies)
            s.held = False
            s.commit()
            return replies
        finally:
            self.discard()

    def discard(self) -> None:
        if self.session is not None:
            self.session.held = False
            self.session.close()  # rolls back what was not committed
