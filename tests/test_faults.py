"""Faults in CI, small and fast: Telegram outages, a bot that dies and is restarted, an update Telegram gives
again, a PostgreSQL connection dropped mid-conversation. Every message is delivered exactly once and no
request is lost or done twice. Time in the outbox moves with the ``clock`` fixture; the bot itself is the real
python-telegram-bot application against the fake Bot API."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.exc import OperationalError

from bot.citizen import handle_citizen
from bot.fake_bot_api import FakeBotAPI
from bot.inbox import Step, record_updates
from bot.messages import Incoming, Reply
from bot.outbox import ResultRecorder, SendResult, claim_batch, enqueue
from bot.services import Services
from bot.telegram_app import FOLLOW_UP, BatchingTriage, build_application
from models.catalog import load_catalog
from models.tables import ChatBinding, InboundUpdate, OutboxMessage, Staff, Ticket, TicketEvent
from tests.conftest import PG_URL
from tests.test_citizen_flow import fake_triage, to_confirm

TOKEN = "123456:FAULT-TOKEN"
CITIZEN = 7101
UNIT_CHAT = -100


@pytest.fixture
def services(db):
    with db.begin() as s:
        load_catalog(s)
        s.add(ChatBinding(chat_id=UNIT_CHAT, unit_code="chengguan"))
        s.add(ChatBinding(chat_id=-900, unit_code="center"))
    return Services(sessions=db, triage=fake_triage, policy_name="quxian")


class Bot:
    """One run of the bot process: a fresh Application on the shared database and fake Telegram."""

    def __init__(self, services: Services, api: FakeBotAPI) -> None:
        self.app, self.hotline = build_application(
            services, TOKEN, base_url=api.base_url, outbox_interval=0.1
        )

    async def __aenter__(self) -> Bot:
        await self.app.initialize()
        await self.app.start()
        await self.app.updater.start_polling(poll_interval=0.0, timeout=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.app.updater.stop()
        await self.app.stop()
        await self.app.shutdown()


async def until(predicate, timeout: float = 15.0, tick=None):
    """Wait for a condition the bot brings about; ``tick`` runs between looks (e.g. moving the clock)."""
    deadline = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(predicate)):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        if tick is not None:
            tick()
        await asyncio.sleep(0.05)
    return value


def delivered(api: FakeBotAPI) -> Counter:
    return Counter((s.chat_id, s.text) for s in api.sent if s.text != FOLLOW_UP)


def all_sent(db) -> bool:
    with db() as s:
        return all(m.status == "sent" for m in s.scalars(select(OutboxMessage)))


def test_the_outbox_survives_an_outage_and_a_restart_and_delivers_each_message_once(services, db, clock):
    notices = {str(-1000 - i): f"工单 20261123-{i:06d} 即将超期，请及时办理。" for i in range(12)}
    with db.begin() as s:
        for chat, body in notices.items():
            enqueue(s, channel="telegram", chat_id=chat, reply=Reply(body), kind="urge")
    api = FakeBotAPI().start()
    api.fail(500, count=20)  # Telegram is down …
    api.fail(429, count=4, retry_after=1)  # … then asks the bot to slow down

    async def scenario():
        async with Bot(services, api):
            api.message(CITIZEN, "/start")  # a citizen writes during the outage
            await until(lambda: api.state.calls.count("sendMessage") >= 13)
            assert not delivered(api)
        # the first bot is gone; a sender that claimed three messages died before sending them
        clock.advance(seconds=3)
        orphans = {m.id for m in claim_batch(db, "telegram", limit=3)}
        assert len(orphans) == 3
        async with Bot(services, api):
            # retries come due as (fake) time passes; the orphans when their claim runs out
            await until(lambda: all_sent(db), timeout=20, tick=lambda: clock.advance(seconds=5))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    got = delivered(api)
    for chat, body in notices.items():
        assert got[(chat, body)] == 1, (chat, got[(chat, body)])
    welcome = [k for k in got if k[0] == str(CITIZEN)]
    assert len(welcome) == 1 and got[welcome[0]] == 1 and "12345" in welcome[0][1]
    assert sum(got.values()) == len(notices) + 1


def test_rows_of_a_dead_sender_go_out_again_and_a_possibly_sent_one_is_flagged(services, db, clock):
    """issue 8: a claimed row is marked "sending" just before its request; when its sender dies, a row it had
    not started is certainly unsent, one it had started may have reached Telegram: both are sent when the
    claim runs out, the second flagged as possibly delivered twice."""
    from bot.outbox import UNCONFIRMED, mark_sending

    with db.begin() as s:
        for i in range(2):
            enqueue(s, channel="telegram", chat_id=str(-2000 - i), reply=Reply(f"通知 {i}"), kind="urge")
    claimed = claim_batch(db, "telegram")
    started = claimed[0].id
    assert mark_sending(db, [started]) == {started}  # the dead sender's request for this one had begun
    with db() as s:
        assert {m.id: m.status for m in s.scalars(select(OutboxMessage))} == {
            started: "sending",
            claimed[1].id: "claimed",
        }
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(services, api):
            await asyncio.sleep(0.5)
            assert not api.sent, "claimed rows wait for their claim to end"
            clock.advance(seconds=61)
            await until(lambda: all_sent(db), timeout=20)

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    assert sorted(delivered(api).values()) == [1, 1]
    with db() as s:
        rows = {m.id: m for m in s.scalars(select(OutboxMessage))}
    assert rows[started].last_error.startswith(UNCONFIRMED)
    assert rows[claimed[1].id].last_error is None


def test_a_replayed_update_neither_duplicates_the_ticket_nor_loses_its_reply(services, db, clock):
    say = Incoming(channel="telegram", chat_id=str(CITIZEN), user_id=str(CITIZEN), text="烧烤摊油烟太大")
    handle_citizen(services, say)
    token = to_confirm(services, db, user=str(CITIZEN))
    api = FakeBotAPI().start()
    update_id = api.press(CITIZEN, f"d:ok:{token}")
    # the bot that took this update recorded it, ran the step (the ticket exists, the reply is reserved for
    # its direct send) and died before sending and before telling Telegram it had the update
    record_updates(db, [(update_id, str(CITIZEN), api.state.updates[-1])])
    step = Step(update_id, str(CITIZEN))
    confirm = Incoming(
        channel="telegram", chat_id=str(CITIZEN), user_id=str(CITIZEN), callback=f"d:ok:{token}"
    )
    [reply] = handle_citizen(services, confirm, step=step)
    assert "已受理" in reply.text

    async def scenario():
        async with Bot(services, api):
            await until(lambda: api.state.confirmed > update_id)  # Telegram gave it again; it is now taken
            await until(lambda: any(s.chat_id == str(UNIT_CHAT) for s in api.sent))  # the outbox runs
            assert not api.sent_to(CITIZEN), "the replay sends nothing itself"
            clock.advance(seconds=50)  # the dead bot's reservation runs out
            await until(lambda: api.sent_to(CITIZEN))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 1
    got = delivered(api)
    assert [n for (chat, body), n in got.items() if chat == str(CITIZEN)] == [1]
    assert [n for (chat, body), n in got.items() if chat == str(UNIT_CHAT)] == [1]


def test_an_update_taken_but_never_processed_is_processed_after_a_restart(services, db, clock):
    api = FakeBotAPI().start()
    update_id = api.message(CITIZEN, "/start")
    # the dead bot recorded the update and told Telegram it had it, then died before processing it
    record_updates(db, [(update_id, str(CITIZEN), api.state.updates[-1])])
    api.state.confirmed = update_id + 1
    api.state.updates.clear()

    async def scenario():
        async with Bot(services, api):
            await until(lambda: api.sent_to(CITIZEN))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    assert len(api.sent_to(CITIZEN)) == 1 and "12345" in api.sent_to(CITIZEN)[0].text
    with db() as s:
        row = s.get(InboundUpdate, update_id)
        assert row.done_at is not None and row.payload is None, "done, and the raw update is erased"


STAFF = 8801


def _dispatched_ticket(services, db) -> Ticket:
    """A citizen's confirmed request, dispatched to the unit of UNIT_CHAT, and a handler of that unit."""
    say = Incoming(channel="telegram", chat_id=str(CITIZEN), user_id=str(CITIZEN), text="烧烤摊油烟太大")
    handle_citizen(services, say)
    token = to_confirm(services, db, user=str(CITIZEN))
    press = Incoming(channel="telegram", chat_id=str(CITIZEN), user_id=str(CITIZEN), callback=f"d:ok:{token}")
    handle_citizen(services, press)
    with db.begin() as s:
        s.add(Staff(user_id=STAFF, display_name="李科员", unit_code="chengguan", role="handler"))
        ticket = s.scalars(select(Ticket)).one()
        s.expunge(ticket)
    assert ticket.status == "dispatched"
    return ticket


