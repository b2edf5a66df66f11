"""`hotline demo`: one ticket through its whole life on a private SQLite database, step by step.

The clock is simulated (it starts on the next Monday at 09:00 and moves as the story needs), so the
deadlines printed are those the active policy really gives.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import datetime, time, timedelta
from pathlib import Path

from models.bootstrap import init_database
from models.clock import CHINA_TZ, FakeClock, set_clock
from models.db import make_engine, make_session_factory
from models.policy import load_policy
from models.privacy import contact_masked, set_contact
from models.settings import get_settings
from models.states import STATUS_ZH
from models.tables import Citizen
from models.workflow import (
    SYSTEM,
    TYPE_ZH,
    Actor,
    create_ticket,
    decide_extension,
    dispatch,
    history,
    rate,
    record_triage,
    request_extension,
    review_reply,
    sign,
    submit_reply,
)

STORY = (
    "幸福里小区3栋楼下的烧烤摊每天晚上占道经营到凌晨两点，油烟和噪音太大了，老人孩子都睡不好，希望管一管。"
)


def _fmt(dt: datetime | None) -> str:
    return dt.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M") if dt else "—"


def run_demo(out: Callable[[str], None] = print, *, policy: str | None = None) -> list[str]:
    """Play the story and return the transcript lines (also sent to ``out``)."""
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        out(text)

    policy_name = policy or get_settings().policy
    pol = load_policy(policy_name)
    today = datetime.now(CHINA_TZ).date()
    monday = today + timedelta(days=(7 - today.weekday()) % 7 or 7)
    clock = FakeClock(datetime.combine(monday, time(9, 0), tzinfo=CHINA_TZ))
    previous = set_clock(clock)
    tmp = tempfile.TemporaryDirectory(prefix="hotline-demo-")
    try:
        engine = make_engine(f"sqlite:///{Path(tmp.name) / 'demo.db'}")
        init_database(engine, seed_kb=False)
        factory = make_session_factory(engine)
        center = Actor("center", "demo-operator", unit_code="center", role="operator", name="中心值班员")
        unit = Actor("staff", "demo-handler", unit_code="chengguan", role="handler", name="城管局李科员")
        citizen_actor = Actor("citizen", "demo-citizen")
        say(f"=== 12345 工单全流程演示 · 政策：{pol.jurisdiction}（{pol.document}）===")
        with factory.begin() as s:
            who = Citizen(channel="console", external_id="demo-citizen")
            s.add(who)
            s.flush()
            set_contact(s, who, "王小明", "13812345678")
            t = create_ticket(
                s,
                text=STORY,
                channel="console",
                citizen=who,
                policy=policy_name,
                ev_place="幸福里小区3栋楼下",
                ev_time="每天晚上至凌晨两点",
            )
            say(f"[{_fmt(clock.now())}] 收到诉求，工单号 {t.number}；诉求人 {contact_masked(who)}")
            say(f"    “{t.original_text}”")
            record_triage(s, t, SYSTEM, type="complaint", units=["chengguan", "shengtai"], confidence=0.91)
            say(f"[{_fmt(clock.now())}] 分类：{TYPE_ZH[t.type]}；建议承办单位：城市管理局（主办）")
            dispatch(s, t, center, lead="chengguan")
            say(f"[{_fmt(clock.now())}] 转办城市管理局。签收时限 {_fmt(t.sign_due)}（{pol.sign.cite}）")
            say(f"    办结时限 {_fmt(t.finish_due)}（{pol.limits['complaint'].cite}）")
            clock.advance(hours=1, minutes=20)
            sign(s, t, unit)
            say(f"[{_fmt(clock.now())}] {unit.name} 签收，状态：{STATUS_ZH[t.status]}")
            if "complaint" not in pol.extension.not_for and pol.extension.max_count > 0:
                clock.advance(days=1)
                want = t.finish_due + timedelta(days=1)
                try:
                    request_extension(s, t, unit, reason="需会同生态环境部门夜间检测油烟", new_due=want)
                    say(f"[{_fmt(clock.now())}] 申请延期至 {_fmt(want)}：需会同生态环境部门夜间检测油烟")
                    decide_extension(s, t, center, approve=True, note="同意延期")
                    say(
                        f"[{_fmt(clock.now())}] 中心同意延期，新的办结时限 {_fmt(t.finish_due)}（{pol.extension.cite}）"
                    )
                except Exception as err:  # the preset may forbid this particular extension
                    say(f"[{_fmt(clock.now())}] 延期申请未通过：{err}")
            clock.advance(hours=5)
            submit_reply(
                s,
                t,
                unit,
                result="经现场核查，该烧烤摊占道经营属实，已责令其退回店内经营并于22时前停止营业，纳入夜间巡查。",
                basis="《城市市容和环境卫生管理条例》第十四条",
                handler="李科员",
                phone="0818-1234567",
            )
            say(f"[{_fmt(clock.now())}] 城市管理局提交办结答复，待中心审核")
            clock.advance(hours=2)
            review_reply(s, t, center, approve=True, note="答复完整")
            say(f"[{_fmt(clock.now())}] 中心审核通过，答复已发送诉求人；回访截止 {_fmt(t.survey_due)}")
            clock.advance(hours=5)
            outcome = rate(s, t, citizen_actor, value="satisfied")
            say(f"[{_fmt(clock.now())}] 诉求人评价：满意 → {STATUS_ZH.get(outcome, outcome)}")
            say("")
            say("审计日志（可完整重放）：")
            for ev in history(s, t):
                arrow = (
                    f"{STATUS_ZH.get(ev.from_status or '', '—')} → {STATUS_ZH.get(ev.to_status or '', '—')}"
                )
                say(f"  {_fmt(ev.at)}  {ev.action:18s} {arrow:22s} {ev.actor}")
        engine.dispose()
    finally:
        set_clock(previous)
        tmp.cleanup()
    return lines
