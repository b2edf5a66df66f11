"""The scheduler: time moves, deadlines chase themselves, and every reminder, card, supervision and survey
step reaches the right chat exactly once (across repeats, restarts, nights, holidays and two schedulers)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import datetime
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import sessionmaker

from bot.outbox import claim_batch
from models.clock import CHINA_TZ
from models.db import make_engine
from models.tables import ChatBinding, Notice, OutboxMessage, Rating, Ticket, TicketEvent
from models.workflow import (
    decide_extension,
    rate,
    request_extension,
    review_reply,
    sign,
    submit_reply,
)
from scheduler import runner
from scheduler.sweep import sweep
from tests.conftest import PG_URL
from tests.helpers import CENTER, add_units, citizen, dispatched_ticket, staff

CG = staff("chengguan")
ZJ = staff("zhujian")
CG_CHAT, ZJ_CHAT, CENTER_CHAT = -1001, -1002, -1900
REPLY = dict(
    result="已联系城管中队现场核查，烧烤摊已劝离并责令不得占道经营，后续纳入日常巡查。",
    basis="《城市市容和环境卫生管理条例》第十四条",
    handler="张三",
    phone="0818-7654321",
)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=CHINA_TZ)


def bind_chats(s) -> None:
    s.add_all(
        [
            ChatBinding(chat_id=CG_CHAT, unit_code="chengguan"),
            ChatBinding(chat_id=ZJ_CHAT, unit_code="zhujian"),
            ChatBinding(chat_id=CENTER_CHAT, unit_code="center"),
        ]
    )
    s.flush()


def new_ticket(db, **kw) -> int:
    with db.begin() as s:
        if not s.get(ChatBinding, CG_CHAT):
            add_units(s)
            bind_chats(s)
        return dispatched_ticket(s, **kw).id


def received(db, chat: int | str | None = None) -> Counter:
    """What each chat has been sent, by outbox kind."""
    with db() as s:
        stmt = select(OutboxMessage.chat_id, OutboxMessage.kind)
        if chat is not None:
            stmt = stmt.where(OutboxMessage.chat_id == str(chat))
        return Counter(kind for _, kind in s.execute(stmt))


def messages(db, kind: str) -> list[OutboxMessage]:
    with db() as s:
        return list(
            s.scalars(select(OutboxMessage).where(OutboxMessage.kind == kind).order_by(OutboxMessage.id))
        )


def notices(db) -> Counter:
    with db() as s:
        return Counter(s.scalars(select(Notice.kind)))


def ticket(db, tid: int) -> Ticket:
    with db() as s:
        return s.get(Ticket, tid)


def reopened(engine) -> sessionmaker:
    """A scheduler restart: a brand-new engine and session factory on the same database."""
    if engine.dialect.name == "postgresql":
        eng = create_engine(PG_URL, connect_args={"options": f"-csearch_path={engine.hotline_schema}"})
    else:
        eng = make_engine(engine.url.render_as_string(hide_password=False))
    return sessionmaker(eng, expire_on_commit=False)


# --------------------------------------------------------------------------- a ticket's whole life


def test_a_ticket_whole_life_urge_yellow_red_supervision_survey_reminder_and_expiry_once_each(
    db, engine, clock
):
    # Monday 2026-11-23 09:00, 渠县 complaint: sign by Tue 09:00, finish by next Mon 09:00 (5 wd),
    # yellow card one working day before (Fri 09:00, earlier than 75% of the time)
    with db.begin() as s:
        add_units(s)
        bind_chats(s)
        who = citizen(s, "c-77")
        tid = dispatched_ticket(s, who=who).id
    t = ticket(db, tid)
    assert (t.sign_due, t.finish_due, t.yellow_at) == (
        at(2026, 11, 24, 9),
        at(2026, 11, 30, 9),
        at(2026, 11, 27, 9),
    )

    clock.set(at(2026, 11, 24, 8, 59))
    assert sweep(db).acted == 0
    clock.set(at(2026, 11, 24, 9, 0))
    stats = sweep(db)
    assert stats.urged == 1
    assert received(db, CG_CHAT) == Counter({"urge_sign": 1})
    urge_msg = messages(db, "urge_sign")[0]
    assert "催办" in urge_msg.text and t.number in urge_msg.text and "签收" in str(urge_msg.markup)
    assert ticket(db, tid).urge_count == 1

    # the same minute again, and again after a restart: nothing new
    assert sweep(db).acted == 0
    restarted = reopened(engine)
    clock.advance(minutes=1)
    assert sweep(restarted).acted == 0
    restarted.kw["bind"].dispose()

    clock.set(at(2026, 11, 24, 10, 0))
    with db.begin() as s:
        sign(s, s.get(Ticket, tid), CG)
    clock.set(at(2026, 11, 27, 8, 59))
    assert sweep(db).acted == 0
    clock.set(at(2026, 11, 27, 9, 0))
    assert sweep(db).yellow == 1
    assert sweep(db).acted == 0
    yellow = messages(db, "yellow")
    assert len(yellow) == 1 and yellow[0].chat_id == str(CG_CHAT)
    assert "黄牌" in yellow[0].text and "本月贵单位第 1 张黄牌" in yellow[0].text

    clock.set(at(2026, 11, 30, 9, 0))
    stats = sweep(db)
    assert (stats.red, stats.escalations, stats.yellow) == (1, 1, 0)
    t = ticket(db, tid)
    assert t.overdue and t.supervised and t.overdue_count == 1
    assert received(db, CG_CHAT) == Counter({"urge_sign": 1, "yellow": 1, "red": 1})
    assert received(db, CENTER_CHAT) == Counter({"supervise": 1})
    supervision = messages(db, "supervise")[0].text
    assert "超期督办" in supervision and t.number in supervision
    assert "第 1 次超期：第一次超期：县行政审批局约谈" in supervision  # 渠府办〔2023〕66号 第十九条（一）
    with db() as s:
        esc = s.scalars(select(TicketEvent).where(TicketEvent.action == "escalate")).one()
        assert esc.payload["nth"] == 1 and "县行政审批局" in esc.payload["step"]
    clock.advance(minutes=5)
    assert sweep(db).acted == 0

    clock.set(at(2026, 11, 30, 10, 0))
    with db.begin() as s:
        tk = s.get(Ticket, tid)
        submit_reply(s, tk, CG, **REPLY)
        review_reply(s, tk, CENTER, approve=True)
    assert ticket(db, tid).survey_due == at(2026, 12, 3, 10, 0)
    clock.set(at(2026, 12, 1, 9, 59))
    assert sweep(db).acted == 0
    clock.set(at(2026, 12, 1, 10, 0))
    assert sweep(db).survey_reminders == 1
    assert sweep(db).acted == 0
    reminder = messages(db, "survey_reminder")
    assert [m.chat_id for m in reminder] == ["c-77"]
    assert "回访提醒" in reminder[0].text and f"rate:{t.number}:satisfied" in str(reminder[0].markup)

    clock.set(at(2026, 12, 3, 10, 0))
    assert sweep(db).surveys_expired == 1
    t = ticket(db, tid)
    assert t.status == "archived" and t.final_rating == "none"
    with db() as s:
        assert [r.value for r in s.scalars(select(Rating).where(Rating.ticket_id == tid))] == ["none"]
    clock.advance(days=3)
    assert sweep(db).acted == 0

    assert notices(db) == Counter(
        {"urge_sign": 1, "yellow": 1, "red": 1, "escalation": 1, "survey_reminder": 1, "survey_expired": 1}
    )
    assert received(db) == Counter(
        {"urge_sign": 1, "yellow": 1, "red": 1, "supervise": 1, "survey_reminder": 1}
    )


def test_a_rated_reply_gets_no_reminder_and_is_not_expired(db, clock):
    with db.begin() as s:
        add_units(s)
        bind_chats(s)
        tk = dispatched_ticket(s, who=citizen(s, "c-1"))
        sign(s, tk, CG)
        submit_reply(s, tk, CG, **REPLY)
        review_reply(s, tk, CENTER, approve=True)
        tid = tk.id
    clock.advance(hours=5)
    with db.begin() as s:
        rate(s, s.get(Ticket, tid), CENTER, value="satisfied")
    for _ in range(4):
        clock.advance(days=1)
        assert sweep(db).acted == 0
    assert ticket(db, tid).final_rating == "satisfied"
    assert received(db) == Counter()


def test_a_scheduler_down_for_days_catches_up_once_without_a_stale_yellow(db, clock):
    tid = new_ticket(db)
    clock.set(at(2026, 12, 2, 10, 0))  # nobody swept for nine days: the ticket is unsigned and overdue
    stats = sweep(db)
    assert (stats.urged, stats.red, stats.yellow) == (1, 1, 0)
    assert received(db, CG_CHAT) == Counter({"urge_sign": 1, "red": 1})
    assert received(db, CENTER_CHAT) == Counter({"supervise": 1})
    assert ticket(db, tid).overdue
    clock.advance(minutes=1)
    assert sweep(db).acted == 0


def test_an_approved_extension_moves_the_cards_to_the_new_deadline(db, clock):
    tid = new_ticket(db)
    with db.begin() as s:
        sign(s, s.get(Ticket, tid), CG)
    clock.set(at(2026, 11, 27, 9, 0))
    assert sweep(db).yellow == 1
    clock.set(at(2026, 11, 27, 14, 0))
    with db.begin() as s:
        tk = s.get(Ticket, tid)
        request_extension(s, tk, CG, reason="需协调多个部门现场核查", new_due=at(2026, 12, 3, 9, 0))
        decide_extension(s, tk, CENTER, approve=True)
    # 75% of Fri 14:00 → Thu 09:00 falls on Tue 22:15: inside quiet hours, so the card waits for Wed 08:00
    assert ticket(db, tid).yellow_at == at(2026, 12, 1, 22, 15)
    clock.set(at(2026, 11, 30, 9, 0))
    assert sweep(db).acted == 0  # the old deadline no longer makes it overdue
    clock.set(at(2026, 12, 1, 22, 30))
    assert sweep(db).acted == 0
    clock.set(at(2026, 12, 2, 7, 59))
    assert sweep(db).acted == 0
    clock.set(at(2026, 12, 2, 8, 0))
    assert sweep(db).yellow == 1
    clock.set(at(2026, 12, 3, 9, 0))
    assert sweep(db).red == 1
    assert notices(db)["yellow"] == 2 and notices(db)["red"] == 1
    assert received(db, CG_CHAT) == Counter({"yellow": 2, "red": 1})


def test_a_units_second_overdue_is_reported_upward(db, clock):
    first = new_ticket(db)
    other = new_ticket(db, lead="zhujian")
    clock.advance(hours=1)
    second = new_ticket(db)
    for tid, who in ((first, CG), (second, CG), (other, ZJ)):
        with db.begin() as s:
            sign(s, s.get(Ticket, tid), who)
    clock.set(at(2026, 11, 30, 9, 30))  # first and other overdue, second not yet
    assert sweep(db).escalations == 2
    clock.set(at(2026, 11, 30, 10, 30))
    assert sweep(db).escalations == 1
    texts = {m.ticket_id: m.text for m in messages(db, "supervise")}
    assert "第 1 次超期：第一次超期：县行政审批局约谈" in texts[first]
    assert "第 2 次超期：第二次超期：县纪委监委约谈" in texts[second]
    assert "第 1 次超期" in texts[other]  # counted per unit
    reds = {m.ticket_id: m.text for m in messages(db, "red")}
    assert "本月贵单位第 2 张红牌" in reds[second]
    assert received(db, ZJ_CHAT) == Counter({"red": 1})


# --------------------------------------------------------------------------- quiet hours, holidays, urgency


def test_a_night_reminder_waits_for_8am_across_the_national_day_holiday(db, clock):
    clock.set(at(2026, 9, 30, 22, 30))  # the eve of National Day (1–7 October off)
    tid = new_ticket(db)
    assert ticket(db, tid).sign_due == at(2026, 10, 8, 22, 30)  # the next working day
    for day in range(1, 8):
        clock.set(at(2026, 10, day, 10, 0))
        assert sweep(db).acted == 0
    clock.set(at(2026, 10, 8, 22, 31))
    stats = sweep(db)
    assert stats.quiet and stats.acted == 0
    clock.set(at(2026, 10, 9, 7, 59))
    assert sweep(db).acted == 0
    clock.set(at(2026, 10, 9, 8, 0))
    assert sweep(db).urged == 1
    assert received(db, CG_CHAT) == Counter({"urge_sign": 1})


def test_urgent_reminders_go_at_once_at_night_on_a_holiday(db, clock):
    clock.set(
        at(2026, 10, 3, 21, 30)
    )  # a holiday evening; 渠县 特殊紧急事项: respond in 2 h, finish 1 wd after the holiday
    tid = new_ticket(db, type="help", urgent_level="special_urgent")
    t = ticket(db, tid)
    assert t.respond_due == at(2026, 10, 3, 23, 30) and t.finish_due == at(2026, 10, 9, 0, 0)
    clock.set(at(2026, 10, 3, 23, 31))
    stats = sweep(db)
    assert stats.quiet and stats.urgent_urged == 1
    urgent = messages(db, "urge_respond")
    assert len(urgent) == 1 and "紧急催办" in urgent[0].text and "特殊紧急事项" in urgent[0].text
    assert urgent[0].next_attempt_at == clock.now()  # not held for the morning
    clock.set(at(2026, 10, 9, 0, 30))
    stats = sweep(db)
    assert (
        stats.quiet and stats.red == 1
    )  # unsigned and overdue, at night: red card and supervision go at once
    assert {m.kind: m.next_attempt_at for m in messages(db, "red") + messages(db, "supervise")} == {
        "red": clock.now(),
        "supervise": clock.now(),
    }


def test_overdue_at_night_is_recorded_at_once_and_its_cards_wait_for_8am(db, clock):
    clock.set(at(2026, 11, 23, 23, 0))
    tid = new_ticket(db, type="consultation")  # 2 wd: due Wed 23:00
    clock.set(at(2026, 11, 24, 10, 0))
    with db.begin() as s:
        sign(s, s.get(Ticket, tid), CG)
    clock.set(at(2026, 11, 25, 23, 1))
    assert sweep(db).red == 1
    assert ticket(db, tid).overdue  # the fact is recorded at once
    morning = at(2026, 11, 26, 8, 0)
    held = messages(db, "red") + messages(db, "supervise")
    assert len(held) == 2 and all(m.next_attempt_at == morning for m in held)
    assert not [m for m in claim_batch(db, "telegram") if m.kind in ("red", "supervise")]
    clock.set(morning)
    assert {m.kind for m in claim_batch(db, "telegram")} >= {"red", "supervise"}
    assert sweep(db).red == 0


def test_hour_limits_get_a_yellow_card_at_three_quarters_only(db, clock):
    tid = new_ticket(db, policy="suqian")  # 宿迁: complaints 12 h, sign 1 h, no "one working day before"
    with db.begin() as s:
        sign(s, s.get(Ticket, tid), CG)
    t = ticket(db, tid)
    assert (t.finish_due, t.yellow_at) == (at(2026, 11, 23, 21, 0), at(2026, 11, 23, 18, 0))
    clock.set(at(2026, 11, 23, 17, 59))
    assert sweep(db).acted == 0
    clock.set(at(2026, 11, 23, 18, 0))
    assert sweep(db).yellow == 1
    clock.set(at(2026, 11, 23, 21, 0))
    assert sweep(db).red == 1


def test_a_limited_sweep_leaves_the_rest_for_the_next_one(db, clock):
    ids = [new_ticket(db) for _ in range(3)]
    clock.set(at(2026, 11, 24, 9, 5))
    assert [sweep(db, limit=1).urged for _ in range(4)] == [1, 1, 1, 0]
    assert received(db, CG_CHAT) == Counter({"urge_sign": 3})
    assert all(ticket(db, i).urge_count == 1 for i in ids)


@pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL")
def test_two_schedulers_on_postgresql_send_each_notice_exactly_once(db, engine, clock):
    ids = [new_ticket(db) for _ in range(12)]
    with db.begin() as s:  # half of them signed: these go overdue, the others are only urged
        for tid in ids[:6]:
            sign(s, s.get(Ticket, tid), CG)
    clock.set(at(2026, 11, 30, 9, 30))
    factories = [reopened(engine), reopened(engine)]
    barrier = threading.Barrier(2)
    results = []

    def run(factory) -> None:
        barrier.wait()
        results.append(sweep(factory))

    threads = [threading.Thread(target=run, args=(f,)) for f in factories]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for f in factories:
        f.kw["bind"].dispose()
    assert sum(r.urged for r in results) == 6
    assert sum(r.red for r in results) == 12  # the unsigned ones are overdue too
    assert sum(r.escalations for r in results) == 12
    assert notices(db) == Counter({"urge_sign": 6, "red": 12, "escalation": 12})
    assert received(db, CG_CHAT) == Counter({"urge_sign": 6, "red": 12})
    assert received(db, CENTER_CHAT) == Counter({"supervise": 12})
    with db() as s:  # every overdue of the unit got its own rank: 1st … 12th
        nths = sorted(
            e.payload["nth"] for e in s.scalars(select(TicketEvent).where(TicketEvent.action == "escalate"))
        )
    assert nths == list(range(1, 13))


# --------------------------------------------------------------------------- the jobs and the process


def test_morning_digest_tells_each_unit_what_is_overdue_due_today_and_soon(db, clock):
    overdue = new_ticket(db, type="consultation")  # due Wed 09:00
    clock.set(at(2026, 11, 24, 9, 0))
    today = new_ticket(db, type="consultation")  # due Thu 09:00
    clock.set(at(2026, 11, 25, 9, 0))
    soon = new_ticket(db, type="consultation")  # due Fri 09:00
    later = new_ticket(db)  # due next Wed
    with db.begin() as s:
        for tid in (overdue, today, soon, later):
            sign(s, s.get(Ticket, tid), CG)
    clock.set(at(2026, 11, 26, 8, 30))
    runner.set_factory(db)
    try:
        assert runner.morning_digest_job() == 1
        assert runner.morning_digest_job() == 0  # once a day
        text = messages(db, "digest")[0].text
        number = {tid: ticket(db, tid).number for tid in (overdue, today, soon, later)}
        assert "已超期 1 件" in text and number[overdue] in text
        assert "今日到期 1 件" in text and number[today] in text
        assert "2个工作日内到期 1 件" in text and number[soon] in text
        assert number[later] not in text
        clock.set(at(2026, 11, 28, 8, 30))  # Saturday: no digest
        assert runner.morning_digest_job() == 0
    finally:
        runner.set_factory(None)


def test_the_weekly_report_job_posts_text_and_chart_to_the_center(db, clock, tmp_path):
    tid = new_ticket(db)
    with db.begin() as s:
        tk = s.get(Ticket, tid)
        sign(s, tk, CG)
        submit_reply(s, tk, CG, **REPLY)
        review_reply(s, tk, CENTER, approve=True)
    clock.set(at(2026, 11, 30, 9, 0))
    paths = runner.send_period_report("week", db, out_dir=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".csv", ".csv"] and all(p.exists() for p in paths)
    sent = messages(db, "report")
    assert {m.chat_id for m in sent} == {str(CENTER_CHAT)}
    assert "12345热线周报（2026-11-23 至 2026-11-29）" in sent[0].text and "城市管理局" in sent[0].text
    assert [m.markup for m in sent if m.markup] == [{"photo": str(paths[0])}]
    runner.send_period_report("week", db, out_dir=tmp_path)
    assert len(messages(db, "report")) == len(sent)  # posted once


def test_jobs_persist_in_the_database_and_survive_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'hotline.db'}"
    factory = sessionmaker(make_engine(url), expire_on_commit=False)
    first = runner.build_scheduler(factory)
    first.start(paused=True)
    jobs = {j.id: j for j in first.get_jobs()}
    assert set(jobs) == {"sweep", "morning_digest", "weekly_report", "monthly_report"}
    assert str(jobs["sweep"].trigger) == "interval[0:01:00]"
    assert "day_of_week='mon'" in str(jobs["weekly_report"].trigger) and "hour='9'" in str(
        jobs["weekly_report"].trigger
    )
    assert jobs["sweep"].coalesce and jobs["sweep"].max_instances == 1
    weekly_next = jobs["weekly_report"].next_run_time
    first.shutdown(wait=False)

    again = runner.build_scheduler(sessionmaker(make_engine(url), expire_on_commit=False))
    again.start(paused=True)
    jobs = {j.id: j for j in again.get_jobs()}
    assert len(jobs) == 4 and jobs["weekly_report"].next_run_time == weekly_next
    again.shutdown(wait=False)
    with factory() as s:
        assert s.scalar(text(f"SELECT count(*) FROM {runner.JOB_TABLE}")) == 4


def test_the_scheduler_starts_and_stops_with_the_bot(tmp_path):
    url = f"sqlite:///{tmp_path / 'hotline.db'}"
    factory = sessionmaker(make_engine(url), expire_on_commit=False)
    calls = []

    async def earlier_hook(app) -> None:
        calls.append("earlier")

    app = SimpleNamespace(post_init=earlier_hook, post_shutdown=None)
    runner.attach_to_application(app, factory)

    async def life() -> None:
        await app.post_init(app)
        threads = {t.name for t in threading.enumerate()}
        await app.post_shutdown(app)
        calls.append(any("APScheduler" in n for n in threads))

    asyncio.run(life())
    assert calls == ["earlier", True]
    assert not any("APScheduler" in t.name for t in threading.enumerate())
    with factory() as s:
        assert s.scalar(text(f"SELECT count(*) FROM {runner.JOB_TABLE}")) == 4
