"""The citizen's conversation, called as a plain function (the channels are tested elsewhere).

Triage here is a small deterministic stand-in so each path is chosen on purpose; the real model is
exercised end to end in test_telegram_e2e.py and in the triage tests.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from bot.bench_e2e import summary_content, superseded_confirms
from bot.citizen import handle_citizen
from bot.console import ConsoleChannel
from bot.messages import Incoming
from bot.services import Services
from kb.store import Editor, create_entry
from models.catalog import load_catalog
from models.tables import Attachment, ChatBinding, OutboxMessage, ScreeningEvent, Ticket


def fake_triage(text: str) -> dict:
    if "着火" in text:
        return {"verdict": "emergency", "redirect": "119", "type": "help", "units": [], "confidence": 1.0}
    if "法院" in text:
        return {"verdict": "reject", "reason": "litigation", "key": "litigation", "units": []}
    if "居住证" in text:
        return {
            "verdict": "accept",
            "type": "consultation",
            "units": ["gongan"],
            "confidence": 0.9,
            "kb": {"id": "kb-0001", "score": 0.9},
        }
    if "不确定" in text:
        return {
            "verdict": "accept",
            "type": "help",
            "units": ["zhujian", "chengguan"],
            "confidence": 0.4,
            "needs_review": True,
        }
    return {
        "verdict": "accept",
        "type": "complaint",
        "units": ["chengguan"],
        "confidence": 0.92,
        "needs_review": False,
    }


@pytest.fixture
def services(db):
    with db.begin() as s:
        load_catalog(s)
        create_entry(
            s,
            Editor.center("test"),
            entry_id="kb-0001",
            questions=["居住证怎么办理"],
            answer="持身份证和居住证明材料到居住地派出所户籍窗口申领居住证。",
            unit="gongan",
            basis="《居住证暂行条例》第九条",
            status="published",
        )
        s.add(ChatBinding(chat_id=-100, unit_code="chengguan"))
        s.add(ChatBinding(chat_id=-900, unit_code="center"))
    return Services(sessions=db, triage=fake_triage, policy_name="quxian")


def say(services, text=None, user="42", **kw):
    return handle_citizen(services, Incoming(channel="telegram", chat_id=user, user_id=user, text=text, **kw))


def press(services, data, user="42"):
    return say(services, callback=data, user=user)


def to_confirm(services, db, user="42") -> str:
    """Answer the missing-element questions (skip place, 'today') until the summary; returns its token."""
    from bot.state import load_state

    for _ in range(4):
        with db() as s:
            st = load_state(s, "telegram", user)
        if st.state == "confirm":
            return st.token
        if st.state == "ask_place":
            press(services, f"skip:place:{st.token}", user=user)
        elif st.state == "ask_time":
            press(services, f"time:today:{st.token}", user=user)
        else:
            raise AssertionError(f"unexpected state {st.state}")
    raise AssertionError("never reached the summary")


def test_start_shows_scope_emergency_numbers_privacy_and_menu(services):
    [r] = say(services, command="start")
    assert "119" in r.text and "120" in r.text and "隐私" in r.text and "不受理" in r.text
    labels = [b.label for row in r.buttons for b in row]
    assert labels == ["反映问题", "咨询", "查询进度", "我的诉求"]


def test_emergency_first_reply_says_call_119_and_nothing_is_queued(services, db):
    [r] = say(services, "楼下着火了好大的烟")
    assert r.text.startswith("🚨 请立即拨打 119")
    with db() as s:
        assert s.scalars(select(Ticket)).all() == []
        ev = s.scalars(select(ScreeningEvent)).one()
        assert ev.verdict == "emergency" and ev.detail == "119"


def test_rejection_gives_reason_basis_and_where_to_go(services):
    [r] = say(services, "法院判决不公你们管管")
    assert "诉讼" in r.text and "渠府办〔2023〕66号 第八条" in r.text and "建议您" in r.text


def test_full_complaint_asks_for_missing_place_and_time_then_dispatches(services, db):
    [r] = say(services, "烧烤摊占道经营油烟太大")
    assert "地点" in r.text and r.ask_location
    [r] = say(services, "幸福路88号门口")
    assert "什么时候" in r.text
    time_button = r.buttons[0][0]
    [r] = press(services, time_button.data)
    assert "请确认" in r.text and "投诉" in r.text and "幸福路88号门口" in r.text and "城市管理局" in r.text
    ok = r.buttons[0][0]
    [r] = press(services, ok.data)
    assert "已受理，工单号" in r.text and "城市管理局" in r.text and "前答复" in r.text
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.status == "dispatched" and t.lead_unit == "chengguan" and t.ev_place == "幸福路88号门口"
        card = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == "-100")).one()
        assert t.number in card.text and "签收" in str(card.markup)
    # the confirm button is now stale: pressing it again creates nothing
    [r] = press(services, ok.data)
    assert "过期" in r.text
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 1


def test_a_message_written_while_a_request_awaits_confirmation_is_added_and_the_citizen_is_told(services, db):
    say(services, "烧烤摊占道经营油烟太大")
    token = to_confirm(services, db)
    [r] = say(services, "每天晚上十点以后最吵")
    assert r.text.startswith("已把您刚发的这条消息补充到") and "另一件事" in r.text
    assert "内容：烧烤摊占道经营油烟太大\n每天晚上十点以后最吵" in r.text
    # the load bench reads the content a citizen confirms off this summary (hotline bench e2e)
    assert summary_content(r.text) == "烧烤摊占道经营油烟太大\n每天晚上十点以后最吵"
    # the summary shown before the message does not file the longer content: it shows the new one again
    [again] = press(services, f"d:ok:{token}")
    assert again.text.startswith("这条诉求的内容在您按按钮前有了更新")
    assert "内容：烧烤摊占道经营油烟太大\n每天晚上十点以后最吵" in again.text
    with db() as s:
        assert s.scalars(select(Ticket)).all() == []
    [filed] = press(services, again.buttons[0][0].data)
    assert "已受理，工单号" in filed.text
    with db() as s:
        assert s.scalars(select(Ticket.original_text)).one() == "烧烤摊占道经营油烟太大\n每天晚上十点以后最吵"
    # the load bench tells such a superseded confirmation from the chat's messages (it files nothing)
    first = {"chat_id": "42", "text": "请确认您的诉求：…", "buttons": [["✅ 确认提交", f"d:ok:{token}"]]}
    sent = [first] + [
        {"chat_id": "42", "text": x.text, "buttons": [[b.label, b.data] for row in x.buttons for b in row]}
        for x in (r, again, filed)
    ]
    assert superseded_confirms(sent) == {("42", f"d:ok:{token}")}


def test_kb_answer_then_not_solved_becomes_a_ticket(services, db):
    [r] = say(services, "外地人怎么办居住证")
    assert "解决了吗" in r.text and "来源" in r.text
    no = r.buttons[0][1]
    [r] = press(services, no.data)
    assert "地点" in r.text or "请确认" in r.text


def test_kb_answer_solved_is_recorded(services, db):
    [r] = say(services, "居住证怎么办")
    [r] = press(services, r.buttons[0][0].data)
    assert "很高兴" in r.text
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.status == "answered" and t.kb_entry_id == "kb-0001"


def test_low_confidence_goes_to_center_queue(services, db):
    say(services, "不确定归谁管的事情，建设路口每天都有")
    [r] = press(services, f"d:ok:{to_confirm(services, db)}")
    assert "人工确认" in r.text
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.status == "triaged"
        queued = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == "-900")).one()
        assert "待人工确认" in queued.text


def test_status_of_someone_elses_ticket_is_refused(services, db):
    say(services, "幸福路路灯不亮好几天了", user="1")
    press(services, f"d:ok:{to_confirm(services, db, user='1')}", user="1")
    with db() as s:
        number = s.scalars(select(Ticket.number)).one()
    [mine] = say(services, command="status", args=number, user="1")
    assert number in mine.text and "已转办" in mine.text
    [other] = say(services, command="status", args=number, user="2")
    assert "没有找到" in other.text and "幸福路" not in other.text


@pytest.mark.parametrize(
    ("kw", "expect"),
    [
        ({"text": "   "}, "没有收到文字内容"),
        ({"text": "😀😀😀🙏"}, "没看懂"),
        ({"text": "问" * 5001}, "超过5000字"),
        ({"other": "sticker"}, "表情"),
        ({"other": "voice"}, "语音"),
        ({"callback": "d:ok:deadbeef"}, "过期"),
        ({"command": "frobnicate"}, "不认识"),
    ],
)
def test_bad_input_gets_a_polite_message(services, kw, expect):
    [r] = say(services, **kw)
    assert expect in r.text


def test_5000_characters_are_accepted_whole(services, db):
    text = "幸福路88号烧烤摊占道经营。" + "油烟很大。" * 990
    assert len(text) <= 5000
    say(services, text)
    with db() as s:
        from bot.state import load_state

        st = load_state(s, "telegram", "42")
    assert st.data["text"] == text.strip()


def test_photo_without_text_waits_for_a_description_and_is_attached(services, db):
    [r] = say(services, photo="PHOTO-1")
    assert "收到图片" in r.text
    say(services, "幸福路88号烧烤摊占道经营，每天晚上")
    token = to_confirm(services, db)
    with db() as s:
        from bot.state import load_state

        assert load_state(s, "telegram", "42").data["photos"] == ["PHOTO-1"]
    press(services, f"d:ok:{token}")
    with db() as s:
        att = s.scalars(select(Attachment)).one()
        assert att.file_ref == "PHOTO-1"


def test_cancel_leaves_any_step(services, db):
    say(services, "烧烤摊占道经营油烟太大")
    [r] = say(services, command="cancel")
    assert "已取消" in r.text
    [r] = say(services, command="cancel")
    assert "没有进行中" in r.text


def test_console_runs_the_same_conversation_with_numbered_buttons(services, db):
    lines: list[str] = []
    ch = ConsoleChannel(services, out=lines.append, user="c1")
    ch.send("/start")
    assert any("[1] 反映问题" in line for line in lines)
    ch.send("幸福路88号烧烤摊占道经营，每天晚上油烟很大")
    ch.send("1")  # the first button of the summary: confirm
    assert any("已受理，工单号" in line for line in lines)
    with db() as s:
        t = s.scalars(select(Ticket)).one()
        assert t.channel == "console"


def _report_streetlight(services, db, user: str, text: str) -> list:
    """Write ``text``, answer the place and time questions; returns the reply shown at the confirm step."""
    from bot.state import load_state

    replies = say(services, text, user=user)
    for _ in range(4):
        with db() as s:
            st = load_state(s, "telegram", user)
        if st.state == "confirm":
            return replies
        if st.state == "ask_place":
            replies = say(services, "幸福路与建设路交叉口", user=user)
        elif st.state == "ask_time":
            replies = press(services, f"time:today:{st.token}", user=user)
        else:
            raise AssertionError(f"unexpected state {st.state}")
    raise AssertionError("never reached the confirm step")


class EmbeddingTriage:
    """The fake triage plus the real e5 embedding the product's triage exposes for similar tickets."""

    def __call__(self, text: str) -> dict:
        return fake_triage(text)

    def embed(self, text: str):
        from triage.embedding import get_encoder

        return get_encoder().encode([text], prefix="query: ")[0]


