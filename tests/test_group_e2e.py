"""Tickets walked end to end through the real Telegram stack (python-telegram-bot 22 → the fake Bot API
server) across three kinds of chat: the citizen's private chat, unit groups and the center group.

Every branch of the lifecycle is its own test. Groups are bound with ``/bind`` codes made by the binding
functions, as an administrator would. Assertions are on what people see (the messages in each chat, in
their latest edited version) and on the database. Time is a ``FakeClock``: nothing sleeps, the tests poll
the fake server for at most a few seconds per step.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from bot.binding import create_bind_code
from bot.fake_bot_api import FakeBotAPI
from bot.services import Services
from models.catalog import load_catalog
from models.tables import (
    ChatBinding,
    OutboxMessage,
    Rating,
    Staff,
    Ticket,
    TicketEvent,
    TicketRequest,
    TicketUnit,
)
from tests.telegram_harness import Harness, current_view, run
from tests.test_staff_flows import fake_triage

CITIZEN = 7001
CG, SC, ZJ, CENTER = -100101, -100102, -100103, -100900
CG_LEADER, CG_HANDLER, SC_HANDLER, ZJ_HANDLER, OPERATOR, OUTSIDER = 501, 502, 511, 521, 601, 999

STREETLIGHT = "幸福路和建设路交叉口的路灯昨晚开始不亮了，晚上走路很危险"
BARBECUE = "幸福里小区3栋楼下的烧烤摊每天晚上占道经营到凌晨，油烟太大"
GOOD_REPLY = (
    "办理结果：已派维修人员到幸福路与建设路交叉口更换损坏的灯具，路灯已恢复照明，后续纳入日常巡查。\n"
    "依据：《城市照明管理规定》第二十四条\n经办人：张三\n联系电话：0818-7654321"
)


def make_services(db, policy: str = "quxian") -> Services:
    with db.begin() as s:
        load_catalog(s)
    return Services(sessions=db, triage=fake_triage, policy_name=policy)


@pytest.fixture
def services(db, clock):
    return make_services(db)


def _code(db, unit: str, role: str) -> str:
    with db.begin() as s:
        return create_bind_code(s, unit, role)


async def bind_groups(h: Harness, db) -> None:
    """The administrator's codes, posted in each group with /bind (and /join for a second colleague)."""
    for chat, user, unit, role in (
        (CG, CG_LEADER, "chengguan", "leader"),
        (SC, SC_HANDLER, "shichang", "handler"),
        (ZJ, ZJ_HANDLER, "zhujian", "handler"),
        (CENTER, OPERATOR, "center", "supervisor"),
    ):
        await h.group_say(chat, user, f"/bind {_code(db, unit, role)}", "已绑定为")
    invite = await h.group_say(CG, CG_LEADER, "/invite handler", "/join ")
    code = invite.text.split("/join ")[1].strip()
    await h.group_say(CG, CG_HANDLER, f"/join {code}", "已登记为城市管理局经办人")
    # the citizen shares a phone number once (平利 asks real names for some requests); masked elsewhere
    mark = h.mark()
    h.api.contact(CITIZEN, "13812345678", "王小明")
    await h.wait(lambda sent: any(s.chat_id == str(CITIZEN) for s in sent[mark:]))


async def file_ticket(h: Harness, text: str) -> str:
    """The citizen writes, goes through the draft's steps and confirms; returns the ticket number."""
    mark = h.mark()
    h.api.message(CITIZEN, text)
    for _ in range(8):
        def step(sent, mark=mark):
            for s in sent[mark:]:
                if s.chat_id == str(CITIZEN):
                    for _label, data in s.buttons():
                        if data.startswith(("d:ok", "skip:", "time:")):
                            return s, data
            return None

        _msg, data = await h.wait(step)
        mark = h.mark()
        h.api.press(CITIZEN, data)
        if data.startswith("d:ok"):
            done = await h.expect(CITIZEN, "已受理，工单号", after=mark)
            return done.text.split("工单号 ")[1].split("\n")[0].split("，")[0].strip()
    raise AssertionError("the draft never asked for confirmation")


