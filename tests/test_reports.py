"""The weekly report's numbers, checked against a week of hand-built tickets, and its text, chart and files."""

from __future__ import annotations

import csv
import logging
from datetime import date, datetime

import pytest

from kb.store import Editor, create_entry
from models.clock import CHINA_TZ
from models.tables import ChatBinding, Ticket
from models.workflow import (
    Actor,
    decide_appeal,
    flag_repeat,
    rate,
    request_appeal,
    request_extension,
    request_return,
    review_reply,
    sign,
    submit_reply,
)
from scheduler import reports
from scheduler.reports import period_bounds, render_text, weekly_report, write_files
from scheduler.sweep import sweep
from tests.helpers import CENTER, add_units, citizen, dispatched_ticket, staff

CG, ZJ = staff("chengguan"), staff("zhujian")
REPLY = dict(
    result="已到现场核查处理，并将处理结果电话告知诉求人，诉求人表示认可。",
    basis="《城市市容和环境卫生管理条例》第十四条",
    handler="李四",
    phone="0818-1234567",
)
# the same stalls and the same street lights, in different words (a hotspot is one place or one problem)
BBQ = [
    "解放路夜市烧烤摊占道经营，油烟很大，晚上吵得睡不着",
    "解放路夜市的烧烤摊每天占道经营到凌晨，油烟噪音扰民",
    "投诉解放路夜市烧烤摊占道，油烟太大",
    "解放路夜市烧烤摊占道经营，影响行人通行",
]
LAMP = [
    "幸福小区门前路灯坏了，晚上一片漆黑",
    "幸福小区门前的路灯坏了一个月没人修",
    "幸福小区门前路灯还是坏的，之前反映过没有修好",
]


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=CHINA_TZ)


def reply(s, t: Ticket, who: Actor) -> None:
    submit_reply(s, t, who, **REPLY)
    review_reply(s, t, CENTER, approve=True)