def _signs(db, ticket_id: int) -> int:
    with db() as s:
        return len(
            s.scalars(
                select(TicketEvent).where(TicketEvent.ticket_id == ticket_id, TicketEvent.action == "sign")
            ).all()
        )


def test_a_staff_press_taken_but_never_processed_is_done_once_after_a_restart(services, db, clock):
    """issue 8: staff steps go through the inbox like citizen steps (they used to be marked done before
    they ran, so a crash in between lost the press)."""
    from sqlalchemy.exc import OperationalError

    import bot.staff

    ticket = _dispatched_ticket(services, db)
    api = FakeBotAPI().start()
    real = bot.staff.handle_group
    started = []

    def cut_off(svc, msg):
        """The step starts (its session is open) and never finishes: the database goes away under it."""
        with svc.sessions() as session:
            session.execute(select(Ticket.id))
            started.append(msg.callback)
            raise OperationalError("UPDATE ticket_units …", {}, ConnectionResetError("server closed"))

    async def scenario():
        bot.staff.handle_group = cut_off
        try:
            async with Bot(services, api):
                update_id = api.press(UNIT_CHAT, f"u:sign:{ticket.id}", user_id=STAFF, chat_type="supergroup")
                # tried again (bot/inbox.py with_db_retry) and given up; the person is told to wait
                await until(
                    lambda: len(started) >= 4 and any("稍后" in m.text for m in api.sent_to(UNIT_CHAT))
                )
        finally:
            bot.staff.handle_group = real
        with db() as s:
            assert s.get(InboundUpdate, update_id).done_at is None, (
                "a step that never committed stays pending"
            )
        async with Bot(services, api):  # the restarted bot replays it
            await until(lambda: any("签收人" in s.text for s in api.sent_to(UNIT_CHAT)))
            await until(lambda: all_sent(db))
        return update_id

    try:
        update_id = asyncio.run(scenario())
    finally:
        api.stop()
    assert _signs(db, ticket.id) == 1
    signed = [s for s in api.sent_to(UNIT_CHAT) if "签收人" in s.text]
    assert len(signed) == 1
    assert not any("无需重复签收" in s.text for s in api.sent)
    with db() as s:
        row = s.get(InboundUpdate, update_id)
        assert row.done_at is not None and row.outcome == "done" and row.payload is None