def ticket(db, number: str) -> Ticket:
    with db() as s:
        t = s.scalars(select(Ticket).where(Ticket.number == number)).one()
        t.units  # noqa: B018  (loaded while the session is open)
        return t


def snapshot(db) -> tuple:
    """Everything a refused step must leave untouched."""
    with db() as s:
        return (
            s.scalar(select(func.count(TicketEvent.id))),
            tuple(s.execute(select(Ticket.id, Ticket.status, Ticket.lead_unit).order_by(Ticket.id)).all()),
            tuple(s.execute(select(TicketUnit.ticket_id, TicketUnit.unit_code, TicketUnit.signed_at)
                            .order_by(TicketUnit.id)).all()),
            s.scalar(select(func.count(TicketRequest.id))),
            s.scalar(select(func.count(Staff.id))),
            s.scalar(select(func.count(OutboxMessage.id)).where(OutboxMessage.kind.notin_(("retry", "reply")))),
        )


async def dispatched(h: Harness, db, text: str = STREETLIGHT) -> Ticket:
    number = await file_ticket(h, text)
    await h.button(CG, "签收", containing=number)
    return ticket(db, number)


async def signed(h: Harness, db, text: str = STREETLIGHT) -> Ticket:
    t = await dispatched(h, db, text)
    await h.tap(CG, "签收", "签收（签收人", user_id=CG_HANDLER, containing=t.number)
    await h.expect(CITIZEN, f"{t.number} 已由城市管理局签收")
    return ticket(db, t.number)


async def replied(h: Harness, db, text: str = STREETLIGHT) -> Ticket:
    """Signed, answered completely by the unit, approved by the center: the citizen has the survey."""
    t = await signed(h, db, text)
    await h.tap(CG, "提交办结", "办理结果", user_id=CG_HANDLER, containing=t.number)
    await h.group_say(CG, CG_HANDLER, GOOD_REPLY, "等待热线中心审核")
    await h.tap(CENTER, "审核通过", "已发送诉求人", user_id=OPERATOR, containing=t.number)
    await h.button(CITIZEN, "满意", containing=t.number)
    return ticket(db, t.number)


# --------------------------------------------------------------------------- (a) sign


