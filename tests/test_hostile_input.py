"""Bad and hostile input through the real Telegram stack (python-telegram-bot → fake Bot API): floods, oversized
and control-character messages, SQL and Markdown/HTML injection in every free-text field, forged buttons and
outsiders pressing unit buttons. The bot must stay polite, store what people wrote verbatim (cleaned only of
control characters), send plain text, and change nothing it should not."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import func, inspect, select

from bot import staff_texts as tx
from bot import texts
from bot.services import Services
from bot.telegram_app import FOLLOW_UP
from models.catalog import load_catalog
from models.knowledge import KBEntry
from models.tables import (
    ChatBinding,
    Citizen,
    CitizenPII,
    InboundUpdate,
    Staff,
    Ticket,
    TicketReply,
)
from models.workflow import Actor, sign
from tests.helpers import citizen, dispatched_ticket
from tests.telegram_harness import Harness, run

FLOODER, CITIZEN, OTHER = 6001, 6002, 6003
UNIT_CHAT, SC_CHAT, CENTER_CHAT = -100, -200, -900
HANDLER, SC_HANDLER, OUTSIDER = 501, 511, 999

SQL = "'); DROP TABLE tickets; --"
MARKUP = '<b>加粗</b> *星号* _斜体_ [链接](http://evil.example) <a href="tg://user?id=1">点我</a> `code`'
CONTROL = "\x00\x07\x1b[31m\u202e\u200b"


def triage(text: str) -> dict:
    """Deterministic stand-in: everything is a complaint for 城市管理局 (the flows are what is tested)."""
    return {"verdict": "accept", "type": "complaint", "units": ["chengguan"], "confidence": 0.95}


@pytest.fixture
def services(db):
    with db.begin() as s:
        load_catalog(s)
        s.add_all(
            [
                ChatBinding(chat_id=UNIT_CHAT, unit_code="chengguan"),
                ChatBinding(chat_id=SC_CHAT, unit_code="shichang"),
                ChatBinding(chat_id=CENTER_CHAT, unit_code="center"),
                Staff(user_id=HANDLER, unit_code="chengguan", role="handler", display_name="张三"),
                Staff(user_id=SC_HANDLER, unit_code="shichang", role="handler", display_name="赵六"),
            ]
        )
    return Services(sessions=db, triage=triage, policy_name="quxian")


async def until(predicate, timeout: float = 15.0):
    """Wait for a condition the bot brings about (polls; not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(predicate)):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)
    return value


def assert_plain_text(h: Harness) -> None:
    """Everything the bot sent is plain text: Markdown/HTML in people's words is never interpreted."""
    sent = h.api.sent
    assert sent, "the bot sent nothing"
    assert all("parse_mode" not in s.params for s in sent)
    assert all(len(s.text) <= 4096 for s in sent)


def test_a_flood_from_one_user_is_refused_politely_and_others_are_answered(services, db):
    async def scenario():
        async with Harness(services) as h:
            for i in range(40):
                h.api.message(FLOODER, f"快点处理！！！第{i}遍")
                if i == 20:
                    h.api.message(CITIZEN, "/start")
            await h.expect(CITIZEN, "12345")  # the other citizen is answered during the flood
            await h.expect(FLOODER, texts.FLOOD)
            # the flooder is limited, but an emergency still gets its answer
            await h.say(FLOODER, "楼下着火了，好大的烟", "请立即拨打 119")
            # every update is settled: processed or refused, nothing left pending
            await until(lambda: _done_updates(db) >= 42)
            to_flooder = [s for s in h.api.sent_to(FLOODER) if s.text != FOLLOW_UP]
            assert sum(s.text == texts.FLOOD for s in to_flooder) == 1, (
                "one polite notice, not one per message"
            )
            assert len(to_flooder) <= 8 + 2, "the bot does not flood back"
            assert_plain_text(h)

    run(scenario())


def _done_updates(db) -> int:
    with db() as s:
        return s.scalar(select(func.count()).where(InboundUpdate.done_at.is_not(None)))