def test_a_replayed_staff_press_is_not_done_twice_and_its_reply_is_not_lost(services, db, clock):
    """The step committed (with its reply reserved in the outbox) and the bot died before sending the reply
    and before Telegram heard it had the update: Telegram gives the press again, the restarted bot skips it,
    and the reserved reply goes out once when the dead bot's reservation ends."""
    from dataclasses import replace

    from bot.inbox import StepSessions
    from bot.staff import handle_group

    ticket = _dispatched_ticket(services, db)
    api = FakeBotAPI().start()
    update_id = api.press(UNIT_CHAT, f"u:sign:{ticket.id}", user_id=STAFF, chat_type="supergroup")
    record_updates(db, [(update_id, str(UNIT_CHAT), api.state.updates[-1])])
    press = Incoming(
        channel="telegram",
        chat_id=str(UNIT_CHAT),
        user_id=str(STAFF),
        chat_type="supergroup",
        callback=f"u:sign:{ticket.id}",
        callback_message_id=1,
    )
    holder = StepSessions(db, Step(update_id, str(UNIT_CHAT)))
    [reply] = holder.finish(handle_group(replace(services, sessions=holder), press))
    assert "签收人" in reply.text
    assert _signs(db, ticket.id) == 1

    async def scenario():
        async with Bot(services, api):
            await until(lambda: api.state.confirmed > update_id)  # taken again, and skipped
            await until(lambda: any(s.chat_id == str(CITIZEN) for s in api.sent))  # the outbox runs
            assert not any("签收人" in s.text for s in api.sent), "the replay sends nothing itself"
            clock.advance(seconds=50)  # the dead bot's reservation runs out
            await until(lambda: any("签收人" in s.text for s in api.sent))
            await until(lambda: all_sent(db))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    assert _signs(db, ticket.id) == 1
    assert len([s for s in api.sent_to(UNIT_CHAT) if "签收人" in s.text]) == 1
    assert not any("无需重复签收" in s.text for s in api.sent)


def test_a_refused_staff_step_still_marks_its_update_done(services, db, clock):
    """A refusal rolls the step back (bot/staff.py); the update is claimed again with the refusal's reply."""
    from dataclasses import replace

    from bot.inbox import StepSessions
    from bot.staff import handle_group

    ticket = _dispatched_ticket(services, db)
    replies = []
    for update_id in (900001, 900002):  # the second press of 签收 is refused
        record_updates(db, [(update_id, str(UNIT_CHAT), {"update_id": update_id})])
        press = Incoming(
            channel="telegram",
            chat_id=str(UNIT_CHAT),
            user_id=str(STAFF),
            chat_type="supergroup",
            callback=f"u:sign:{ticket.id}",
        )
        holder = StepSessions(db, Step(update_id, str(UNIT_CHAT)))
        replies += holder.finish(handle_group(replace(services, sessions=holder), press))
    assert "无需重复签收" in replies[-1].text
    assert _signs(db, ticket.id) == 1
    with db() as s:
        for update_id in (900001, 900002):
            assert s.get(InboundUpdate, update_id).done_at is not None
        kept = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == str(UNIT_CHAT))).all()
        assert any("无需重复签收" in m.text for m in kept), "the refusal is kept for its direct send"


async def _write_a_report(api: FakeBotAPI):
    """The citizen writes a complete report; returns the summary with its confirm button."""
    api.message(CITIZEN, "幸福路烧烤摊油烟太大，今天晚上")
    return await asyncio.to_thread(api.wait_text, CITIZEN, "请确认")


@pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL")
@pytest.mark.parametrize("pre_ping", [True, False], ids=["pinged-pool", "bot-pool-without-ping"])
def test_a_postgresql_connection_dropped_mid_conversation_loses_nothing(services, db, engine, pre_ping):
    """The Telegram channel's pool does not ping connections before use (models/db.py): a database restart is
    met by the retried transaction instead, and must lose nothing either."""
    if not pre_ping:
        from dataclasses import replace

        from sqlalchemy.orm import sessionmaker

        with engine.connect() as c:
            path = c.execute(text("SHOW search_path")).scalar_one()
        engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={path}"}, pool_pre_ping=False)
        services = replace(services, sessions=sessionmaker(engine, expire_on_commit=False))
    admin = create_engine(PG_URL)
    pids: set[int] = set()
    fired: list[str] = []

    def on_connect(dbapi_conn, _record) -> None:
        pids.add(dbapi_conn.info.backend_pid)

    def kill_mid_transaction(conn, _cursor, statement, *_args) -> None:
        """Right before the ticket is written, the server drops this very connection."""
        if statement.startswith("INSERT INTO tickets") and not fired:
            fired.append(statement)
            terminate({conn.connection.dbapi_connection.info.backend_pid})

    def terminate(which: set[int]) -> None:
        with admin.connect() as c:
            for pid in which:
                c.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    engine.dispose()  # from here on every connection of this test is known
    event.listen(engine, "connect", on_connect)
    event.listen(engine, "before_cursor_execute", kill_mid_transaction)
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(services, api):
            summary = await _write_a_report(api)
            terminate(set(pids))  # every idle connection in the pool dies (a database restart)
            api.press(CITIZEN, dict(summary.buttons())["✅ 确认提交"])
            await asyncio.to_thread(api.wait_text, CITIZEN, "已受理")
            await asyncio.to_thread(api.wait_text, UNIT_CHAT, "工单")

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
        event.remove(engine, "connect", on_connect)
        event.remove(engine, "before_cursor_execute", kill_mid_transaction)
        admin.dispose()
        if not pre_ping:
            engine.dispose()
    assert fired, "the connection was dropped in the middle of the step"
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 1
        assert s.scalars(select(InboundUpdate).where(InboundUpdate.done_at.is_(None))).all() == []
    got = delivered(api)
    assert sum(n for (chat, body), n in got.items() if "已受理" in body) == 1
    assert [n for (chat, body), n in got.items() if chat == str(UNIT_CHAT)] == [1]


@pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL")
def test_a_connection_dropped_while_recording_a_sent_card_does_not_send_the_card_again(services, db, engine):
    """The unit's card reached Telegram; recording it (and where the card lives, for later edits) hits a dropped
    connection. The record is written again on a fresh connection: the row ends "sent", not "sending" (which
    would be sent a second time when its claim runs out)."""
    from models.tables import TicketCard

    admin = create_engine(PG_URL)
    fired: list[str] = []

    def kill_mid_record(conn, _cursor, statement, *_args) -> None:
        if statement.startswith("INSERT INTO ticket_cards") and not fired:
            fired.append(statement)
            with admin.connect() as c:
                c.execute(
                    text("SELECT pg_terminate_backend(:pid)"),
                    {"pid": conn.connection.dbapi_connection.info.backend_pid},
                )

    event.listen(engine, "before_cursor_execute", kill_mid_record)
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(services, api):
            summary = await _write_a_report(api)
            api.press(CITIZEN, dict(summary.buttons())["✅ 确认提交"])
            await asyncio.to_thread(api.wait_text, UNIT_CHAT, "工单")

            def recorded() -> bool:
                with db() as s:
                    rows = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == str(UNIT_CHAT))).all()
                    return bool(rows) and all(r.status == "sent" for r in rows)

            deadline = time.monotonic() + 10
            while not recorded():
                assert time.monotonic() < deadline, "the sent card was never recorded as sent"
                await asyncio.sleep(0.05)

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
        event.remove(engine, "before_cursor_execute", kill_mid_record)
        admin.dispose()
    assert fired, "the connection was dropped while the card was recorded"
    with db() as s:
        assert len(s.scalars(select(TicketCard).where(TicketCard.chat_id == UNIT_CHAT)).all()) == 1
    assert [n for (chat, body), n in delivered(api).items() if chat == str(UNIT_CHAT)] == [1]


class DatabaseAway:
    """A session factory whose database is away for the first ``n`` transactions (a restart, as the bot sees it)."""

    def __init__(self, factory, n: int) -> None:
        self.factory, self.left = factory, n

    def begin(self):
        if self.left > 0:
            self.left -= 1
            raise OperationalError("COMMIT", {}, ConnectionError("the database system is starting up"))
        return self.factory.begin()


def test_a_send_whose_record_meets_a_database_restart_is_recorded_after_it_and_not_sent_again(
    services, db, clock, monkeypatch
):
    """issue 8: the message reached Telegram; the database is away for longer than the quick retries (a restart
    takes seconds). The record waits it out, so the message is not sent a second time when its claim ends."""
    import bot.outbox

    monkeypatch.setattr(bot.outbox, "RECORD_RETRY_EVERY", 0.01)
    with db.begin() as s:
        enqueue(s, channel="telegram", chat_id="-1001", reply=Reply("工单 20261123-000001 即将超期"), kind="urge")
    [row] = claim_batch(db, "telegram", limit=1)
    away = DatabaseAway(db, n=6)  # with_db_retry tries a transaction 4 times
    asyncio.run(ResultRecorder(away).record(row.id, SendResult(ok=True, message_id=501)))
    assert away.left == 0
    with db() as s:
        got = s.get(OutboxMessage, row.id)
        assert (got.status, got.sent_message_id) == ("sent", 501)
    clock.advance(minutes=5)  # long past the claim
    assert claim_batch(db, "telegram", limit=10) == []


