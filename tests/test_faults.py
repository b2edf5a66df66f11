"""Faults in CI, small and fast: Telegram outages, a bot that dies and is restarted, an update Telegram gives
again, a PostgreSQL connection dropped mid-conversation. Every message is delivered exactly once and no
request is lost or done twice. Time in the outbox moves with the ``clock`` fixture; the bot itself is the real
python-telegram-bot application against the fake Bot API."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import create_engine, event, select, text

from bot.citizen import handle_citizen
from bot.fake_bot_api import FakeBotAPI
from bot.inbox import Step, record_updates
from bot.messages import Incoming, Reply
from bot.outbox import claim_batch, enqueue
from bot.services import Services
from bot.telegram_app import FOLLOW_UP, BatchingTriage, build_application
from models.catalog import load_catalog
from models.tables import ChatBinding, InboundUpdate, OutboxMessage, Ticket
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


@pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL")
def test_a_postgresql_connection_dropped_mid_conversation_loses_nothing(services, db, engine):
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
            api.message(CITIZEN, "幸福路烧烤摊油烟太大，今天晚上")
            summary = await asyncio.to_thread(api.wait_text, CITIZEN, "请确认")
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
    assert fired, "the connection was dropped in the middle of the step"
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 1
        assert s.scalars(select(InboundUpdate).where(InboundUpdate.done_at.is_(None))).all() == []
    got = delivered(api)
    assert sum(n for (chat, body), n in got.items() if "已受理" in body) == 1
    assert [n for (chat, body), n in got.items() if chat == str(UNIT_CHAT)] == [1]


class SlowModel:
    """A triage model that answers batches; the first batch is held until told to go."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.go = threading.Event()
        self.fail = fail

    def __call__(self, text: str) -> dict:
        return self.triage_many([text])[0]

    def triage_many(self, texts: list[str]) -> list[dict]:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.go.wait(10)
        if self.fail:
            raise RuntimeError("model file unreadable")
        return [{"verdict": "accept", "echo": t} for t in texts]


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
    deadline = time.monotonic() + 10
    while not model.batches and time.monotonic() < deadline:
        time.sleep(0.001)  # until the first call is inside the model
    for t in threads[1:]:
        t.start()
    while len(triage._queue) < n - 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the others are queued behind it
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