@pytest.fixture
def week(db, clock):
    """A week (Mon 2026-11-23 – Sun 11-29) of tickets for 城市管理局 (CG) and 住建局 (ZJ)."""
    ed = Editor.center()
    clock.set(at(2026, 1, 5, 9, 0))
    with db.begin() as s:
        add_units(s)
        s.add_all(
            [
                ChatBinding(chat_id=-1001, unit_code="chengguan"),
                ChatBinding(chat_id=-1900, unit_code="center"),
            ]
        )
        old = dict(answer="按规定办理。", basis="《城市市容和环境卫生管理条例》", status="published")
        create_entry(
            s, ed, questions=["占道经营归谁管"], unit="chengguan", **old
        )  # not reviewed since January
        create_entry(s, ed, questions=["房屋维修基金怎么用"], unit="zhujian", valid_to="2026-11-01", **old)
    clock.set(at(2026, 11, 23, 9, 0))
    t = {}
    with db.begin() as s:
        who = citizen(s, "c-9")
        t[1] = dispatched_ticket(s, text=BBQ[0])
        t[2] = dispatched_ticket(s, text=BBQ[1], type="consultation")
        t[3] = dispatched_ticket(s, text="工地夜间施工打桩，凌晨两点还在作业")
        t[4] = dispatched_ticket(s, text=BBQ[2], type="consultation")
        t[8] = dispatched_ticket(s, text=BBQ[3], policy="pingli")
        t[5] = dispatched_ticket(
            s, text="想咨询住房公积金提取需要哪些材料", lead="zhujian", type="consultation"
        )
        t[6] = dispatched_ticket(s, text=LAMP[0], lead="zhujian")
        t[7] = dispatched_ticket(s, text=LAMP[1], lead="zhujian", who=who)
        create_entry(s, ed, questions=["夜市摊点审批去哪里办"], unit="chengguan", **old)
        ids = {k: v.id for k, v in t.items()}

    def step(when: datetime, fn) -> None:
        clock.set(when)
        with db.begin() as s:
            fn(s, {k: s.get(Ticket, v) for k, v in ids.items()})

    step(
        at(2026, 11, 23, 10),
        lambda s, t: (
            [sign(s, t[k], CG) for k in (1, 2, 3, 8)]
            + [sign(s, t[k], ZJ) for k in (6, 7)]
            + [request_return(s, t[5], ZJ, reason="公积金不属本局职责", suggestion="gongjijin")]
        ),
    )
    step(at(2026, 11, 23, 12), lambda s, t: [reply(s, t[6], ZJ), reply(s, t[7], ZJ)])
    step(at(2026, 11, 24, 10), lambda s, t: [reply(s, t[1], CG), reply(s, t[8], CG)])
    step(
        at(2026, 11, 24, 11),
        lambda s, t: [
            rate(s, t[7], CENTER, value="basic"),
            rate(s, t[8], CENTER, value="unsatisfied", comment="油烟还在"),
        ],
    )
    clock.set(at(2026, 11, 25, 9, 0))
    sweep(db)  # red cards for 2 (signed, late) and 4 (never signed)
    step(at(2026, 11, 25, 10), lambda s, t: rate(s, t[1], CENTER, value="satisfied"))
    step(at(2026, 11, 26, 10), lambda s, t: reply(s, t[2], CG))
    clock.set(at(2026, 11, 26, 10, 30))
    with db.begin() as s:
        t9 = dispatched_ticket(s, text=LAMP[2], lead="zhujian", who=who_of(s, ids[7]))
        flag_repeat(s, t9, s.get(Ticket, ids[7]))
        ids[9] = t9.id
    step(
        at(2026, 11, 26, 11),
        lambda s, t: [
            rate(s, t[2], CENTER, value="unsatisfied", comment="答复不对"),
            request_appeal(s, t[2], CG, reason="已按规定答复，附现场照片"),
        ],
    )
    step(at(2026, 11, 26, 11, 30), lambda s, t: decide_appeal(s, t[2], CENTER, approve=True, note="甄别成立"))
    clock.set(at(2026, 11, 26, 12, 0))
    sweep(db)  # 6: no rating within 3 days → archived as "no rating"
    clock.set(at(2026, 11, 27, 9, 0))
    sweep(db)  # yellow card for 3
    step(
        at(2026, 11, 27, 10),
        lambda s, t: request_extension(s, t[3], CG, reason="需协调", new_due=at(2026, 12, 2, 9)),
    )
    clock.set(at(2026, 11, 30, 8, 0))
    with db() as s:
        return ids, {k: s.get(Ticket, v).number for k, v in ids.items()}


def who_of(s, tid: int):
    from models.tables import Citizen

    return s.get(Citizen, s.get(Ticket, tid).citizen_id)


def test_weekly_numbers_match_the_hand_built_week(db, clock, week):
    _, numbers = week
    with db() as s:
        start, end = period_bounds("week", clock.now().date())
        r = weekly_report(s, start, end)
    assert (start, end) == (at(2026, 11, 23), at(2026, 11, 30))
    assert r.received == 9
    assert [u.unit for u in r.units] == ["chengguan", "zhujian"]
    cg, zj = r.unit("chengguan"), r.unit("zhujian")
    # 城管: 1 and 8 replied on time, 2 late, 4 overdue and never signed → 2 on time of 4 due
    assert (cg.dispatched, cg.finished, cg.on_time, cg.overdue_unfinished) == (5, 3, 2, 1)
    assert cg.on_time_rate == pytest.approx(0.5)
    # satisfied (1) and unsatisfied (8); 2's "unsatisfied" was overturned by an upheld appeal (甄别)
    assert (cg.satisfied, cg.unsatisfied, cg.no_rating) == (1, 1, 0)
    assert cg.satisfaction_rate == pytest.approx(0.5)
    assert (cg.returns, cg.extensions, cg.redos) == (0, 1, 1)
    assert (cg.yellow, cg.red) == (1, 2)
    assert (cg.kb_updated, cg.kb_stale) == (1, 1)
    # 住建: 6 and 7 on time; 7 basically satisfied, 6 never rated (not in the rate); 5 returned; 9 repeats 7
    assert (zj.dispatched, zj.finished, zj.on_time, zj.overdue_unfinished) == (4, 2, 2, 0)
    assert zj.on_time_rate == 1.0
    assert (zj.satisfied, zj.unsatisfied, zj.no_rating) == (1, 0, 1)
    assert zj.satisfaction_rate == 1.0
    assert (zj.returns, zj.extensions, zj.redos, zj.yellow, zj.red) == (1, 0, 0, 0, 0)
    assert (zj.kb_updated, zj.kb_stale, zj.repeats) == (0, 1, 1)
    assert [(x.number, x.of_number, x.unit) for x in r.repeats] == [(numbers[9], numbers[7], "zhujian")]
    # hotspots: the four barbecue stalls, then the three reports of the same broken street lights
    assert [(h.count, sorted(h.numbers)) for h in r.hotspots] == [
        (4, sorted(numbers[k] for k in (1, 2, 4, 8))),
        (3, sorted(numbers[k] for k in (6, 7, 9))),
    ]
    assert "烧烤" in r.hotspots[0].text and "路灯" in r.hotspots[1].text
    assert r.hotspots[0].units == ["chengguan"] and r.hotspots[1].units == ["zhujian"]
    total = r.totals()
    assert (total.finished, total.on_time, total.rated) == (5, 4, 3)