def test_a_send_record_gives_up_at_once_when_the_bot_is_stopping(services, db, monkeypatch):
    import bot.outbox

    monkeypatch.setattr(bot.outbox, "RECORD_RETRY_EVERY", 0.01)
    with db.begin() as s:
        enqueue(s, channel="telegram", chat_id="-1001", reply=Reply("催办"), kind="urge")
    [row] = claim_batch(db, "telegram", limit=1)
    away = DatabaseAway(db, n=100)
    recorder = ResultRecorder(away)
    recorder.stopping = lambda: True
    asyncio.run(recorder.record(row.id, SendResult(ok=True, message_id=501)))
    assert away.left == 96  # the quick retries only: the restart sends it again, flagged
    with db() as s:
        assert s.get(OutboxMessage, row.id).status != "sent"


class SlowModel:
    """A triage model that answers batches (``answer`` per text: an echo by default); the first batch is held
    until told to go, as a model busy with a peak of messages."""

    def __init__(self, fail: bool = False, answer=None) -> None:
        self.batches: list[list[str]] = []
        self.go = threading.Event()
        self.fail = fail
        self.answer = answer or (lambda t: {"verdict": "accept", "echo": t})

    def __call__(self, text: str) -> dict:
        return self.triage_many([text])[0]

    def triage_many(self, texts: list[str]) -> list[dict]:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.go.wait(10)
        if self.fail:
            raise RuntimeError("model file unreadable")
        return [self.answer(t) for t in texts]


