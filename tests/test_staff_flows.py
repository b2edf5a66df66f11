"""Tickets walked across three chats — the citizen's private chat, unit groups and the center group — by
calling the conversation functions directly. Assertions are on what people receive: the replies in the
chat that acted, and the outbox rows for every other chat (delivered here by a stand-in sender that, like
the real one, reports each card's message id through ``record_card_message``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from bot.binding import cli_bind, create_bind_code
from bot.citizen import handle_citizen
from bot.messages import Incoming, Reply
from bot.services import Services
from bot.staff import handle_group, record_card_message
from bot.staff_texts import parse_labelled, parse_new_due
from kb import store as kb_store
from models.catalog import load_catalog, unit_codes
from models.clock import CHINA_TZ
from models.knowledge import KBEntry
from models.tables import (
    BindCode,
    ChatBinding,
    OutboxMessage,
    PIIAccess,
    Rating,
    Staff,
    Ticket,
    TicketEvent,
    TicketUnit,
)
from models.workcalendar import get_calendar

CITIZEN = "7001"
PHONE = "13812345678"
CG_CHAT, SC_CHAT, ZJ_CHAT, CENTER_CHAT = "-100101", "-100102", "-100103", "-100900"
CG_LEADER, CG_HANDLER, SC_HANDLER, ZJ_HANDLER, OPERATOR, OUTSIDER = 501, 502, 511, 521, 601, 999
NAMES = {
    CG_LEADER: "李科长",
    CG_HANDLER: "张三",
    SC_HANDLER: "赵六",
    ZJ_HANDLER: "钱七",
    OPERATOR: "值班员王",
    OUTSIDER: "路人甲",
}

STREETLIGHT = "幸福路和建设路交叉口的路灯昨晚开始不亮了，晚上走路很危险"
BARBECUE = "幸福里小区3栋楼下的烧烤摊每天晚上占道经营到凌晨，油烟太大"
UNCLEAR = "我们那边有点事情想反映一下，每天都这样，在幸福里小区"
GOOD_REPLY = (
    "办理结果：已派维修人员到幸福路与建设路交叉口更换损坏的灯具，路灯已恢复照明，后续纳入日常巡查。\n"
    "依据：《城市照明管理规定》第二十四条\n经办人：张三\n联系电话：0818-7654321"
)


def fake_triage(text: str) -> dict:
    """A deterministic stand-in for the triage model (the real one is tested elsewhere)."""
    if "烧烤" in text:
        return {
            "verdict": "accept",
            "type": "complaint",
            "confidence": 0.93,
            "units": ["chengguan", "shichang"],
            "co_units": ["shichang"],  # the request spans both units' duties
        }
    if "有点事情" in text:
        return {
            "verdict": "accept",
            "type": "help",
            "confidence": 0.31,
            "units": ["zhujian", "chengguan"],
            "needs_review": True,
        }
    return {"verdict": "accept", "type": "help", "confidence": 0.95, "units": ["chengguan"]}


@dataclass
class Sent:
    chat: str
    text: str
    data: list[str]
    edit: int | None
    kind: str
    message_id: int
    ticket_id: int | None


@dataclass
class World:
    db: object
    svc: Services
    clock: object
    message_ids: int = 5000
    delivered: list[Sent] = field(default_factory=list)

    # ---- people acting
    def group(self, chat: str, user: int, **kw) -> list[Reply]:
        return handle_group(
            self.svc,
            Incoming(
                channel="telegram",
                chat_id=chat,
                user_id=str(user),
                chat_type="supergroup",
                display_name=NAMES.get(user, ""),
                **kw,
            ),
        )

    def press(self, chat: str, user: int, data: str, message_id: int | None = None) -> list[Reply]:
        return self.group(chat, user, callback=data, callback_message_id=message_id)

    def say(self, chat: str, user: int, text: str) -> list[Reply]:
        return self.group(chat, user, text=text)

    def cmd(self, chat: str, user: int, command: str, args: str = "") -> list[Reply]:
        return self.group(chat, user, command=command, args=args)

    def citizen(self, **kw) -> list[Reply]:
        return handle_citizen(
            self.svc,
            Incoming(
                channel="telegram",
                chat_id=CITIZEN,
                user_id=CITIZEN,
                chat_type="private",
                display_name="王小明",
                **kw,
            ),
        )

    # ---- the sender
    def drain(self) -> list[Sent]:
        """Deliver everything pending, like the Telegram sender: mark sent and report card message ids."""
        out = []
        with self.db.begin() as s:
            for row in s.scalars(
                select(OutboxMessage).where(OutboxMessage.status == "pending").order_by(OutboxMessage.id)
            ):
                self.message_ids += 1
                mid = row.edit_message_id or self.message_ids
                row.status, row.sent_message_id = "sent", mid
                record_card_message(s, row, mid)
                data = [b["data"] for r in (row.markup or {}).get("buttons", []) for b in r]
                out.append(
                    Sent(row.chat_id, row.text, data, row.edit_message_id, row.kind, mid, row.ticket_id)
                )
        self.delivered += out
        return out

    # ---- reading the database
    def ticket(self, number: str | None = None) -> Ticket:
        with self.db() as s:
            stmt = select(Ticket).order_by(Ticket.id.desc())
            if number:
                stmt = select(Ticket).where(Ticket.number == number)
            t = s.scalars(stmt).first()
            t.units  # noqa: B018  (load while the session is open)
            return t

    def file(self, text: str, **kw) -> Ticket:
        """The citizen files a request and confirms the draft; returns the ticket."""
        replies = self.citizen(text=text, **kw)
        for _ in range(6):
            datas = [b.data for r in replies[-1].buttons for b in r]
            ok = next((d for d in datas if d.startswith("d:ok")), None)
            if ok:
                self.citizen(callback=ok)
                break
            step = next((d for d in datas if d.startswith(("skip:", "time:"))), None)
            assert step, replies[-1].text
            replies = self.citizen(callback=step)
        return self.ticket()


def texts_to(sent: list[Sent], chat: str) -> list[str]:
    return [m.text for m in sent if m.chat == chat]


def card_in(sent: list[Sent], chat: str) -> Sent:
    cards = [m for m in sent if m.chat == chat and m.data]
    assert cards, f"no card for {chat}: {[(m.chat, m.text[:40]) for m in sent]}"
    return cards[-1]


def only(replies: list[Reply]) -> str:
    return "\n".join(r.text for r in replies)


def snapshot(w: World) -> tuple:
    """Everything a refused step must leave untouched."""
    with w.db() as s:
        return (
            s.scalar(select(func.count(OutboxMessage.id))),
            s.scalar(select(func.count(TicketEvent.id))),
            tuple(s.scalars(select(Ticket.status).order_by(Ticket.id))),
            s.scalar(select(func.count(Staff.id))),
            s.scalar(select(func.count(PIIAccess.id))),
        )


def _bind(w: World, chat: str, user: int, unit: str, role: str) -> None:
    with w.db.begin() as s:
        code = create_bind_code(s, unit, role)
    assert "已绑定" in only(w.cmd(chat, user, "bind", code))


def make_world(db, clock, policy: str = "quxian") -> World:
    with db.begin() as s:
        load_catalog(s)
    w = World(db, Services(sessions=db, triage=fake_triage, policy_name=policy), clock)
    _bind(w, CG_CHAT, CG_LEADER, "chengguan", "leader")
    _bind(w, SC_CHAT, SC_HANDLER, "shichang", "handler")
    _bind(w, ZJ_CHAT, ZJ_HANDLER, "zhujian", "handler")
    _bind(w, CENTER_CHAT, OPERATOR, "center", "supervisor")
    invite = only(w.cmd(CG_CHAT, CG_LEADER, "invite", "handler"))
    code = invite.split("/join ")[1].strip()
    assert "已登记" in only(w.cmd(CG_CHAT, CG_HANDLER, "join", code))
    # the citizen leaves a name and phone once (used for callbacks; masked everywhere else)
    w.citizen(contact_phone=PHONE, contact_name="王小明", contact_user_id=CITIZEN)
    w.drain()
    return w


@pytest.fixture
def world(db, clock):
    return make_world(db, clock)


def signed_ticket(w: World, text: str = STREETLIGHT) -> Ticket:
    t = w.file(text)
    w.drain()
    assert "签收（签收人" in only(w.press(CG_CHAT, CG_HANDLER, f"u:sign:{t.id}"))
    w.drain()
    return w.ticket(t.number)


def submitted_reply(w: World, t: Ticket) -> Sent:
    w.press(CG_CHAT, CG_HANDLER, f"u:reply:{t.id}")
    assert "已提交" in only(w.say(CG_CHAT, CG_HANDLER, GOOD_REPLY))
    return card_in(w.drain(), CENTER_CHAT)


# --------------------------------------------------------------------------- binding


def test_bind_codes_are_one_time_and_groups_stay_with_their_unit(db, clock):
    with db.begin() as s:
        load_catalog(s)
        code = create_bind_code(s, "chengguan", "leader")
        other = create_bind_code(s, "shichang", "handler")
        expiring = create_bind_code(s, "zhujian", "handler", ttl_hours=1)
    w = World(db, Services(sessions=db, triage=fake_triage, policy_name="quxian"), clock)

    private = handle_group(
        w.svc, Incoming(channel="telegram", chat_id="501", user_id="501", command="bind", args=code)
    )
    assert "工作群" in only(private)
    assert "不正确" in only(w.cmd(CG_CHAT, CG_LEADER, "bind", "WRONG123"))
    assert "已绑定为“城市管理局”" in only(w.cmd(CG_CHAT, CG_LEADER, "bind", code.lower()))
    assert "已经使用过" in only(w.cmd("-100555", 777, "bind", code))
    refused = only(w.cmd(CG_CHAT, SC_HANDLER, "bind", other))
    assert "已绑定城市管理局" in refused
    clock.advance(hours=2)
    assert "过期" in only(w.cmd(ZJ_CHAT, ZJ_HANDLER, "bind", expiring))

    with db() as s:
        assert s.get(ChatBinding, int(CG_CHAT)).unit_code == "chengguan"
        assert s.get(ChatBinding, int(ZJ_CHAT)) is None
        assert s.get(BindCode, other).used_at is None  # the refused code is still usable elsewhere
        leader = s.scalars(select(Staff).where(Staff.user_id == CG_LEADER)).one()
        assert (leader.unit_code, leader.role) == ("chengguan", "leader")

    # a handler may invite handlers, not leaders; the invitee joins with the code
    code2 = only(w.cmd(CG_CHAT, CG_LEADER, "invite")).split("/join ")[1].strip()
    assert "已登记为城市管理局经办人" in only(w.cmd(CG_CHAT, CG_HANDLER, "join", code2))
    assert "只能邀请同级或更低" in only(w.cmd(CG_CHAT, CG_HANDLER, "invite", "leader"))
    assert "不能操作" not in only(w.cmd(CG_CHAT, CG_HANDLER, "pending"))


def test_cli_bind_prints_a_code_for_units_and_the_center(db, clock):
    with db.begin() as s:
        load_catalog(s)
    lines: list[str] = []
    assert cli_bind("unit", "chengguan", "leader", sessions=db, out=lines.append) == 0
    assert cli_bind("center", None, "", sessions=db, out=lines.append) == 0
    assert cli_bind("unit", "nosuchunit", "handler", sessions=db, out=lines.append) == 2
    assert cli_bind("unit", "chengguan", "supervisor", sessions=db, out=lines.append) == 2
    codes = [ln.split("：")[1] for ln in lines if ln.startswith("绑定码")]
    assert len(codes) == 2 and any("/bind " + codes[0] in ln for ln in lines)
    with db() as s:
        assert [(c.unit_code, c.role) for c in s.scalars(select(BindCode).order_by(BindCode.expires_at))] in (
            [("chengguan", "leader"), ("center", "operator")],
            [("center", "operator"), ("chengguan", "leader")],
        )


# --------------------------------------------------------------------------- the unit's steps


def test_dispatched_card_sign_updates_card_in_place_and_tells_citizen(world):
    w = world
    t = w.file(STREETLIGHT)
    sent = w.drain()
    card = card_in(sent, CG_CHAT)
    assert f"【工单 {t.number}】求助" in card.text and "138****5678" in card.text and PHONE not in card.text
    assert f"u:sign:{t.id}" in card.data and f"u:contact:{t.id}" in card.data

    reply = only(w.press(CG_CHAT, CG_HANDLER, f"u:sign:{t.id}", card.message_id))
    assert "已由城市管理局签收（签收人：张三）" in reply
    sent = w.drain()
    assert any("已由城市管理局签收，正在办理" in x for x in texts_to(sent, CITIZEN))
    edit = next(m for m in sent if m.chat == CG_CHAT and m.edit)
    assert edit.edit == card.message_id and "状态：办理中" in edit.text
    assert f"u:reply:{t.id}" in edit.data and f"u:sign:{t.id}" not in edit.data
    with w.db() as s:
        assert s.get(Ticket, t.id).signed_by == f"staff:{CG_HANDLER}@chengguan"


def test_a_card_signed_while_still_on_its_way_is_edited_once_telegram_answers(world):
    """The handler presses 签收 the moment the card appears, before the sender has recorded its message id:
    the sign step cannot edit it yet, so recording the id finds the buttons stale and queues the edit."""
    w = world
    t = w.file(STREETLIGHT)
    with w.db.begin() as s:  # the card is being sent: Telegram has not answered yet
        row = s.scalars(
            select(OutboxMessage).where(
                OutboxMessage.chat_id == CG_CHAT, OutboxMessage.ticket_id == t.id, OutboxMessage.status == "pending"
            )
        ).one()
        row.status, card_id = "sending", row.id
    assert "签收人：张三" in only(w.press(CG_CHAT, CG_HANDLER, f"u:sign:{t.id}", 4999))
    assert not [m for m in w.drain() if m.chat == CG_CHAT and m.edit]  # nothing to edit yet
    with w.db.begin() as s:  # Telegram answers: the card is message 4999
        row = s.get(OutboxMessage, card_id)
        row.status, row.sent_message_id = "sent", 4999
        record_card_message(s, row, 4999)
    edit = next(m for m in w.drain() if m.chat == CG_CHAT and m.edit == 4999)
    assert "状态：办理中" in edit.text
    assert f"u:reply:{t.id}" in edit.data and f"u:sign:{t.id}" not in edit.data


def test_return_approved_with_reassignment_moves_card_to_new_unit(world):
    w = world
    t = w.file(STREETLIGHT)
    old_card = card_in(w.drain(), CG_CHAT)
    assert "退回理由" in only(w.press(CG_CHAT, CG_LEADER, f"u:return:{t.id}"))
    assert "转送建议" in only(w.say(CG_CHAT, CG_LEADER, "路灯属于住建局代管的小区内部设施，不属本局职责"))
    assert "等待热线中心审核" in only(w.say(CG_CHAT, CG_LEADER, "建议转住房和城乡建设局"))
    sent = w.drain()
    request = card_in(sent, CENTER_CHAT)
    assert "退回申请：城市管理局" in request.text and "转送建议：建议转住房和城乡建设局" in request.text
    assert f"c:retok:{t.id}" in request.data and f"c:pick:{t.id}" in request.data
    assert any(m.edit == old_card.message_id and "退回审核中" in m.text for m in sent)

    picker = w.press(CENTER_CHAT, OPERATOR, f"c:pick:{t.id}", request.message_id)[0]
    pages = [picker]
    while any(
        b.data.startswith(f"c:pick:{t.id}:") and "下一页" in b.label for r in pages[-1].buttons for b in r
    ):
        nxt = next(b.data for r in pages[-1].buttons for b in r if "下一页" in b.label)
        page = w.press(CENTER_CHAT, OPERATOR, nxt, 4242)[0]
        assert page.edit_message_id == 4242  # turning a page edits the picker in place
        pages.append(page)
    offered = [
        b.data.split(":")[3] for p in pages for r in p.buttons for b in r if b.data.startswith("c:retto")
    ]
    assert len(pages) == 3 and "chengguan" not in offered
    assert sorted(offered) == sorted(c for c in unit_codes() if c != "chengguan")

    done = w.press(CENTER_CHAT, OPERATOR, f"c:retto:{t.id}:zhujian:m", 4242)
    assert "改派住房和城乡建设局" in only(done) and done[0].edit_message_id == 4242
    sent = w.drain()
    assert f"u:sign:{t.id}" in card_in(sent, ZJ_CHAT).data
    assert any("退回申请已同意，已改派住房和城乡建设局" in x for x in texts_to(sent, CG_CHAT))
    moved = next(m for m in sent if m.edit == old_card.message_id)
    assert "已不由贵单位办理" in moved.text and not moved.data
    assert any("已改由住房和城乡建设局办理" in x for x in texts_to(sent, CITIZEN))
    # the center's card is settled: no decision left on it, only 添加协办 for the new lead unit
    assert any(m.edit == request.message_id and m.data == [f"c:copick:{t.id}"] for m in sent)

    before = snapshot(w)
    assert "不是交给城市管理局办理" in only(w.press(CG_CHAT, CG_HANDLER, f"u:sign:{t.id}"))
    assert snapshot(w) == before
    assert "签收（签收人" in only(w.press(ZJ_CHAT, ZJ_HANDLER, f"u:sign:{t.id}"))


def test_return_refused_needs_a_reason_and_unit_continues(world):
    w = world
    t = signed_ticket(w)
    w.press(CG_CHAT, CG_LEADER, f"u:return:{t.id}")
    w.say(CG_CHAT, CG_LEADER, "不属于本局职责")
    w.say(CG_CHAT, CG_LEADER, "无")
    request = card_in(w.drain(), CENTER_CHAT)
    assert "转送建议" not in request.text
    assert "不同意退回的理由" in only(w.press(CENTER_CHAT, OPERATOR, f"c:retno:{t.id}", request.message_id))
    assert "不同意" in only(w.say(CENTER_CHAT, OPERATOR, "城市道路照明属城管局职责，请继续办理"))
    sent = w.drain()
    assert any("退回申请未获同意：城市道路照明属城管局职责" in x for x in texts_to(sent, CG_CHAT))
    assert w.ticket(t.number).status == "signed"
    assert not texts_to(sent, CITIZEN)


def test_return_approved_without_a_unit_comes_back_to_the_center_queue(world):
    w = world
    t = w.file(STREETLIGHT)
    w.drain()
    w.press(CG_CHAT, CG_LEADER, f"u:return:{t.id}")
    w.say(CG_CHAT, CG_LEADER, "不属于本局职责")
    w.say(CG_CHAT, CG_LEADER, "无")
    request = card_in(w.drain(), CENTER_CHAT)
    assert "重新选择" in only(w.press(CENTER_CHAT, OPERATOR, f"c:retok:{t.id}", request.message_id))
    sent = w.drain()
    again = next(m for m in sent if m.edit == request.message_id)  # the request card becomes the review card
    assert "待人工确认" in again.text and f"c:pick:{t.id}" in again.data
    assert any("工单已收回热线中心" in x for x in texts_to(sent, CG_CHAT))
    t = w.ticket(t.number)
    assert (t.status, t.return_count) == ("triaged", 1)
    w.press(CENTER_CHAT, OPERATOR, f"c:disp:{t.id}:zhujian", again.edit)
    sent = w.drain()
    assert f"u:sign:{t.id}" in card_in(sent, ZJ_CHAT).data
    assert any("已转交住房和城乡建设局办理" in x for x in texts_to(sent, CITIZEN))


def test_extension_approved_tells_citizen_the_new_date(world):
    w = world
    t = signed_ticket(w)
    due = w.ticket(t.number).finish_due
    assert due == datetime(
        2026, 11, 26, 9, 0, tzinfo=CHINA_TZ
    )  # 求助 3 个工作日（渠府办〔2023〕66号 第十一条（二））
    assert "延期理由" in only(w.press(CG_CHAT, CG_LEADER, f"u:extend:{t.id}"))
    assert "3个工作日" in only(w.say(CG_CHAT, CG_LEADER, "需协调供电公司更换线路"))
    too_far = only(w.say(CG_CHAT, CG_LEADER, "12月25日"))
    assert "最晚可延至 2026-12-01 09:00" in too_far and "/cancel" in too_far
    assert "没看懂" in only(w.say(CG_CHAT, CG_LEADER, "下下周吧"))
    assert "申请延至 2026-11-30 09:00" in only(w.say(CG_CHAT, CG_LEADER, "2个工作日"))
    request = card_in(w.drain(), CENTER_CHAT)
    assert "延期申请" in request.text and "申请延至：2026-11-30 09:00" in request.text

    assert "已同意" in only(w.press(CENTER_CHAT, OPERATOR, f"c:extok:{t.id}", request.message_id))
    sent = w.drain()
    assert any("新的答复时限为 2026-11-30 09:00" in x for x in texts_to(sent, CITIZEN))
    assert any("延期申请已同意，新的办结时限为 2026-11-30 09:00" in x for x in texts_to(sent, CG_CHAT))
    t = w.ticket(t.number)
    assert (t.status, t.finish_due, t.extension_count) == (
        "signed",
        datetime(2026, 11, 30, 9, 0, tzinfo=CHINA_TZ),
        1,
    )
    # the same request card pressed again is stale: nothing changes
    before = snapshot(w)
    assert "已经过去" in only(w.press(CENTER_CHAT, OPERATOR, f"c:extok:{t.id}", request.message_id))
    assert snapshot(w) == before


def test_extension_refused_keeps_the_deadline(world):
    w = world
    t = signed_ticket(w)
    w.press(CG_CHAT, CG_LEADER, f"u:extend:{t.id}")
    w.say(CG_CHAT, CG_LEADER, "需要时间")
    w.say(CG_CHAT, CG_LEADER, "2026-11-27")
    request = card_in(w.drain(), CENTER_CHAT)
    w.press(CENTER_CHAT, OPERATOR, f"c:extno:{t.id}", request.message_id)
    w.say(CENTER_CHAT, OPERATOR, "路灯维修不需要延期，请按时办结")
    sent = w.drain()
    assert any(
        "延期申请未获同意：路灯维修不需要延期" in x and "2026-11-26 09:00" in x
        for x in texts_to(sent, CG_CHAT)
    )
    assert not texts_to(sent, CITIZEN)
    t = w.ticket(t.number)
    assert (t.status, t.finish_due) == ("signed", datetime(2026, 11, 26, 9, 0, tzinfo=CHINA_TZ))


def test_incomplete_reply_is_refused_listing_what_is_missing(world):
    w = world
    t = signed_ticket(w)
    prompts = only(w.press(CG_CHAT, CG_HANDLER, f"u:reply:{t.id}"))
    assert "办理结果：" in prompts and "联系电话：" in prompts
    refused = only(w.say(CG_CHAT, CG_HANDLER, "办理结果：已处理\n依据：《城市照明管理规定》"))
    assert "办结答复不完整" in refused
    for item in ("经办人", "联系电话", "具体的办理结果"):
        assert item in refused
    assert not w.drain() and w.ticket(t.number).status == "signed"
    # the rest step by step: what was good is kept
    assert "经办人" in only(w.say(CG_CHAT, CG_HANDLER, "已更换损坏灯具，路灯恢复照明，纳入日常巡查。"))
    assert "联系电话" in only(w.say(CG_CHAT, CG_HANDLER, "张三"))
    assert "不完整" in only(w.say(CG_CHAT, CG_HANDLER, "打我手机"))
    assert "已提交" in only(w.say(CG_CHAT, CG_HANDLER, "0818-7654321"))
    card = card_in(w.drain(), CENTER_CHAT)
    assert "办结答复待审核" in card.text and "经办人：张三" in card.text and f"c:repok:{t.id}" in card.data


def test_reply_approved_citizen_gets_reply_and_survey_then_satisfied(world):
    w = world
    t = signed_ticket(w)
    card = submitted_reply(w, t)
    assert "已发送诉求人" in only(w.press(CENTER_CHAT, OPERATOR, f"c:repok:{t.id}", card.message_id))
    sent = w.drain()
    survey = next(m for m in sent if m.chat == CITIZEN)
    assert (
        "路灯已恢复照明" in survey.text and "城市照明管理规定" in survey.text and "城市管理局" in survey.text
    )
    assert survey.data == [
        f"rate:{t.number}:satisfied",
        f"rate:{t.number}:basic",
        f"rate:{t.number}:unsatisfied",
    ]
    assert any("审核通过" in x for x in texts_to(sent, CG_CHAT))
    assert "感谢您的评价" in only(w.citizen(callback=f"rate:{t.number}:satisfied"))
    t = w.ticket(t.number)
    assert (t.status, t.final_rating) == ("archived", "satisfied")


def test_reply_refused_goes_back_to_the_unit_with_the_reason(world):
    w = world
    t = signed_ticket(w)
    card = submitted_reply(w, t)
    assert "退回答复的理由" in only(w.press(CENTER_CHAT, OPERATOR, f"c:repno:{t.id}", card.message_id))
    w.say(CENTER_CHAT, OPERATOR, "请写明具体修复时间")
    sent = w.drain()
    assert any("办结答复被退回：请写明具体修复时间" in x for x in texts_to(sent, CG_CHAT))
    unit_edit = [m for m in sent if m.chat == CG_CHAT and m.edit]
    assert unit_edit and f"u:reply:{t.id}" in unit_edit[-1].data
    assert not texts_to(sent, CITIZEN) and w.ticket(t.number).status == "signed"


def test_unsatisfied_redo_then_second_rating_pingli(db, clock):
    w = make_world(db, clock, policy="pingli")
    t = signed_ticket(w)
    card = submitted_reply(w, t)
    w.press(CENTER_CHAT, OPERATOR, f"c:repok:{t.id}", card.message_id)
    w.drain()
    assert "原因" in only(w.citizen(callback=f"rate:{t.number}:unsatisfied"))
    assert "重新办理" in only(w.citizen(text="路灯第二天又不亮了"))
    redo_card = card_in(w.drain(), CG_CHAT)
    assert "诉求人不满意，请重新办理" in redo_card.text and f"u:reply:{t.id}" in redo_card.data
    t = w.ticket(t.number)
    assert (t.status, t.redo_count) == ("redo", 1)

    w.press(CG_CHAT, CG_HANDLER, f"u:reply:{t.id}", redo_card.message_id)
    w.say(CG_CHAT, CG_HANDLER, GOOD_REPLY.replace("更换损坏的灯具", "重新更换整条线路和灯具"))
    review = card_in(w.drain(), CENTER_CHAT)
    w.press(CENTER_CHAT, OPERATOR, f"c:repok:{t.id}", review.message_id)
    second = [m for m in w.drain() if m.chat == CITIZEN]
    assert len(second) == 1 and "重新更换整条线路" in second[0].text
    w.citizen(callback=f"rate:{t.number}:basic")
    t = w.ticket(t.number)
    assert (t.status, t.final_rating) == ("archived", "basic")
    with w.db() as s:
        rounds = [
            (r.round, r.value)
            for r in s.scalars(select(Rating).where(Rating.ticket_id == t.id).order_by(Rating.round))
        ]
    assert rounds == [(1, "unsatisfied"), (2, "basic")]


def test_appeal_of_an_unsatisfied_rating_quxian(world):
    w = world
    t = signed_ticket(w)
    card = submitted_reply(w, t)
    w.press(CENTER_CHAT, OPERATOR, f"c:repok:{t.id}", card.message_id)
    w.drain()
    w.citizen(callback=f"rate:{t.number}:unsatisfied")
    w.citizen(text="态度不好")
    assert w.ticket(t.number).status == "archived"  # 渠县: no redo; the unit may appeal within 2 working days
    rated = card_in(w.drain(), CG_CHAT)  # the citizen conversation told the unit about the rating
    assert "诉求人评价：不满意（态度不好）" in rated.text and f"u:appeal:{t.id}" in rated.data
    assert "理由" in only(w.press(CG_CHAT, CG_HANDLER, f"u:appeal:{t.id}", rated.message_id))
    assert "甄别申请" in only(
        w.say(CG_CHAT, CG_HANDLER, "已按规定修复，诉求人对与本件无关的事项不满，附现场照片")
    )
    request = card_in(w.drain(), CENTER_CHAT)
    assert "甄别申请：城市管理局" in request.text and f"c:appok:{t.id}" in request.data
    queue = only(w.cmd(CENTER_CHAT, OPERATOR, "queue"))
    assert t.number in queue and "甄别申请" in queue
    w.press(CENTER_CHAT, OPERATOR, f"c:appok:{t.id}", request.message_id)
    assert any("甄别申请成立" in x for x in texts_to(w.drain(), CG_CHAT))
    with w.db() as s:
        assert s.scalars(select(Rating.appeal).where(Rating.ticket_id == t.id)).one() == "upheld"
        assert s.get(Ticket, t.id).final_rating == "appeal_upheld"
    # a second appeal on the same rating is refused
    assert "没有可申请甄别" in only(w.cmd(CG_CHAT, CG_HANDLER, "appeal", t.number))


# --------------------------------------------------------------------------- privacy


def test_contact_reveal_is_private_and_audited(world):
    w = world
    t = w.file(STREETLIGHT)
    w.drain()
    group_reply = w.press(CG_CHAT, CG_HANDLER, f"u:contact:{t.id}")
    assert "私信" in only(group_reply) and PHONE not in only(group_reply)
    sent = w.drain()
    private = [m for m in sent if m.chat == str(CG_HANDLER)]
    assert len(private) == 1 and PHONE in private[0].text and "王小明" in private[0].text
    assert all(PHONE not in m.text for m in sent if m.chat.startswith("-"))
    with w.db() as s:
        log = s.scalars(select(PIIAccess)).one()
        assert (log.ticket_id, log.viewer) == (t.id, f"staff:{CG_HANDLER}@chengguan")
    detail = only(w.press(CG_CHAT, CG_HANDLER, f"u:detail:{t.id}"))
    assert PHONE not in detail and "138****5678" in detail
    # nothing sent to any group, ever, carries the number
    assert all(PHONE not in m.text for m in w.delivered if m.chat.startswith("-"))


# --------------------------------------------------------------------------- refusals


def test_refusals_change_nothing(world):
    w = world
    t = w.file(STREETLIGHT)
    w.drain()
    cases = [
        (lambda: w.press(CG_CHAT, OUTSIDER, f"u:sign:{t.id}"), "还不是城市管理局登记的工作人员"),
        (lambda: w.press(CG_CHAT, SC_HANDLER, f"u:sign:{t.id}"), "还不是城市管理局登记的工作人员"),
        (lambda: w.press(SC_CHAT, SC_HANDLER, f"u:sign:{t.id}"), "不是交给市场监督管理局办理"),
        (lambda: w.press(SC_CHAT, SC_HANDLER, f"u:contact:{t.id}"), "不是交给市场监督管理局办理"),
        (lambda: w.press(CG_CHAT, CG_HANDLER, f"c:repok:{t.id}"), "热线中心的审核按钮"),
        (lambda: w.press(CENTER_CHAT, OPERATOR, f"u:sign:{t.id}"), "承办单位的按钮"),
        (lambda: w.press(CENTER_CHAT, OPERATOR, f"c:disp:{t.id}:zhujian"), "已经过去"),
        (lambda: w.press(CG_CHAT, CG_HANDLER, f"u:reply:{t.id}"), "已经过去"),
        (lambda: w.press(CG_CHAT, CG_HANDLER, "u:sign:999999"), "失效"),
        (lambda: w.cmd(CG_CHAT, CG_HANDLER, "stats"), "热线中心的命令"),
        (lambda: w.cmd(CG_CHAT, CG_HANDLER, "supervise", t.number), "热线中心的命令"),
        (lambda: w.cmd(CENTER_CHAT, OPERATOR, "pending"), "承办单位群的命令"),
        (lambda: w.cmd(CG_CHAT, OUTSIDER, "pending"), "还不是城市管理局登记的工作人员"),
        (lambda: w.cmd(SC_CHAT, SC_HANDLER, "ticket", t.number), "不是交给市场监督管理局办理"),
        (lambda: w.group("-100777", OUTSIDER, callback=f"u:sign:{t.id}"), "尚未绑定"),
        (
            lambda: handle_group(
                w.svc,
                Incoming(
                    channel="telegram",
                    chat_id=str(OUTSIDER),
                    user_id=str(OUTSIDER),
                    command="bind",
                    args="ABCD2345",
                ),
            ),
            "工作群",
        ),
    ]
    for act, expected in cases:
        before = snapshot(w)
        assert expected in only(act())
        assert snapshot(w) == before, expected
    assert w.say(CG_CHAT, OUTSIDER, "大家中午吃什么？") == []  # chatter is not for the bot
    w.press(CG_CHAT, CG_HANDLER, f"u:sign:{t.id}")
    before = snapshot(w)
    assert "无需重复签收" in only(w.press(CG_CHAT, CG_LEADER, f"u:sign:{t.id}"))
    assert snapshot(w) == before


def test_two_colleagues_answer_in_one_group_without_mixing(world):
    w = world
    a = signed_ticket(w)
    b = signed_ticket(w, "人民路中段的路灯一到晚上就闪个不停，已经一周了")
    w.press(CG_CHAT, CG_LEADER, f"u:extend:{a.id}")
    w.press(CG_CHAT, CG_HANDLER, f"u:reply:{b.id}")
    assert "3个工作日" in only(w.say(CG_CHAT, CG_LEADER, "需协调供电公司"))
    assert "依据" in only(w.say(CG_CHAT, CG_HANDLER, "已更换闪烁的镇流器，路灯恢复正常，纳入日常巡查。"))
    w.say(CG_CHAT, CG_LEADER, "1个工作日")
    assert (w.ticket(a.number).status, w.ticket(b.number).status) == ("extension_requested", "signed")
    assert only(w.cmd(CG_CHAT, CG_HANDLER, "cancel")) == "已取消。"
    assert "没有进行中" in only(w.cmd(CG_CHAT, CG_HANDLER, "cancel"))


# --------------------------------------------------------------------------- co-handling


def test_co_handling_unit_gets_the_card_and_submits_its_part(world):
    w = world
    t = w.file(BARBECUE)
    sent = w.drain()
    co_card = card_in(sent, SC_CHAT)
    assert "协办单位" in co_card.text and f"u:sign:{t.id}" in co_card.data
    assert f"u:sign:{t.id}" in card_in(sent, CG_CHAT).data
    w.press(SC_CHAT, SC_HANDLER, f"u:sign:{t.id}", co_card.message_id)
    assert not texts_to(w.drain(), CITIZEN)  # a co-unit's signature is not the ticket's
    assert w.ticket(t.number).status == "dispatched"
    w.press(CG_CHAT, CG_HANDLER, f"u:sign:{t.id}")
    sent = w.drain()
    co_edit = next(m for m in sent if m.chat == SC_CHAT and m.edit)
    assert co_edit.data[0] == f"u:co:{t.id}"
    assert "协办单位请" in only(w.press(SC_CHAT, SC_HANDLER, f"u:reply:{t.id}"))
    assert "提交主办单位城市管理局" in only(w.press(SC_CHAT, SC_HANDLER, f"u:co:{t.id}", co_edit.message_id))
    w.say(SC_CHAT, SC_HANDLER, "经查该摊位无食品经营许可证，已立案调查并责令停止经营。")
    sent = w.drain()
    assert any("协办单位市场监督管理局" in x and "无食品经营许可证" in x for x in texts_to(sent, CG_CHAT))
    with w.db() as s:
        tu = s.scalars(
            select(TicketUnit).where(TicketUnit.ticket_id == t.id, TicketUnit.unit_code == "shichang")
        ).one()
        assert "无食品经营许可证" in tu.contribution and tu.signed_at is not None
    assert "协办意见（市场监督管理局）" in only(w.press(CG_CHAT, CG_HANDLER, f"u:detail:{t.id}"))


# --------------------------------------------------------------------------- the center's queue


def test_center_confirms_triage_changes_type_and_picks_a_unit(world):
    w = world
    t = w.file(UNCLEAR)
    assert t.status == "triaged"
    review = card_in(w.drain(), CENTER_CHAT)
    assert "待人工确认" in review.text and f"c:disp:{t.id}:zhujian" in review.data
    menu = w.press(CENTER_CHAT, OPERATOR, f"c:type:{t.id}", review.message_id)[0]
    assert [b.label for r in menu.buttons for b in r] == ["咨询", "求助", "投诉", "举报", "建议"]
    assert "投诉" in only(w.press(CENTER_CHAT, OPERATOR, f"c:settype:{t.id}:complaint:m", 777))
    assert w.ticket(t.number).type == "complaint"
    assert any(m.edit == review.message_id and "投诉" in m.text for m in w.drain())
    w.press(CENTER_CHAT, OPERATOR, f"c:pick:{t.id}", review.message_id)
    w.press(CENTER_CHAT, OPERATOR, f"c:disp:{t.id}:shichang:m", 778)
    sent = w.drain()
    assert f"u:sign:{t.id}" in card_in(sent, SC_CHAT).data
    assert any("已转交市场监督管理局办理" in x for x in texts_to(sent, CITIZEN))
    settled = next(m for m in sent if m.edit == review.message_id)
    assert "已处理：转办" in settled.text and settled.data == [f"c:copick:{t.id}"]  # only 添加协办 is left
    t = w.ticket(t.number)
    # 投诉 5 个工作日 from dispatch (渠府办〔2023〕66号 第十一条（二）)
    assert (t.status, t.lead_unit, t.finish_due) == (
        "dispatched",
        "shichang",
        datetime(2026, 11, 30, 9, 0, tzinfo=CHINA_TZ),
    )


def test_center_rejects_with_a_policy_exclusion(world):
    w = world
    t = w.file(UNCLEAR)
    review = card_in(w.drain(), CENTER_CHAT)
    menu = w.press(CENTER_CHAT, OPERATOR, f"c:reject:{t.id}", review.message_id)[0]
    keys = [b.data.split(":")[3] for r in menu.buttons for b in r]
    assert "military" in keys and "litigation" in keys  # 渠县 adds military matters (第八条（五）)
    w.press(CENTER_CHAT, OPERATOR, f"c:rj:{t.id}:military:m", 901)
    told = texts_to(w.drain(), CITIZEN)
    assert any("军队" in x and "第八条（五）" in x and "人民武装部" in x for x in told)
    assert w.ticket(t.number).status == "rejected"


def test_center_commands_queue_stats_supervise_and_ticket(world):
    w = world
    a = w.file(STREETLIGHT)
    w.file(UNCLEAR)
    w.drain()
    w.press(CG_CHAT, CG_HANDLER, f"u:sign:{a.id}")
    queue = only(w.cmd(CENTER_CHAT, OPERATOR, "queue"))
    assert "待确认分类派单" in queue
    stats = only(w.cmd(CENTER_CHAT, OPERATOR, "stats"))
    assert "签收：1" in stats and "今日统计（2026-11-23" in stats
    with w.db() as s:
        received = s.scalar(select(func.count(Ticket.id)))
    assert f"受理：{received}" in stats and "满意率：暂无评价" in stats

    assert "已督办" in only(w.cmd(CENTER_CHAT, OPERATOR, "supervise", f"{a.number} 群众反映强烈，请今天修复"))
    sent = w.drain()
    assert any("热线中心督办" in x and "请今天修复" in x for x in texts_to(sent, CG_CHAT))
    assert w.ticket(a.number).supervised
    detail = only(w.cmd(CG_CHAT, CG_HANDLER, "ticket", a.number))
    assert "办理记录" in detail and "主办单位签收" in detail and "督办" in detail
    assert "热线中心的命令" in only(w.cmd(CG_CHAT, CG_HANDLER, "queue"))
    w.clock.advance(days=4)  # past the 3-working-day limit of 11-26 09:00
    later = only(w.cmd(CENTER_CHAT, OPERATOR, "stats"))
    assert "受理：0" in later and "在办超期：1" in later


def test_pending_lists_open_tickets_by_deadline_and_detail_counts_photos(world, clock):
    w = world
    first = w.file(STREETLIGHT)
    clock.advance(hours=1)
    replies = w.citizen(photo="photo-file-1", caption="建设路口的路灯杆被车撞歪了，随时会倒")
    for _ in range(4):
        datas = [b.data for r in replies[-1].buttons for b in r]
        ok = next((d for d in datas if d.startswith("d:ok")), None)
        if ok:
            w.citizen(callback=ok)
            break
        replies = w.citizen(callback=next(d for d in datas if d.startswith(("skip:", "time:"))))
    second = w.ticket()
    assert second.id != first.id
    w.drain()
    pending = only(w.cmd(CG_CHAT, CG_HANDLER, "pending"))
    assert pending.index(first.number) < pending.index(second.number)
    assert "图片 1 张" in only(w.press(CG_CHAT, CG_HANDLER, f"u:detail:{second.id}"))
    assert "目前没有待办" in only(w.cmd(ZJ_CHAT, ZJ_HANDLER, "pending"))


# --------------------------------------------------------------------------- knowledge base


def test_units_maintain_their_own_knowledge_base_from_the_group(world):
    w = world
    done = only(
        w.cmd(
            CG_CHAT,
            CG_HANDLER,
            "kb",
            "add 路灯坏了找谁修 | 城市道路路灯由城管局负责维修，可拨打12345反映。 "
            "| 《城市照明管理规定》第二十四条",
        )
    )
    assert "已新建并发布知识条目 kb-0001" in done
    assert "问题" in only(w.cmd(SC_CHAT, SC_HANDLER, "kb", "add"))
    w.say(SC_CHAT, SC_HANDLER, "营业执照怎么办理；个体户执照在哪办")
    w.say(SC_CHAT, SC_HANDLER, "携带身份证到政务服务中心市场监管窗口办理，也可网上申请。")
    assert "已新建并发布知识条目 kb-0002" in only(
        w.say(SC_CHAT, SC_HANDLER, "《市场主体登记管理条例》第十五条")
    )
    listing = only(w.cmd(CG_CHAT, CG_HANDLER, "kb", "list"))
    assert "kb-0001" in listing and "kb-0002" not in listing

    refused = only(w.cmd(CG_CHAT, CG_HANDLER, "kb", "edit kb-0002"))
    assert "无权修改" in refused
    assert "无权修改" in only(w.cmd(CG_CHAT, CG_HANDLER, "kb", "retire kb-0002"))
    w.cmd(CG_CHAT, CG_HANDLER, "kb", "edit kb-0001")
    assert "第 2 版" in only(
        w.say(CG_CHAT, CG_HANDLER, "答复：城市道路路灯由城管局路灯所维修，夜间可拨打12345。")
    )
    assert "已停用" in only(w.cmd(CG_CHAT, CG_HANDLER, "kb", "retire kb-0001"))
    with w.db() as s:
        mine, theirs = s.get(KBEntry, "kb-0001"), s.get(KBEntry, "kb-0002")
        assert (mine.unit, mine.status, mine.version) == (
            "chengguan",
            "retired",
            3,
        ) and "路灯所" in mine.answer
        assert (theirs.unit, theirs.status, theirs.version) == ("shichang", "published", 1)
        assert kb_store.history(s, "kb-0001")[-1].changed_by == f"staff:{CG_HANDLER}@chengguan"


# --------------------------------------------------------------------------- parsers


def test_extension_dates_and_labelled_replies_are_understood():
    due = datetime(2026, 11, 26, 9, 0, tzinfo=CHINA_TZ)
    today = due.date() - timedelta(days=3)
    cal = get_calendar()
    assert parse_new_due("2026-12-03", due, today, cal) == datetime(2026, 12, 3, 9, 0, tzinfo=CHINA_TZ)
    assert parse_new_due("延到12月3日下午", due, today, cal) == datetime(2026, 12, 3, 9, 0, tzinfo=CHINA_TZ)
    assert parse_new_due("12月3日 17:30", due, today, cal) == datetime(2026, 12, 3, 17, 30, tzinfo=CHINA_TZ)
    assert parse_new_due("3个工作日", due, today, cal) == datetime(2026, 12, 1, 9, 0, tzinfo=CHINA_TZ)
    assert parse_new_due("再延长三个工作日", due, today, cal) == datetime(2026, 12, 1, 9, 0, tzinfo=CHINA_TZ)
    assert parse_new_due("5天", due, today, cal) == datetime(2026, 12, 1, 9, 0, tzinfo=CHINA_TZ)
    assert parse_new_due("1月5日", due, today, cal) == datetime(2027, 1, 5, 9, 0, tzinfo=CHINA_TZ)
    assert parse_new_due("尽快", due, today, cal) is None
    fields = parse_labelled("办理结果：已修复\n并纳入巡查\n依据：某规定\n经办人：张三\n电话：0818-1234567")
    assert fields == {
        "result": "已修复\n并纳入巡查",
        "basis": "某规定",
        "handler": "张三",
        "phone": "0818-1234567",
    }


def test_forged_oversized_ticket_id_is_refused_politely(world):
    w = world
    reply = only(w.press(CG_CHAT, CG_HANDLER, "u:sign:99999999999999999999"))
    assert "系统繁忙" not in reply and reply


def test_center_adds_a_co_handling_unit_with_the_plain_function(world):
    from bot.center import add_co_handling
    from models.errors import IllegalTransition, PermissionDenied, WorkflowError
    from models.workflow import Actor

    w = world
    t = signed_ticket(w)
    center = Actor("center", str(OPERATOR), unit_code="center")
    with w.db.begin() as s:
        ticket = s.get(Ticket, t.id)
        with pytest.raises(PermissionDenied):
            add_co_handling(s, ticket, Actor("staff", str(CG_HANDLER), unit_code="chengguan"), ["shichang"])
    with w.db.begin() as s:
        assert add_co_handling(s, s.get(Ticket, t.id), center, ["shichang", "chengguan"]) == ["shichang"]
    sent = w.drain()
    co_card = card_in(sent, SC_CHAT)
    assert "指定贵单位为协办单位（主办单位：城市管理局）" in co_card.text and f"u:sign:{t.id}" in co_card.data
    assert any("添加了协办单位：市场监督管理局" in x for x in texts_to(sent, CG_CHAT))
    assert any("协办：市场监督管理局" in m.text for m in sent if m.chat == CG_CHAT and m.edit)
    with w.db.begin() as s:
        with pytest.raises(WorkflowError, match="无需重复添加"):
            add_co_handling(s, s.get(Ticket, t.id), center, ["shichang"])
    # the co-unit signs and hands its part to the lead, which answers for both
    w.press(SC_CHAT, SC_HANDLER, f"u:sign:{t.id}", co_card.message_id)
    w.press(SC_CHAT, SC_HANDLER, f"u:co:{t.id}")
    assert "提交主办单位城市管理局" in only(w.say(SC_CHAT, SC_HANDLER, "经检测油烟超标，已下达整改通知"))
    submitted_reply(w, t)
    with w.db.begin() as s:
        with pytest.raises(IllegalTransition):
            add_co_handling(s, s.get(Ticket, t.id), center, ["zhujian"])
    with w.db() as s:
        units = {tu.unit_code: tu.role for tu in s.scalars(select(TicketUnit).where(TicketUnit.ticket_id == t.id))}
        assert units == {"chengguan": "lead", "shichang": "co"}
        assert s.scalar(select(func.count(TicketEvent.id)).where(TicketEvent.action == "add_co")) == 1


def test_first_unsatisfied_in_quxian_is_archived_not_promised_a_redo(world):
    w = world
    t = signed_ticket(w)
    card = submitted_reply(w, t)
    w.press(CENTER_CHAT, OPERATOR, f"c:repok:{t.id}", card.message_id)
    w.drain()
    asked = only(w.citizen(callback=f"rate:{t.number}:unsatisfied"))
    told = only(w.citizen(text="态度不好"))
    sent = w.drain()
    assert w.ticket(t.number).status == "archived"
    assert "重新办理" not in asked
    assert "已归档" in told and "人工回访" not in told
    assert not any("再次不满意" in x for x in texts_to(sent, CENTER_CHAT))


def test_citizens_who_joined_a_ticket_hear_the_approved_reply_but_get_no_survey(world):
    from bot.citizen import get_or_create_citizen
    from triage.similar import add_follower

    w = world
    t = signed_ticket(w)
    with w.db.begin() as s:
        neighbour = get_or_create_citizen(s, "telegram", "7002")
        add_follower(s, s.get(Ticket, t.id), neighbour.id, "那个路灯我也看到坏了")
    card = submitted_reply(w, t)
    w.press(CENTER_CHAT, OPERATOR, f"c:repok:{t.id}", card.message_id)
    sent = w.drain()
    [told] = [m for m in sent if m.chat == "7002"]
    assert t.number in told.text and "路灯已恢复照明" in told.text and told.data == []
    assert any(m.data and m.data[0].startswith("rate:") for m in sent if m.chat == CITIZEN)