def test_sign_tells_the_citizen_and_edits_the_card(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            number = await file_ticket(h, STREETLIGHT)
            await h.expect(CITIZEN, "承办单位：城市管理局")
            card, _ = await h.button(CG, "签收", containing=number)
            assert "138****5678" in card.text and "13812345678" not in card.text  # contact masked
            assert f"【工单 {number}】求助" in card.text and "状态：已转办待签收" in card.text
            said = await h.tap(CG, "签收", "签收（签收人", user_id=CG_HANDLER, containing=number)
            assert "已由城市管理局签收" in said.text
            await h.expect(CITIZEN, f"您的工单 {number} 已由城市管理局签收，正在办理")
            # the card is edited in place: same message, now with the handling buttons
            edited = await h.wait(lambda sent: next(
                (s for s in current_view(sent, CG) if s.message_id == card.message_id and "办理中" in s.text),
                None))
            labels = [label for label, _ in edited.buttons()]
            assert "提交办结" in labels and "签收" not in labels

    run(scenario())
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.status == "signed" and t.signed_by == f"staff:{CG_HANDLER}@chengguan"
        assert {b.unit_code for b in s.scalars(select(ChatBinding))} == {"chengguan", "shichang", "zhujian",
                                                                        "center"}


MANHOLE = "建设路58号门口的井盖松动了，车一压就哐哐响，晚上吵得睡不着"


# --------------------------------------------------------------------------- (b) return


def test_return_redispatched_to_another_unit_or_refused(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await dispatched(h, db)
            await h.tap(CG, "申请退回", "退回理由", user_id=CG_LEADER, containing=t.number)
            await h.group_say(CG, CG_LEADER, "路灯属于小区内部设施，由住建局代管，不属本局职责", "转送建议")
            await h.group_say(CG, CG_LEADER, "建议转住房和城乡建设局", "等待热线中心审核")
            request, _ = await h.button(CENTER, "同意并改派", containing=t.number)
            assert "退回申请：城市管理局" in request.text and "转送建议：建议转住房和城乡建设局" in request.text
            await h.wait(lambda sent: any(
                "退回审核中" in s.text and t.number in s.text for s in current_view(sent, CG)))
            picker = await h.tap(CENTER, "同意并改派", "请选择工单", user_id=OPERATOR, containing=t.number)
            assert "城市管理局" not in [label for label, _ in picker.buttons()]
            await h.tap(CENTER, "住房和城乡建设局", "改派住房和城乡建设局", user_id=OPERATOR)
            zj_card, _ = await h.button(ZJ, "签收", containing=t.number)
            # 渠府办〔2023〕66号 第十条: the unit the center designated may not return it again
            assert "申请退回" not in [label for label, _ in zj_card.buttons()]
            mark = h.mark()
            h.api.press(ZJ, f"u:return:{t.id}", user_id=ZJ_HANDLER, message_id=zj_card.message_id)
            await h.expect(ZJ, "指定的承办单位不得再退回", after=mark)
            await h.expect(CITIZEN, f"您的工单 {t.number} 已改由住房和城乡建设局办理")
            await h.expect(CG, "退回申请已同意，已改派住房和城乡建设局")
            await h.wait(lambda sent: any(
                "已不由贵单位办理" in s.text and not s.buttons() for s in current_view(sent, CG)))

            # a second ticket: the center refuses the return with a reason; the unit carries on
            t2 = await signed(h, db, MANHOLE)
            await h.tap(CG, "申请退回", "退回理由", user_id=CG_LEADER, containing=t2.number)
            await h.group_say(CG, CG_LEADER, "不属于本局职责", "转送建议")
            await h.group_say(CG, CG_LEADER, "无", "等待热线中心审核")
            await h.tap(CENTER, "不同意", "不同意退回的理由", user_id=OPERATOR, containing=t2.number)
            await h.group_say(CENTER, OPERATOR, "井盖属城管局市政设施管护职责，请继续办理", "不同意")
            await h.expect(CG, "退回申请未获同意：井盖属城管局市政设施管护职责")
            await h.button(CG, "提交办结", containing=t2.number)
            return t.number, t2.number

    first, second = asyncio_run(scenario())
    a, b = ticket(db, first), ticket(db, second)
    assert (a.status, a.lead_unit, a.return_count) == ("dispatched", "zhujian", 1)
    assert [u.unit_code for u in a.units] == ["zhujian"]
    assert (b.status, b.lead_unit, b.return_count) == ("signed", "chengguan", 0)
    with db() as s:
        decisions = s.execute(select(TicketRequest.ticket_id, TicketRequest.decision)
                              .order_by(TicketRequest.id)).all()
    assert [d for _, d in decisions] == ["approved", "refused"]


# --------------------------------------------------------------------------- (c) extension


def test_extension_approved_tells_the_citizen_the_new_date(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await signed(h, db)
            await h.tap(CG, "申请延期", "延期理由", user_id=CG_LEADER, containing=t.number)
            await h.group_say(CG, CG_LEADER, "需协调供电公司更换线路", "延期后的办结时间")
            await h.group_say(CG, CG_LEADER, "2个工作日", "申请延至 2026-11-30 09:00")
            card, _ = await h.button(CENTER, "同意", containing="延期申请")
            assert "申请延至：2026-11-30 09:00" in card.text and "需协调供电公司更换线路" in card.text
            await h.tap(CENTER, "同意", "已同意工单", user_id=OPERATOR, containing="延期申请")
            told = await h.expect(CITIZEN, "新的答复时限为 2026-11-30 09:00")
            assert t.number in told.text
            await h.expect(CG, "新的办结时限为 2026-11-30 09:00")
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert (t.status, t.extension_count) == ("signed", 1)
    assert f"{t.finish_due:%Y-%m-%d %H:%M}" == "2026-11-30 09:00"


# --------------------------------------------------------------------------- (d) incomplete reply


def test_incomplete_reply_is_refused_listing_what_is_missing(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await signed(h, db)
            await h.tap(CG, "提交办结", "办理结果", user_id=CG_HANDLER, containing=t.number)
            before = snapshot(db)
            refused = await h.group_say(
                CG, CG_HANDLER, "办理结果：已处理\n经办人：张三\n联系电话：打我手机", "办结答复不完整")
            for missing in ("法律法规或政策依据", "有效的联系电话", "具体的办理结果（不少于10个字）"):
                assert missing in refused.text
            assert snapshot(db) == before
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert t.status == "signed"
    with db() as s:
        assert s.scalar(select(func.count(TicketEvent.id)).where(TicketEvent.action == "submit_reply")) == 0
        nothing_for_review = (OutboxMessage.chat_id == str(CENTER)) & (OutboxMessage.kind != "reply")
        assert s.scalar(select(func.count(OutboxMessage.id)).where(nothing_for_review)) == 0


# --------------------------------------------------------------------------- (e) and (f) reply, satisfied


def test_reply_approved_then_satisfied_closes(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await signed(h, db)
            await h.tap(CG, "提交办结", "办理结果", user_id=CG_HANDLER, containing=t.number)
            await h.group_say(CG, CG_HANDLER, GOOD_REPLY, "等待热线中心审核")
            review, _ = await h.button(CENTER, "审核通过", containing=t.number)
            assert "办理结果：已派维修人员" in review.text and "经办人：张三" in review.text
            assert ticket(db, t.number).status == "reply_submitted"
            await h.tap(CENTER, "审核通过", "已发送诉求人", user_id=OPERATOR, containing=t.number)
            survey, _ = await h.button(CITIZEN, "满意", containing=t.number)
            assert "路灯已恢复照明" in survey.text and "城市照明管理规定" in survey.text
            assert "城市管理局" in survey.text
            assert [label for label, _ in survey.buttons()] == ["满意", "基本满意", "不满意"]
            await h.expect(CG, f"工单 {t.number} 的办结答复已审核通过")
            assert ticket(db, t.number).status == "replied"
            thanks = await h.tap(CITIZEN, "满意", "感谢您的评价", user_id=CITIZEN, containing=t.number)
            assert "已办结归档" in thanks.text
            await h.expect(CG, "诉求人评价：满意")
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert (t.status, t.final_rating) == ("archived", "satisfied") and t.closed_at is not None


# --------------------------------------------------------------------------- (g) unsatisfied, redo


def test_unsatisfied_redo_then_second_rating_pingli(db, clock):
    services = make_services(db, "pingli")

    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await replied(h, db)
            await h.tap(CITIZEN, "不满意", "不满意的原因", user_id=CITIZEN, containing=t.number)
            await h.say(CITIZEN, "路灯第二天又不亮了", "重新办理")
            redo, _ = await h.button(CG, "提交办结", containing="请重新办理")
            assert t.number in redo.text and "状态：重办中" in redo.text
            assert ticket(db, t.number).status == "redo"
            await h.tap(CG, "提交办结", "办理结果", user_id=CG_HANDLER, containing="请重新办理")
            await h.group_say(CG, CG_HANDLER, GOOD_REPLY.replace("更换损坏的灯具", "更换整条线路和灯具"),
                              "等待热线中心审核")
            await h.tap(CENTER, "审核通过", "已发送诉求人", user_id=OPERATOR, containing="更换整条线路")
            second, _ = await h.button(CITIZEN, "基本满意", containing="更换整条线路")
            assert t.number in second.text
            await h.tap(CITIZEN, "基本满意", "感谢您的评价", user_id=CITIZEN, containing="更换整条线路")
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert (t.status, t.final_rating, t.redo_count) == ("archived", "basic", 1)
    with db() as s:
        rounds = s.execute(select(Rating.round, Rating.value).where(Rating.ticket_id == t.id)
                           .order_by(Rating.round)).all()
    assert [tuple(r) for r in rounds] == [(1, "unsatisfied"), (2, "basic")]


# --------------------------------------------------------------------------- (h) appeal


def test_appeal_of_an_unsatisfied_rating_upheld_quxian(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await replied(h, db)
            await h.tap(CITIZEN, "不满意", "不满意的原因", user_id=CITIZEN, containing=t.number)
            mark = h.mark()
            h.api.message(CITIZEN, "态度不好")
            await h.expect(CITIZEN, t.number, after=mark)
            card, _ = await h.button(CG, "申请甄别", containing="诉求人评价：不满意")
            assert t.number in card.text and "前申请甄别" in card.text
            await h.tap(CG, "申请甄别", "甄别的理由", user_id=CG_HANDLER, containing=t.number)
            await h.group_say(CG, CG_HANDLER, "路灯已修复，有维修照片和巡查记录为证", "甄别申请")
            request, _ = await h.button(CENTER, "同意", containing="甄别申请")
            assert "路灯已修复" in request.text
            await h.tap(CENTER, "同意", "甄别成立", user_id=OPERATOR, containing="甄别申请")
            await h.expect(CG, "甄别申请成立")
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert (t.status, t.final_rating) == ("archived", "appeal_upheld")
    with db() as s:
        assert s.scalars(select(Rating.appeal).where(Rating.ticket_id == t.id)).one() == "upheld"


# --------------------------------------------------------------------------- (i) outsiders


def test_outsiders_wrong_chats_and_stale_buttons_are_refused_and_change_nothing(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await dispatched(h, db)
            card, sign = await h.button(CG, "签收", containing=t.number)
            before = snapshot(db)
            refusals = [
                (CG, OUTSIDER, sign, "您还不是城市管理局登记的工作人员"),
                (CG, SC_HANDLER, sign, "您还不是城市管理局登记的工作人员"),
                (ZJ, ZJ_HANDLER, sign, "不是交给住房和城乡建设局办理的"),
                (CENTER, OPERATOR, sign, "这是承办单位的按钮"),
                (CG, CG_HANDLER, f"c:extok:{t.id}", "这是热线中心的审核按钮"),
                (CG, CG_HANDLER, "u:sign:999999", "按钮已经失效"),
            ]
            for chat, user, data, expected in refusals:
                mark = h.mark()
                h.api.press(chat, data, user_id=user, message_id=card.message_id)
                await h.expect(chat, expected, after=mark)
            for chat, user, text, expected in (
                (CG, CG_HANDLER, "/queue", "/queue 是热线中心的命令"),
                (CENTER, OPERATOR, "/pending", "/pending 是承办单位群的命令"),
                (CENTER, OUTSIDER, "/queue", "您还不是12345热线受理中心登记的工作人员"),
                (-100777, OUTSIDER, "/pending", "本群尚未绑定"),
            ):
                await h.group_say(chat, user, text, expected)
            assert snapshot(db) == before

            # stale buttons: the step has passed
            await h.tap(CG, "签收", "签收（签收人", user_id=CG_HANDLER, containing=t.number)
            after_sign = snapshot(db)
            mark = h.mark()
            h.api.press(CG, sign, user_id=CG_LEADER, message_id=card.message_id)
            await h.expect(CG, "无需重复签收", after=mark)
            mark = h.mark()
            h.api.press(CENTER, f"c:extok:{t.id}", user_id=OPERATOR)
            stale = await h.expect(CENTER, "这个按钮对应的步骤已经过去了", after=mark)
            assert "当前状态：办理中" in stale.text
            assert snapshot(db) == after_sign
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert t.status == "signed" and t.signed_by == f"staff:{CG_HANDLER}@chengguan"
    with db() as s:
        assert s.scalars(select(Staff.user_id).where(Staff.user_id == OUTSIDER)).all() == []


# --------------------------------------------------------------------------- co-handling unit added by the center


def test_center_adds_a_co_handling_unit_from_buttons(services, db):
    async def scenario():
        async with Harness(services) as h:
            await bind_groups(h, db)
            t = await signed(h, db)
            await h.group_say(CENTER, OPERATOR, f"/ticket {t.number}", "详情")
            picker = await h.tap(CENTER, "添加协办", "要添加到工单", user_id=OPERATOR, containing=t.number)
            assert "城市管理局" not in [label for label, _ in picker.buttons()]
            await h.tap(CENTER, "市场监督管理局", "已为工单", user_id=OPERATOR, containing="要添加到工单")
            co_card, _ = await h.button(SC, "签收", containing="指定贵单位为协办单位")
            assert t.number in co_card.text and "主办单位：城市管理局" in co_card.text
            await h.expect(CG, "添加了协办单位：市场监督管理局")
            await h.tap(SC, "签收", "签收（签收人", user_id=SC_HANDLER, containing=t.number)
            await h.tap(SC, "提交协办意见", "协办意见", user_id=SC_HANDLER, containing=t.number)
            await h.group_say(SC, SC_HANDLER, "经检测油烟排放超标，已下达整改通知", "已提交主办单位城市管理局")
            await h.expect(CG, "协办单位市场监督管理局对工单")
            return t.number

    t = ticket(db, asyncio_run(scenario()))
    assert (t.status, t.lead_unit, t.co_units) == ("signed", "chengguan", ["shichang"])
    assert next(tu for tu in t.units if tu.unit_code == "shichang").contribution.startswith("经检测油烟")


# --------------------------------------------------------------------------- (j) outage and restart


async def until(check, clock, *, timeout: float = 20.0, step: timedelta = timedelta(seconds=30)):
    """Poll ``check()`` (the fake server and the database) while the fake clock moves on, so that the
    outbox's back-off (2, 4, 8 … s, or Telegram's retry_after) runs out without sleeping for it."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError("timed out waiting")
        clock.advance(step)
        await asyncio.sleep(0.1)


def test_outbox_survives_a_telegram_outage_and_a_restart_delivering_exactly_once(services, db, clock):
    api = FakeBotAPI().start()
    try:
        async def before_restart():
            async with Harness(services, api) as h:
                await bind_groups(h, db)
                t = await dispatched(h, db)
                card, sign = await h.button(CG, "签收", containing=t.number)
                api.fail(500, count=10_000)  # Telegram is down for every message
                mark = h.mark()
                api.press(CG, sign, user_id=CG_HANDLER, message_id=card.message_id)

                def queued():
                    with db() as s:
                        rows = s.scalars(select(OutboxMessage).where(OutboxMessage.status != "sent")).all()
                        return {r.chat_id for r in rows if r.attempts >= 1} >= {str(CITIZEN), str(CG)} and rows

                # the step is done; the citizen's notice, the card edit and the group's own answer all
                # failed at least once and wait in the outbox
                await until(queued, clock, step=timedelta(seconds=5))
                assert ticket(db, t.number).status == "signed"
                assert len(api.sent) == mark  # nothing got through
                return t.number, mark

        number, mark = asyncio_run(before_restart())
        with db() as s:
            waiting = {r.id: (r.chat_id, r.text) for r in s.scalars(
                select(OutboxMessage).where(OutboxMessage.status != "sent"))}
        assert any(chat == str(CITIZEN) and f"{number} 已由城市管理局签收" in text
                   for chat, text in waiting.values())
        assert any(chat == str(CG) and "签收（签收人" in text for chat, text in waiting.values())

        # Telegram comes back, first with flood control (429, retry_after); the bot is started anew
        with api.state.cond:
            api.state.faults.clear()
        api.fail(429, count=2, retry_after=3)

        async def after_restart():
            async with Harness(services, api) as h:
                def delivered():
                    with db() as s:
                        return all(s.get(OutboxMessage, i).status == "sent" for i in waiting)

                await until(delivered, clock, step=timedelta(seconds=2))
                await h.expect(CITIZEN, f"您的工单 {number} 已由城市管理局签收", after=mark)
                await h.expect(CG, "签收（签收人", after=mark)

        asyncio_run(after_restart())
        after = [(s.method, s.chat_id, s.text) for s in api.sent[mark:]]
        for chat, text in waiting.values():
            assert sum(1 for _m, c, x in after if c == chat and x == text) == 1, text  # exactly once
        assert sum(f.count for f in api.state.faults) == 0  # both 429s were met and waited out
    finally:
        api.stop()
    with db() as s:
        assert s.scalar(select(func.count(OutboxMessage.id)).where(OutboxMessage.status != "sent")) == 0


def asyncio_run(coro):
    import asyncio

    return asyncio.run(coro)