def _soon(predicate, timeout: float = 10) -> None:
    """Wait (in a plain thread) until ``predicate()`` holds, e.g. until the model's first batch is inside it."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)


def _call_together(model: SlowModel, n: int) -> tuple[BatchingTriage, list]:
    triage = BatchingTriage.wrap(model)
    out: list = [None] * n

    def call(i: int) -> None:
        try:
            out[i] = triage(f"诉求{i}")
        except Exception as err:
            out[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    threads[0].start()
    _soon(lambda: model.batches)  # until the first call is inside the model
    for t in threads[1:]:
        t.start()
    _soon(lambda: len(triage._queue) >= n - 1)  # until the others are queued behind it
    model.go.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a step hung"
    return triage, out


def test_steps_arriving_together_share_one_model_call_and_each_gets_its_own_answer():
    model = SlowModel()
    _, out = _call_together(model, 8)
    assert [r["echo"] for r in out] == [f"诉求{i}" for i in range(8)]
    assert [len(b) for b in model.batches] == [1, 7], "the seven that waited went in one batch"


def test_a_failing_triage_model_fails_each_step_without_hanging_the_others():
    model = SlowModel(fail=True)
    triage, out = _call_together(model, 5)
    assert all(isinstance(r, RuntimeError) for r in out)
    assert not triage._busy and not triage._queue


def test_texts_prefetched_as_they_arrive_are_triaged_together_and_each_step_gets_its_own():
    """issue 8: the channel starts triage when an update arrives; messages arriving while the model is busy
    go in the next batch together, and a step asking for its text later gets that result, not a new call."""
    model = SlowModel()
    triage = BatchingTriage.wrap(model)
    triage.prefetch("诉求0")  # the runner takes it and holds (SlowModel's first batch waits)
    _soon(lambda: model.batches)
    for i in range(1, 6):
        triage.prefetch(f"诉求{i}")
    model.go.set()
    assert [triage(f"诉求{i}")["echo"] for i in range(6)] == [f"诉求{i}" for i in range(6)]
    assert [len(b) for b in model.batches] == [1, 5], "one call for the first, one for the five behind it"
    assert triage("诉求9")["echo"] == "诉求9"  # not prefetched: triaged when asked
    assert not triage._prefetched and not triage._queue


def test_a_step_waits_for_its_prefetched_triage_without_holding_a_worker():
    """issue 8: the channel awaits a prefetched text's triage before the step takes one of the few step
    workers; the wait ends when the batch does, and the step then finds the result ready."""
    model = SlowModel()
    triage = BatchingTriage.wrap(model)

    async def scenario():
        triage.prefetch("路灯不亮")
        ready = triage.ready("路灯不亮")
        assert ready is not None and not ready.done()
        assert triage.ready("没预取的话") is None  # nothing to wait for
        await asyncio.sleep(0.05)
        assert not ready.done()  # the model is still at it
        model.go.set()
        await asyncio.wait_for(ready, 10)
        assert triage.ready("路灯不亮") is None  # done: a step would not wait
        return triage("路灯不亮")

    assert asyncio.run(scenario())["echo"] == "路灯不亮"
    assert len(model.batches) == 1, "the step used the prefetched result, not a second model call"


def test_the_expected_wait_counts_the_messages_ahead_at_the_models_recent_speed():
    """issue 8: a prefetched text's wait is the batch being run plus the texts queued up to and including it,
    at the smoothed seconds per message of the batches timed so far; none once it is answered."""
    clock = [100.0]
    model = SlowModel()

    def many(batch: list[str]) -> list[dict]:
        out = model.triage_many(batch)
        clock[0] += 0.2 * len(batch)  # this model takes 0.2 s per message
        return out

    triage = BatchingTriage(model, many, clock=lambda: clock[0])
    triage.prefetch("第一条")  # taken by the runner and held
    _soon(lambda: model.batches)
    for i in range(2, 6):
        triage.prefetch(f"第{i}条")
    guess = BatchingTriage.PER_TEXT_GUESS
    assert triage.expected_wait("第一条") == pytest.approx(1 * guess)  # nothing timed yet: the guess
    assert triage.expected_wait("第5条") == pytest.approx(5 * guess)  # one in the model, four queued
    model.go.set()
    assert triage("第5条")["echo"] == "第5条"
    assert triage.per_text == pytest.approx(0.2)
    assert triage.expected_wait("第5条") == 0.0  # answered: nothing to wait for
    assert triage.expected_wait("没排队的话") == 0.0


def test_steps_waiting_for_a_worker_add_their_turns_to_the_expected_wait():
    """issue 8: with two workers busy and steps taking 0.5 s lately, a step queued behind five others waits
    for three turns of the workers (its own included); one started is no longer waiting."""
    from bot.telegram_app import StepLoad

    clock = [0.0]
    load = StepLoad(workers=2, clock=lambda: clock[0])

    def step() -> str:
        clock[0] += 0.5
        return "done"

    for _ in range(20):  # the recent steps took 0.5 s each
        assert load.wrap(step)() == "done"
    assert load.per_step == pytest.approx(0.5, rel=0.01)
    assert load.expected_wait() == pytest.approx(0.5, rel=0.01)  # nobody waiting: its own step
    queued = [load.wrap(step) for _ in range(5)]
    assert load.waiting == 5
    assert load.expected_wait() == pytest.approx(1.5, rel=0.01)  # 5 // 2 turns ahead, then its own
    queued[0]()
    assert load.waiting == 4 and load.expected_wait() == pytest.approx(1.5, rel=0.01)
    for run in queued[1:]:
        run()
    assert load.waiting == 0


def test_the_expected_wait_is_unbounded_while_the_model_is_still_loading():
    """A bot that has just started loads its model for tens of seconds: every new request waits for it."""
    loaded = threading.Event()

    class Loading(SlowModel):
        def load(self) -> None:
            loaded.wait(10)

    model = Loading()
    model.go.set()
    triage = BatchingTriage.wrap(model)
    loader = threading.Thread(target=triage.load)
    loader.start()
    try:
        _soon(lambda: triage._loading)
        triage.prefetch("路灯不亮")
        assert triage.expected_wait("路灯不亮") == float("inf")
    finally:
        loaded.set()
        loader.join(10)
    assert triage("路灯不亮")["echo"] == "路灯不亮"


def test_a_model_that_failed_to_load_at_start_does_not_leave_every_wait_unbounded():
    """The start-up load fails (the triage server was away); the model loads later, on the first step that
    needs it. Waits are estimated again, not taken as endless, so citizens are not told to wait for ever."""

    class FailsFirstLoad(SlowModel):
        def load(self) -> None:
            raise ConnectionError("triage server away")

    model = FailsFirstLoad()
    triage = BatchingTriage.wrap(model)
    with pytest.raises(ConnectionError):
        triage.load()
    triage.prefetch("第一条")  # taken by the runner and held
    _soon(lambda: model.batches)
    triage.prefetch("第二条")
    assert triage.expected_wait("第二条") == pytest.approx(2 * BatchingTriage.PER_TEXT_GUESS)
    model.go.set()
    assert triage("第二条")["echo"] == "第二条"
    assert triage.per_text is not None  # its batches are timed again


def test_in_a_peak_a_citizen_whose_request_waits_is_told_at_once_and_only_once(services, db):
    """issue 8: the model is busy and has been taking 1.5 s per message. A request with one message ahead of
    it (3 s expected) is told at once that it was received and queued; the one being triaged (1.5 s) is not
    told; the same citizen's next message within a minute gets no second notice. Both get their answers."""
    from dataclasses import replace

    from bot import texts

    model = SlowModel(answer=fake_triage)
    other = CITIZEN + 1
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(replace(services, triage=model), api) as bot:
            triage = bot.hotline.services.triage
            triage.per_text = 1.5  # as measured on the batches before this peak
            api.message(other, "小区门口的路灯坏了一个星期了，晚上很黑")
            await until(lambda: model.batches)  # in the model, held
            api.message(CITIZEN, "烧烤摊油烟太大，晚上根本没法开窗")
            await until(lambda: api.sent_to(CITIZEN))
            assert [m.text for m in api.sent_to(CITIZEN)] == [texts.QUEUED]
            api.message(CITIZEN, "而且每天都营业到凌晨两点")
            await until(lambda: len(triage._queue) >= 2)  # both of this citizen's texts wait
            model.go.set()
            await until(lambda: len(api.sent_to(CITIZEN)) >= 2 and api.sent_to(other))
            await asyncio.sleep(0.3)  # anything else on its way

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    told = [m.text for m in api.sent_to(CITIZEN)]
    assert told[0] == texts.QUEUED and told.count(texts.QUEUED) == 1
    assert "事发地点" in told[1]  # then the request itself, taken up
    assert all(m.text != texts.QUEUED for m in api.sent_to(other))
    assert "路灯坏了一个星期" in api.sent_to(other)[0].text  # its summary to confirm, nothing before it


