"""The citizen's conversation through the real Telegram stack (python-telegram-bot → fake Bot API)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from bot.services import Services
from kb.store import Editor, create_entry
from models.catalog import load_catalog
from models.tables import Attachment, ChatBinding, OutboxMessage, Ticket
from tests.telegram_harness import Harness, run
from tests.test_citizen_flow import fake_triage

CITIZEN = 5001


@pytest.fixture
def services(db):
    with db.begin() as s:
        load_catalog(s)
        create_entry(
            s, Editor.center("test"), entry_id="kb-0001", questions=["居住证怎么办理"],
            answer="持身份证和居住证明材料到居住地派出所户籍窗口申领居住证。", unit="gongan",
            basis="《居住证暂行条例》第九条", status="published",
        )
        s.add(ChatBinding(chat_id=-100, unit_code="chengguan"))
        s.add(ChatBinding(chat_id=-900, unit_code="center"))
    return Services(sessions=db, triage=fake_triage, policy_name="quxian")


def test_file_a_ticket_with_location_contact_and_photo(services, db):
    async def scenario():
        async with Harness(services) as h:
            start = await h.say(CITIZEN, "/start", "12345")
            assert [label for label, _ in start.buttons()] == ["反映问题", "咨询", "查询进度", "我的诉求"]
            ask = await h.say(CITIZEN, "烧烤摊占道经营油烟太大", "事发地点")
            assert ask.markup.get("keyboard"), "a share-location keyboard is offered"
            mark = h.mark()
            h.api.location(CITIZEN, 31.05, 107.08)
            when = await h.expect(CITIZEN, "什么时候", after=mark)
            summary = await h.press(CITIZEN, when.buttons()[0][1], "请确认")
            assert "位置坐标" in summary.text
            before_photo = dict(summary.buttons())["✅ 确认提交"]
            mark = h.mark()
            h.api.photo(CITIZEN, file_id="PHOTO-A")
            await h.expect(CITIZEN, "图片已附上", after=mark)
            summary = await h.expect(CITIZEN, "请确认", after=mark)
            assert "附图：1张" in summary.text
            # the summary from before the photo no longer files: it shows the one with the photo again
            again = await h.press(CITIZEN, before_photo, "有了更新")
            assert "附图：1张" in again.text
            confirm = dict(again.buttons())["✅ 确认提交"]
            done = await h.press(CITIZEN, confirm, "已受理，工单号")
            number = done.text.split("工单号 ")[1].split("\n")[0]
            # the unit's group receives the card through the outbox
            card = await h.expect(-100, number)
            assert ("签收", f"u:sign:{_ticket_id(db, number)}") in card.buttons()
            status = await h.say(CITIZEN, f"/status {number}", "已转办")
            assert number in status.text

    run(scenario())
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.latitude == pytest.approx(31.05)
        assert s.scalars(select(Attachment.file_ref)).all() == ["PHOTO-A"]


def _ticket_id(db, number: str) -> int:
    with db() as s:
        return s.scalars(select(Ticket.id).where(Ticket.number == number)).one()


def test_emergency_is_the_first_reply(services):
    async def scenario():
        async with Harness(services) as h:
            r = await h.say(CITIZEN, "快来人啊楼下着火了", "请立即拨打 119")
            assert r.text.startswith("🚨")

    run(scenario())


def test_bad_inputs_through_telegram(services):
    async def scenario():
        async with Harness(services) as h:
            await h.say(CITIZEN, "    ", "没有收到文字内容")
            await h.say(CITIZEN, "🙏🙏🙏", "没看懂")
            await h.say(CITIZEN, "长" * 5001, "超过5000字")
            mark = h.mark()
            h.api.sticker(CITIZEN)
            await h.expect(CITIZEN, "表情", after=mark)
            mark = h.mark()
            h.api.voice(CITIZEN)
            await h.expect(CITIZEN, "语音", after=mark)
            mark = h.mark()
            h.api.photo(CITIZEN)
            await h.expect(CITIZEN, "收到图片", after=mark)
            await h.press(CITIZEN, "d:ok:oldtoken", "过期")
            await h.say(CITIZEN, "/status 20200101-000001", "没有找到")

    run(scenario())


def test_telegram_500_and_429_are_retried_and_nothing_is_lost(services, db):
    async def scenario():
        async with Harness(services) as h:
            h.api.fail(500, count=1)
            mark = h.mark()
            h.api.message(CITIZEN, "/start")
            # the direct send failed; the reply went to the outbox and is delivered on the next flush
            await h.expect(CITIZEN, "12345", after=mark)
            h.api.fail(429, count=1, retry_after=1)
            await h.say(CITIZEN, "/help", "/status")

    run(scenario())
    with db() as s:
        assert all(m.status == "sent" for m in s.scalars(select(OutboxMessage)))


def test_user_who_blocked_the_bot_does_not_jam_the_outbox(services, db):
    async def scenario():
        async with Harness(services) as h:
            h.api.block(CITIZEN)
            h.api.message(CITIZEN, "/start")
            h.api.message(CITIZEN + 1, "/start")
            await h.expect(CITIZEN + 1, "12345")

    run(scenario())
    with db() as s:
        stuck = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == str(CITIZEN),
                                                      OutboxMessage.status == "pending")).all()
        assert stuck == []