@pytest.fixture
def services_emb(services):
    return Services(sessions=services.sessions, triage=EmbeddingTriage(), policy_name=services.policy_name)


@pytest.mark.slow
def test_second_citizen_reporting_the_same_streetlight_can_join_the_open_ticket(services_emb, db):
    services = services_emb
    [r] = _report_streetlight(services, db, "1", "幸福路与建设路交叉口的路灯坏了，晚上一片漆黑")
    [r] = press(services, r.buttons[0][0].data, user="1")
    assert "已受理，工单号" in r.text
    number = r.text.split("工单号 ")[1].split("\n")[0].strip()
    # a neighbour writes about the same lamp in other words
    [offer] = _report_streetlight(services, db, "2", "建设路交叉口那个路灯坏了好几天，晚上漆黑一片不安全")
    assert number in offer.text and "加入" in offer.text and "仍然新建" in offer.text
    join = offer.buttons[0][0]
    [r] = press(services, join.data, user="2")
    assert number in r.text and "已将您加入" in r.text
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 1  # no duplicate ticket for the unit
    # the follower may look at the progress of the ticket joined, and the join button is now stale
    [r] = say(services, command="status", args=number, user="2")
    assert number in r.text and "已转办" in r.text
    [r] = say(services, command="status", args=number, user="3")
    assert "没有找到" in r.text
    [r] = press(services, join.data, user="2")
    assert "过期" in r.text