def test_no_queue_notice_when_the_model_keeps_up(services, db):
    """A quiet day: the model answers in tens of milliseconds, so a citizen gets the answer and nothing else."""
    from dataclasses import replace

    from bot import texts

    model = SlowModel(answer=fake_triage)
    model.go.set()
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(replace(services, triage=model), api):
            api.message(CITIZEN, "烧烤摊油烟太大，晚上根本没法开窗")
            await until(lambda: api.sent_to(CITIZEN))
            await asyncio.sleep(0.3)

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    told = [m.text for m in api.sent_to(CITIZEN)]
    assert texts.QUEUED not in told and "事发地点" in told[0]


def test_a_message_that_found_the_triage_model_away_is_answered_once_it_is_back(services, db, clock):
    """The triage server restarts (or the model process died twice): the citizen is told the message is in,
    the update stays pending instead of being given up, and the replay answers it properly."""
    from dataclasses import replace
    from types import SimpleNamespace

    from bot.telegram_app import RECOVER_AFTER
    from bot.triage_process import TriageUnavailable

    away = [True]

    def triage(text):
        if away[0]:
            raise TriageUnavailable("triage server away")
        return fake_triage(text)

    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(replace(services, triage=triage), api) as bot:
            update_id = api.message(CITIZEN, "烧烤摊油烟太大，晚上根本没法开窗")
            await until(lambda: api.sent_to(CITIZEN))
            assert "系统繁忙，您的消息已收到" in api.sent_to(CITIZEN)[-1].text
            with db() as s:
                assert s.get(InboundUpdate, update_id).done_at is None  # kept for a replay
            away[0] = False
            clock.advance(RECOVER_AFTER + timedelta(seconds=1))
            await bot.hotline.recover_updates(SimpleNamespace(bot=bot.app.bot, application=bot.app))
            await until(lambda: len(api.sent_to(CITIZEN)) >= 2)
            return update_id

    try:
        update_id = asyncio.run(scenario())
    finally:
        api.stop()
    answer = api.sent_to(CITIZEN)[1].text
    assert "事发地点" in answer  # the request itself, taken up: the bot asks where it happens
    with db() as s:
        assert s.get(InboundUpdate, update_id).done_at is not None


def test_an_emergency_notice_telegram_refused_is_tried_again_within_a_second(services, db, clock):
    """Telegram answers 500 to the emergency notice, sent at once and again by the step: it waits in the outbox
    half a second, not the 2 s of other messages, and reaches the citizen once."""
    api = FakeBotAPI().start()
    api.fail(500, count=2)

    def waiting() -> OutboxMessage | None:
        with db() as s:
            return s.scalars(
                select(OutboxMessage).where(
                    OutboxMessage.chat_id == str(CITIZEN), OutboxMessage.status == "pending"
                )
            ).one_or_none()

    async def scenario():
        async with Bot(services, api):
            api.message(CITIZEN, "楼下饭店着火了，烟很大，快来人")
            row = await until(waiting)
            assert row.kind == "urgent" and row.attempts == 1
            assert row.next_attempt_at - clock.now() == timedelta(seconds=0.5)
            assert not api.sent_to(CITIZEN)
            clock.advance(seconds=0.5)
            await until(lambda: api.sent_to(CITIZEN))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    [notice] = api.sent_to(CITIZEN)
    assert "119" in notice.text


def test_an_emergency_is_answered_while_the_database_is_down_and_its_notice_is_not_repeated(
    services, db, clock, monkeypatch
):
    """The update cannot be written (the database restarts): the emergency notice goes out all the same; once
    the database is back the update is written and its step runs, and the citizen gets the notice once."""
    from sqlalchemy.exc import OperationalError

    import bot.telegram_app

    real = bot.telegram_app.record_updates
    down = threading.Event()
    down.set()
    tries = []

    def record_updates(factory, rows):
        tries.append(len(rows))
        if down.is_set():
            down_now = ConnectionRefusedError("the database restarts")
            raise OperationalError("INSERT INTO inbound_updates …", {}, down_now)
        return real(factory, rows)

    monkeypatch.setattr(bot.telegram_app, "record_updates", record_updates)
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(services, api):
            update_id = api.message(CITIZEN, "楼下饭店着火了，烟很大，快来人")
            await until(lambda: api.sent_to(CITIZEN))
            assert down.is_set() and tries  # answered while the update could not be written
            down.clear()
            await until(lambda: _done(db, update_id))
            await until(lambda: all_sent(db))
            return update_id

    try:
        update_id = asyncio.run(scenario())
    finally:
        api.stop()
    [notice] = api.sent_to(CITIZEN)
    assert "119" in notice.text
    with db() as s:
        row = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == str(CITIZEN))).one()
        assert row.kind == "urgent" and row.status == "sent" and row.attempts == 1  # the step's reply: not resent
        assert s.get(InboundUpdate, update_id).outcome == "done"