def test_oversized_messages_are_refused_or_cut_and_replies_fit_telegram(services, db):
    async def scenario():
        async with Harness(services) as h:
            await h.say(CITIZEN, "长" * 100_000, "超过5000字")
            # a long complaint (just under the limit) without a place: every reply still fits one message
            await h.say(CITIZEN, "烧烤摊油烟太大影响休息。" * 400, "事发地点")
            when = await h.say(CITIZEN, "幸福路" + "很长的地址" * 400, "什么时候")
            summary = await h.press(CITIZEN, when.buttons()[0][1], "请确认")
            mark = h.mark()
            h.api.contact(CITIZEN, "13812345678", name="王" * 300)
            await h.expect(CITIZEN, "联系方式", after=mark)
            await h.press(CITIZEN, dict(summary.buttons())["✅ 确认提交"], "已受理")
            assert_plain_text(h)

    run(scenario())
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert len(t.original_text) <= texts.MAX_TEXT
        assert len(t.ev_place) <= 300
        assert len(s.scalars(select(CitizenPII.name)).one()) <= 100


def test_control_characters_are_not_stored_and_do_not_break_the_step(services, db):
    async def scenario():
        async with Harness(services) as h:
            await h.say(CITIZEN, f"烧烤摊{CONTROL}油烟大{CONTROL}", "事发地点")
            await h.say(CITIZEN, f"幸福路{CONTROL}路口", "什么时候")
            mark = h.mark()
            h.api.contact(CITIZEN, "13812345678", name=f"王{CONTROL}")
            await h.expect(CITIZEN, "", after=mark)
            assert not any(texts.BUSY in s.text for s in h.api.sent)

    run(scenario())
    with db() as s:
        from models.tables import Conversation

        draft = s.scalars(select(Conversation.data)).one()
        for value in (draft["text"], draft["place"]):
            assert not any(ch in value for ch in "\x00\x07\x1b\u202e\u200b"), value
        assert draft["text"].startswith("烧烤摊") and draft["place"].startswith("幸福路")
        assert "\x00" not in s.scalars(select(CitizenPII.name)).one()


def test_injection_in_every_free_text_field_is_stored_verbatim_and_sent_as_plain_text(services, db):
    text = f"{SQL} {MARKUP} 烧烤摊占道经营"
    place = f"幸福路{SQL}{MARKUP}"
    name = f"王{SQL}"

    async def scenario():
        async with Harness(services) as h:
            await h.say(CITIZEN, text, "事发地点")
            when = await h.say(CITIZEN, place, "什么时候")
            summary = await h.press(CITIZEN, when.buttons()[0][1], "请确认")
            mark = h.mark()
            h.api.contact(CITIZEN, "13812345678", name=name)
            await h.expect(CITIZEN, "联系方式", after=mark)
            assert MARKUP in summary.text and SQL in summary.text, "shown back exactly as written"
            done = await h.press(CITIZEN, dict(summary.buttons())["✅ 确认提交"], "已受理")
            number = done.text.split("工单号 ")[1].split("\n")[0]
            # the unit signs and replies with injection attempts in every reply field
            card = await h.expect(UNIT_CHAT, number)
            sign_data = next(d for label, d in card.buttons() if label == "签收")
            await h.press(UNIT_CHAT, sign_data, "签收", user_id=HANDLER)
            await h.press(UNIT_CHAT, sign_data.replace(":sign:", ":reply:"), "办理结果", user_id=HANDLER)
            await h.say(
                UNIT_CHAT,
                f"办理结果：已清理占道摊点{MARKUP}\n依据：{SQL}《城市市容和环境卫生管理条例》第十四条\n"
                f"经办人：张三{MARKUP}\n联系电话：0818-7654321",
                "已提交",
                user_id=HANDLER,
            )
            # a knowledge base entry written by the unit
            await h.say(UNIT_CHAT, f"/kb add 问题{MARKUP}｜答复{SQL}｜无", "知识条目", user_id=HANDLER)
            assert_plain_text(h)

    run(scenario())
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.original_text == text
        assert t.ev_place == place
        assert s.scalars(select(CitizenPII.name)).one() == name
        r = s.scalars(select(TicketReply)).one()
        assert MARKUP in r.result and r.basis.startswith(SQL) and MARKUP in r.handler
        entry = s.scalars(select(KBEntry).where(KBEntry.answer == f"答复{SQL}")).one()
        assert entry.questions == [f"问题{MARKUP}"]
        assert "tickets" in inspect(s.bind).get_table_names()