def test_report_text_and_files_say_the_same_numbers(db, clock, week, tmp_path):
    _, numbers = week
    with db() as s:
        r = weekly_report(s, *period_bounds("week", date(2026, 11, 30)))
    text = render_text(r)
    assert text.startswith("【12345热线周报（2026-11-23 至 2026-11-29）】")
    assert (
        "受理诉求 9 件，转办 9 件，办结 5 件；按期办结率 66.7%，满意率 66.7%（已评价 3 件，未评价 1 件不计入）"
        in text
    )
    assert "· 城市管理局：转办 5，办结 3（按期 2，超期未办结 1），按期办结率 50.0%；满意率 50.0%" in text
    assert "退回 1，延期 0，重办 0" in text and "红牌 2" in text
    assert "1. 4 件：" in text and "（城市管理局）" in text
    assert f"{numbers[9]}（与 {numbers[7]} 重复，住房和城乡建设局）" in text

    png, units_csv, hot_csv = write_files(r, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with units_csv.open(encoding="utf-8-sig") as fh:
        rows = {row["单位代码"]: row for row in csv.DictReader(fh)}
    assert rows["chengguan"]["按期办结率"] == "0.5000" and rows["chengguan"]["红牌"] == "2"
    assert rows["zhujian"]["未评价"] == "1" and rows["all"]["办结"] == "5"
    with hot_csv.open(encoding="utf-8-sig") as fh:
        hot = list(csv.DictReader(fh))
    assert [h["件数"] for h in hot] == ["4", "3"]


def test_without_a_chinese_font_the_chart_uses_unit_codes_and_says_so(
    db, clock, week, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(reports, "cjk_font", lambda: None)
    with db() as s:
        r = weekly_report(s, *period_bounds("week", date(2026, 11, 30)))
    with caplog.at_level(logging.WARNING, logger="scheduler.reports"):
        path = reports.render_png(r, tmp_path / "w.png")
    assert path.exists() and "no Chinese font" in caplog.text


def test_period_bounds_are_the_last_complete_week_or_month():
    assert period_bounds("week", date(2026, 12, 2)) == (at(2026, 11, 23), at(2026, 11, 30))
    assert period_bounds("week", date(2026, 11, 30)) == (at(2026, 11, 23), at(2026, 11, 30))
    assert period_bounds("month", date(2026, 12, 1)) == (at(2026, 11, 1), at(2026, 12, 1))
    assert period_bounds("month", date(2026, 1, 15)) == (at(2025, 12, 1), at(2026, 1, 1))
    with pytest.raises(ValueError):
        period_bounds("year", date(2026, 1, 1))


def test_hotspot_clustering_is_deterministic_and_keeps_unrelated_requests_apart():
    texts = [BBQ[0], LAMP[0], BBQ[1], "想咨询住房公积金提取需要哪些材料", LAMP[1], BBQ[2]]
    clusters = reports.cluster_texts(texts)
    assert clusters == reports.cluster_texts(texts)
    assert sorted(map(sorted, clusters)) == [[0, 2, 5], [1, 4], [3]]