def test_a_confirmation_that_meets_a_database_outage_is_filed_before_the_next_message(services, db, monkeypatch):
    """The database goes away for longer than a step's quick retries just as the citizen confirms: the citizen
    is told once that the message is in, and writes again at once. When the database is back the request is
    filed first and the new message answered after it; nothing is left for a replay a minute later (a
    confirmation overtaken by the next message would find its buttons stale and never be filed)."""
    from sqlalchemy.exc import OperationalError

    import bot.telegram_app

    real = bot.telegram_app.handle_citizen
    down = threading.Event()
    tries = []

    def handle_citizen(svc, incoming, step=None):
        if down.is_set():
            tries.append(incoming.callback or incoming.text)
            raise OperationalError("UPDATE conversations …", {}, ConnectionRefusedError("the database restarts"))
        return real(svc, incoming, step=step)

    monkeypatch.setattr(bot.telegram_app, "handle_citizen", handle_citizen)
    monkeypatch.setattr(bot.telegram_app, "STEP_RETRY_EVERY", 0.2)
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(services, api):
            summary = await _write_a_report(api)
            down.set()
            api.press(CITIZEN, dict(summary.buttons())["✅ 确认提交"])
            await asyncio.to_thread(api.wait_text, CITIZEN, "系统繁忙")
            api.message(CITIZEN, "/mine")  # the citizen goes on at once
            await until(lambda: len(tries) >= 8)  # tried again and again, the next message waiting behind it
            down.clear()
            await until(lambda: _mine_answered(api))
            await until(lambda: all_sent(db))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    after = _told_after_summary(api)
    assert len(after) == 3 and "系统繁忙" in after[0] and after[1].startswith("✅ 已受理"), after
    assert after[2].startswith("您最近的诉求"), after  # /mine was answered after the ticket existed
    _one_ticket_nothing_pending(db)


def test_a_confirmation_stuck_in_another_bot_process_is_done_before_the_chats_next_message(
    services, db, monkeypatch
):
    """Behind webhooks the citizen's confirm press went to a bot process that recorded it and then stalled (a
    database outage there, or it died); the citizen's next message reaches this bot. This bot finds the earlier
    update still pending when it claims the new one, files the request first and then answers the message
    (before, the message ran first, left the confirm button stale and the request was never filed)."""
    from bot.telegram_app import HotlineBot

    real = HotlineBot.on_update
    stalled = []

    async def on_update(self, update, context):
        query = update.callback_query
        if query is not None and (query.data or "").startswith("d:ok:") and not stalled:
            stalled.append(update.update_id)  # recorded in the inbox, never run here: the "other" process
            return
        await real(self, update, context)

    monkeypatch.setattr(HotlineBot, "on_update", on_update)
    api = FakeBotAPI().start()

    async def scenario():
        async with Bot(services, api):
            summary = await _write_a_report(api)
            api.press(CITIZEN, dict(summary.buttons())["✅ 确认提交"])
            await until(lambda: stalled)
            api.message(CITIZEN, "/mine")
            await until(lambda: _mine_answered(api))
            await until(lambda: all_sent(db))

    try:
        asyncio.run(scenario())
    finally:
        api.stop()
    after = _told_after_summary(api)
    assert len(after) == 2 and after[0].startswith("✅ 已受理"), after
    assert after[1].startswith("您最近的诉求"), after
    _one_ticket_nothing_pending(db)
    with db() as s:
        assert s.get(InboundUpdate, stalled[0]).outcome == "done"


def _mine_answered(api: FakeBotAPI) -> bool:
    """The citizen's /mine was answered (with the ticket, or with "none yet")."""
    return any("您最近的诉求" in m.text or "您还没有" in m.text for m in api.sent_to(CITIZEN))


def _told_after_summary(api: FakeBotAPI) -> list[str]:
    """What the citizen was told after the summary with the confirm button."""
    told = [m.text for m in api.sent_to(CITIZEN) if m.text != FOLLOW_UP]
    return told[told.index(next(t for t in told if "请确认" in t)) + 1 :]


def _one_ticket_nothing_pending(db) -> None:
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 1
        assert s.scalars(select(InboundUpdate).where(InboundUpdate.done_at.is_(None))).all() == []


def _done(db, update_id: int) -> bool:
    with db() as s:
        row = s.get(InboundUpdate, update_id)
        return row is not None and row.done_at is not None


@pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL")
def test_two_bot_processes_never_run_two_steps_of_one_conversation_at_once(db, engine):
    """Behind webhooks, a citizen's two quick messages may reach two bot processes: the second step waits
    for the first one's transaction (the chat's lock, taken by the claim itself); other chats do not wait."""
    record_updates(db, [(9001, "7301", {"update_id": 9001}), (9002, "7301", {"update_id": 9002}),
                        (9003, "7302", {"update_id": 9003})])
    first, second, other = db(), db(), db()
    try:
        assert Step(9001, "7301").claim(first)  # its transaction stays open, as during a step
        assert Step(9003, "7302").claim(other)  # another conversation is not held up
        other.commit()
        pid = second.connection().connection.dbapi_connection.info.backend_pid
        claimed: list[bool] = []
        waiter = threading.Thread(target=lambda: claimed.append(Step(9002, "7301").claim(second)))
        waiter.start()
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline:
            with engine.connect() as c:
                state = c.execute(
                    text("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": pid},
                ).one()
            if tuple(state) == ("Lock", "advisory"):
                break
            time.sleep(0.02)
        assert tuple(state) == ("Lock", "advisory"), "the second step waits for the conversation's lock"
        assert not claimed
        first.commit()  # the first step ends: the second goes on
        waiter.join(10)
        assert claimed == [True]
        second.commit()
    finally:
        for s in (first, second, other):
            s.close()
    with db() as s:
        assert all(s.get(InboundUpdate, u).done_at is not None for u in (9001, 9002, 9003))