def test_forged_buttons_change_nothing(services, db):
    with db.begin() as s:
        owner = citizen(s, str(OTHER))
        mine = dispatched_ticket(s, lead="chengguan", who=owner)
        theirs = dispatched_ticket(s, lead="shichang")
        mine_id, mine_number, theirs_id = mine.id, mine.number, theirs.id
    forged_citizen = [
        f"rate:{mine_number}:satisfied",  # someone else's ticket
        f"add:{mine_number}",
        f"show:{mine_number}",
        "",
        ":",
        "::::",
        "d:ok",
        "d:ok:",
        "u:sign:1",  # a unit's button in a private chat
        "🙂" * 16,
        "x" * 64,
        "a" * 5000,  # longer than Telegram allows
    ]

    async def scenario():
        async with Harness(services) as h:
            for i, data in enumerate(forged_citizen):  # one person each: the flood guard is not tested here
                mark = h.mark()
                h.api.press(CITIZEN + 100 + i, data)
                reply = await h.expect(CITIZEN + 100 + i, "", after=mark)
                assert texts.BUSY not in reply.text, data
                assert any(w in reply.text for w in ("过期", "没有找到", "失效")), (data, reply.text)
            forged_unit = {
                f"u:sign:{theirs_id}": "不是交给",  # another unit's ticket
                "u:sign:abc": tx.STALE_GENERIC,
                "u:sign:": tx.STALE_GENERIC,
                f"u:nonsense:{mine_id}": tx.STALE_GENERIC,
                f"c:approve:{mine_id}": tx.CENTER_BUTTON_IN_UNIT,  # the center's button
                "u:sign:" + "9" * 60: tx.STALE_GENERIC,  # longer than Telegram allows
            }
            for data, expected in forged_unit.items():
                await h.press(UNIT_CHAT, data, expected, user_id=HANDLER)
            assert_plain_text(h)

    run(scenario())
    with db() as s:
        assert {t.id: t.status for t in s.scalars(select(Ticket))} == {
            mine_id: "dispatched",
            theirs_id: "dispatched",
        }
        assert s.scalar(select(func.count()).select_from(Citizen)) >= 1
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2


def test_a_non_member_pressing_unit_buttons_is_refused(services, db):
    with db.begin() as s:
        ticket = dispatched_ticket(s, lead="chengguan")
        tid = ticket.id

    async def scenario():
        async with Harness(services) as h:
            refusal = tx.NOT_STAFF.split("{")[0]
            await h.press(UNIT_CHAT, f"u:sign:{tid}", refusal, user_id=OUTSIDER)
            await h.press(UNIT_CHAT, f"u:contact:{tid}", refusal, user_id=OUTSIDER)
            # staff of another unit, in this unit's group, is an outsider here too
            await h.press(UNIT_CHAT, f"u:sign:{tid}", refusal, user_id=SC_HANDLER)
            assert h.api.sent_to(OUTSIDER) == [], "no contact details sent privately"

    run(scenario())
    with db() as s:
        t = s.get(Ticket, tid)
        assert t.status == "dispatched" and t.signed_at is None


def test_a_signed_ticket_cannot_be_signed_again_by_a_replayed_press(services, db):
    with db.begin() as s:
        ticket = dispatched_ticket(s, lead="chengguan")
        sign(s, ticket, Actor("staff", str(HANDLER), unit_code="chengguan", role="handler", name="张三"))
        tid = ticket.id

    async def scenario():
        async with Harness(services) as h:
            await h.press(UNIT_CHAT, f"u:sign:{tid}", "无需重复签收", user_id=HANDLER)

    run(scenario())