@pytest.mark.slow
def test_declining_the_join_offer_files_a_new_ticket_and_other_places_get_no_offer(services_emb, db):
    services = services_emb
    [r] = _report_streetlight(services, db, "1", "幸福路与建设路交叉口的路灯坏了，晚上一片漆黑")
    press(services, r.buttons[0][0].data, user="1")
    [offer] = _report_streetlight(services, db, "2", "建设路交叉口那个路灯坏了好几天，晚上漆黑一片不安全")
    [r] = press(services, offer.buttons[0][1].data, user="2")
    assert "请确认" in r.text
    [r] = press(services, r.buttons[0][0].data, user="2")
    assert "已受理，工单号" in r.text
    # the same citizen again, or a different event, is not offered a join
    [r] = _report_streetlight(services, db, "3", "人民公园南门的公厕没有水，脏得没法用")
    assert "请确认" in r.text and "加入" not in r.text
    with db() as s:
        assert len(s.scalars(select(Ticket)).all()) == 2


def test_real_name_is_asked_once_and_the_unit_card_shows_it_masked(db):
    """平利 (第七条（十）): complaints need a real name. The contact a citizen shares is kept: their next
    complaint is not asked for it again, and the unit's card shows it masked, never in plain text."""
    with db.begin() as s:
        load_catalog(s)
        s.add(ChatBinding(chat_id=-100, unit_code="chengguan"))
    services = Services(sessions=db, triage=fake_triage, policy_name="pingli")
    say(services, "烧烤摊占道经营油烟太大")
    say(services, "幸福路88号门口")
    [r] = press(services, f"time:today:{_token(db)}")
    assert "实名" in r.text and "第七条" in r.text and r.ask_contact
    [r] = say(services, contact_phone="13812345678", contact_name="王小明", contact_user_id="42")
    assert "请确认" in r.text
    [r] = press(services, f"d:ok:{_token(db)}")
    assert "已受理" in r.text
    say(services, "工地夜间施工噪音扰民")
    say(services, "建设路12号工地")
    [r] = press(services, f"time:today:{_token(db)}")
    assert "请确认" in r.text and "实名" not in r.text  # the contact given before is used
    [r] = press(services, f"d:ok:{_token(db)}")
    assert "已受理" in r.text
    with db() as s:
        cards = s.scalars(select(OutboxMessage).where(OutboxMessage.chat_id == "-100")).all()
        assert len(cards) == 2
        for card in cards:
            assert "13812345678" not in card.text and "王小明" not in card.text
            assert "138****5678" in card.text and "王*" in card.text


def _token(db, user="42") -> str:
    from bot.state import load_state

    with db() as s:
        return load_state(s, "telegram", user).token
