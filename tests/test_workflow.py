"""The ticket lifecycle under real policies: every branch, every illegal step, audited."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text

from models.clock import CHINA_TZ
from models.errors import IllegalTransition, IncompleteReply, PermissionDenied, WorkflowError
from models.tables import Rating, TicketEvent
from models.workflow import (
    SYSTEM,
    Actor,
    add_co_units,
    add_info,
    answer_from_kb,
    create_ticket,
    decide_appeal,
    decide_extension,
    decide_return,
    designated_final,
    dispatch,
    expire_survey,
    find_repeat,
    history,
    rate,
    record_triage,
    redirect,
    reject,
    reopen_as_ticket,
    replay_status,
    request_appeal,
    request_extension,
    request_return,
    review_reply,
    sign,
    submit_contribution,
    submit_reply,
    supervise,
    urge,
)
from tests.conftest import PG_URL
from tests.helpers import CENTER, add_units, citizen, dispatched_ticket, staff

CG = staff("chengguan")
GOOD_REPLY = dict(
    result="已联系城管中队现场核查，烧烤摊已劝离并责令不得占道经营，后续纳入日常巡查。",
    basis="《城市市容和环境卫生管理条例》第十四条",
    handler="张三",
    phone="0818-7654321",
)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=CHINA_TZ)


def test_happy_path_quxian_deadlines_and_history(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        # 渠府办〔2023〕66号 第十一条（二）: sign within 1 wd, complaints finished within 5 wd
        assert t.number.startswith("20261123-")
        assert t.sign_due == at(2026, 11, 24, 9, 0)
        assert t.return_due == at(2026, 11, 24, 9, 0)
        assert t.finish_due == at(2026, 11, 30, 9, 0)
        clock.advance(hours=2)
        sign(s, t, CG)
        assert t.status == "signed" and t.signed_by == CG.label
        clock.advance(days=1)
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=True)
        assert t.status == "replied"
        assert t.survey_due is not None and t.survey_due > clock.now()
        assert rate(s, t, Actor("citizen", "1001"), value="satisfied") == "archived"
        assert t.status == "archived" and t.final_rating == "satisfied"
        events = history(s, t)
        assert [e.action for e in events] == [
            "receive",
            "triage",
            "dispatch",
            "sign",
            "submit_reply",
            "reply_approved",
            "rate",
        ]
        assert replay_status(events) == "archived"
        assert events[3].actor == CG.label and events[3].from_status == "dispatched"


def test_ticket_numbers_count_per_day(db, clock):
    with db.begin() as s:
        add_units(s)
        a = create_ticket(s, text="路灯坏了")
        b = create_ticket(s, text="路灯又坏了")
        clock.advance(days=1)
        c = create_ticket(s, text="还是路灯")
    assert (a.number, b.number, c.number) == ("20261123-000001", "20261123-000002", "20261124-000001")


@pytest.mark.skipif(not PG_URL.startswith("postgresql"), reason="needs HOTLINE_TEST_DATABASE_URL=PostgreSQL")
def test_a_new_ticket_does_not_wait_for_another_request_still_being_filed(db, clock):
    """Issue 8: two citizens filing at once on PostgreSQL. The second must not wait for the first step's
    transaction to end (it used to, on the day's counter row: every new ticket queued behind the last)."""
    with db.begin() as s:
        add_units(s)
    with db() as first:
        first.begin()
        a = create_ticket(first, text="路灯坏了")  # first's transaction stays open
        with db.begin() as second:
            second.execute(text("SET LOCAL lock_timeout = '2s'"))
            b = create_ticket(second, text="井盖丢了")
        first.rollback()  # the first citizen's step failed: its number is not given again
    with db.begin() as s:
        c = create_ticket(s, text="又一个")
    assert (a.number, b.number, c.number) == ("20261123-000001", "20261123-000002", "20261123-000003")


def test_return_and_redispatch(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        with pytest.raises(WorkflowError, match="理由"):
            request_return(s, t, CG, reason="  ")
        request_return(s, t, CG, reason="属于住建部门物业监管职责", suggestion="转住建局")
        assert t.status == "return_requested"
        with pytest.raises(PermissionDenied):
            decide_return(s, t, CG, approve=True, new_lead="zhujian")
        decide_return(s, t, CENTER, approve=True, new_lead="zhujian")
        assert t.status == "dispatched" and t.lead_unit == "zhujian" and t.return_count == 1
        # the old unit can no longer act on it
        with pytest.raises(PermissionDenied):
            sign(s, t, CG)
        sign(s, t, staff("zhujian"))
        assert t.status == "signed"


def test_return_refused_goes_back_to_previous_state(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        request_return(s, t, CG, reason="不是我们的事")
        with pytest.raises(WorkflowError, match="理由"):
            decide_return(s, t, CENTER, approve=False, note="")
        decide_return(s, t, CENTER, approve=False, note="占道经营属城管职责，请继续办理")
        assert t.status == "signed"


def test_late_return_counts_as_overdue_in_quxian(db, clock):
    # 渠府办〔2023〕66号 第十一条（二）: 超期退回视为超期办理件
    with db.begin() as s:
        t = dispatched_ticket(s)
        clock.advance(days=2)
        req = request_return(s, t, CG, reason="非本单位职责")
        assert req.late and t.overdue and t.overdue_count == 1


def test_late_return_refused_where_policy_says_so(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s, policy="pingli")
        clock.advance(days=5)
        from models.policy import load_policy

        if load_policy("pingli").returns.late == "refuse":
            with pytest.raises(WorkflowError, match="退回时限"):
                request_return(s, t, CG, reason="非本单位职责")
            assert t.status == "dispatched"
        else:
            request_return(s, t, CG, reason="非本单位职责")
            assert t.overdue


def test_extension_within_limits_quxian(db, clock):
    # 渠府办〔2023〕66号 第十一条（三）: ≤ 3 working days, before expiry, none for consultations
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        too_far = t.finish_due + timedelta(days=10)
        with pytest.raises(WorkflowError, match="最晚可延至"):
            request_extension(s, t, CG, reason="需协调多部门", new_due=too_far)
        new_due = at(2026, 12, 3, 9, 0)  # Mon 30 Nov + 3 wd = Thu 3 Dec
        request_extension(s, t, CG, reason="需协调多部门现场核查", new_due=new_due)
        assert t.status == "extension_requested"
        decide_extension(s, t, CENTER, approve=True, note="同意")
        assert t.status == "signed" and t.finish_due == new_due and t.extension_count == 1
        with pytest.raises(WorkflowError, match="上限"):
            request_extension(s, t, CG, reason="还要再延", new_due=new_due + timedelta(days=1))


def test_no_extension_for_consultation_and_not_after_expiry(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s, text="居住证怎么办理", type="consultation")
        sign(s, t, CG)
        with pytest.raises(WorkflowError, match="咨询类工单不予延期"):
            request_extension(s, t, CG, reason="复杂", new_due=t.finish_due + timedelta(days=1))
        t2 = dispatched_ticket(s)
        sign(s, t2, CG)
        clock.set(t2.finish_due + timedelta(minutes=1))
        with pytest.raises(WorkflowError, match="到期前"):
            request_extension(s, t2, CG, reason="复杂", new_due=t2.finish_due + timedelta(days=1))


def test_incomplete_reply_lists_what_is_missing(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        with pytest.raises(IncompleteReply) as err:
            submit_reply(s, t, CG, result="已处理", basis="", handler="张三", phone="")
        assert set(err.value.missing) >= {"法律法规或政策依据", "联系电话", "具体的办理结果（不少于10个字）"}
        assert "缺少" in str(err.value)
        assert t.status == "signed"
        with pytest.raises(IncompleteReply, match="有效的联系电话"):
            submit_reply(s, t, CG, **{**GOOD_REPLY, "phone": "打我电话"})


def test_center_sends_reply_back(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=False, note="未说明后续巡查安排")
        assert t.status == "signed"


def test_unsatisfied_redo_then_second_rating_pingli(db, clock):
    # 平政办发〔2018〕111号: first unsatisfied → one redo; second → manual revisit
    with db.begin() as s:
        t = dispatched_ticket(s, policy="pingli")
        sign(s, t, CG)
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=True)
        citizen_actor = Actor("citizen", "1001")
        with pytest.raises(WorkflowError, match="原因"):
            rate(s, t, citizen_actor, value="unsatisfied")
        assert rate(s, t, citizen_actor, value="unsatisfied", comment="烧烤摊第二天又来了") == "redo"
        assert t.status == "redo" and t.redo_count == 1
        assert t.finish_due > clock.now()
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=True)
        outcome = rate(s, t, citizen_actor, value="unsatisfied", comment="还是没解决")
        assert outcome == "manual_revisit"
        assert t.status == "archived" and t.supervised and t.final_rating == "unsatisfied"
        rounds = s.scalars(select(Rating.round).where(Rating.ticket_id == t.id).order_by(Rating.round)).all()
        assert rounds == [1, 2]


def test_appeal_within_window_quxian(db, clock):
    # 渠府办〔2023〕66号 第十二条（一）: appeal within 2 working days of the unsatisfied rating
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=True)
        rate(s, t, Actor("citizen", "1001"), value="unsatisfied", comment="态度不好")
        assert t.appeal_due is not None
        request_appeal(s, t, CG, reason="已按规定办理，现场照片为证")
        with pytest.raises(WorkflowError, match="已申请过"):
            request_appeal(s, t, CG, reason="再申请")
        decide_appeal(s, t, CENTER, approve=True, note="佐证充分")
        assert t.final_rating == "appeal_upheld"


def test_appeal_too_late(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=True)
        rate(s, t, Actor("citizen", "1001"), value="unsatisfied", comment="没解决")
        clock.advance(days=7)
        with pytest.raises(WorkflowError, match="甄别申请时限"):
            request_appeal(s, t, CG, reason="迟到的申请")


def test_survey_without_answer_is_archived_as_no_rating(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        submit_reply(s, t, CG, **GOOD_REPLY)
        review_reply(s, t, CENTER, approve=True)
        expire_survey(s, t)
        assert t.status == "archived" and t.final_rating == "none"


def test_supervise_and_urge_are_audited(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        urge(s, t, SYSTEM, note="即将超时")
        supervise(s, t, CENTER, note="群众反映强烈")
        assert t.urge_count == 1 and t.supervised
        actions = [e.action for e in history(s, t)]
        assert actions[-2:] == ["urge", "supervise"]


def test_co_handling_units(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s, lead="chengguan", co=("shengtai",))
        sg = staff("shengtai", "s9")
        sign(s, t, sg)  # co-unit signs; the ticket waits for the lead
        assert t.status == "dispatched"
        sign(s, t, CG)
        submit_contribution(s, t, sg, text="已对油烟排放进行检测，超标，已下达整改通知")
        with pytest.raises(PermissionDenied, match="主办单位"):
            submit_reply(s, t, sg, **GOOD_REPLY)
        submit_reply(s, t, CG, **GOOD_REPLY)
        assert t.status == "reply_submitted"
        assert t.co_units == ["shengtai"]


def test_illegal_transitions_say_why_in_chinese(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        with pytest.raises(IllegalTransition, match=r"已转办待签收.*不能提交办结"):
            submit_reply(s, t, CG, **GOOD_REPLY)
        with pytest.raises(IllegalTransition):
            rate(s, t, Actor("citizen", "1"), value="satisfied")
        with pytest.raises(IllegalTransition):
            review_reply(s, t, CENTER, approve=True)
        with pytest.raises(IllegalTransition):
            decide_extension(s, t, CENTER, approve=True)
        sign(s, t, CG)
        with pytest.raises(WorkflowError, match="无需重复签收"):
            sign(s, t, CG)
        with pytest.raises(PermissionDenied):
            sign(s, t, staff("gongan"))
        with pytest.raises(IllegalTransition):
            dispatch(s, t, CENTER, lead="zhujian")


def test_reject_redirect_and_kb_answer(db, clock):
    with db.begin() as s:
        add_units(s)
        t = create_ticket(s, text="法院判决我不服，你们帮我改判")
        told = reject(s, t, SYSTEM, key="litigation")
        assert t.status == "rejected" and "诉讼" in told["wording"] and told["basis"]
        e = create_ticket(s, text="楼下着火了")
        redirect(s, e, SYSTEM, line="119")
        assert e.status == "redirected" and e.redirect == "119"
        q = create_ticket(s, text="居住证怎么办")
        answer_from_kb(s, q, SYSTEM, entry_id="kb-0001", score=0.9)
        assert q.status == "answered"
        reopen_as_ticket(s, q, Actor("citizen", "1"), note="没解决")
        assert q.status == "triaged"
        record = s.scalars(select(TicketEvent).where(TicketEvent.ticket_id == t.id)).all()
        assert record[-1].payload["key"] == "litigation"
        with pytest.raises(IllegalTransition):
            add_info(s, t, Actor("citizen", "1"), text="补充")


def _closed_ticket(s, who):
    t = dispatched_ticket(s, who=who)
    sign(s, t, CG)
    submit_reply(s, t, CG, **GOOD_REPLY)
    review_reply(s, t, CENTER, approve=True)
    rate(s, t, Actor("citizen", who.external_id), value="satisfied")
    return t


def test_repeat_complaint_suqian_definition(db, clock):
    # 宿政办发〔2020〕55号: the same issue again within a month of closure is a repeat complaint
    with db.begin() as s:
        who = citizen(s, "1001")
        first = _closed_ticket(s, who)
        clock.advance(days=10)
        again = create_ticket(s, text="小区门口烧烤摊每天晚上又占道经营到凌晨，油烟噪音很大", citizen=who)
        assert find_repeat(s, again) is first
        other = create_ticket(s, text="我想咨询公积金贷款额度怎么算", citizen=who)
        assert find_repeat(s, other) is None
        stranger = create_ticket(s, text=first.original_text, citizen=citizen(s, "2002"))
        assert find_repeat(s, stranger) is None


def test_repeat_window_closes_after_a_month(db, clock):
    with db.begin() as s:
        who = citizen(s, "1001")
        first = _closed_ticket(s, who)
        clock.advance(days=40)
        late = create_ticket(s, text=first.original_text, citizen=who)
        assert find_repeat(s, late) is None


def test_unresolved_after_six_days_raised_again_is_a_repeat(db, clock):
    with db.begin() as s:
        who = citizen(s, "1001")
        first = dispatched_ticket(s, who=who)
        clock.advance(days=3)
        early = create_ticket(s, text=first.original_text, citizen=who)
        assert find_repeat(s, early) is None
        clock.advance(days=4)
        later = create_ticket(s, text=first.original_text, citizen=who)
        assert find_repeat(s, later) is first


def test_urgent_ticket_runs_on_hours(db, clock):
    # 渠府办〔2023〕66号 第十一条（四）: special matters — first response within 3 h
    with db.begin() as s:
        t = dispatched_ticket(
            s, text="整个小区停水一天了", type="help", lead="zhujian", urgent_level="special"
        )
        assert t.respond_due == clock.now() + timedelta(hours=3)
        assert t.sign_due <= t.respond_due


def test_record_triage_rejects_unknown_type(db, clock):
    with db.begin() as s:
        add_units(s)
        t = create_ticket(s, text="随便说说")
        with pytest.raises(WorkflowError):
            record_triage(s, t, type="praise", units=[])


# --------------------------------------------------------------------------- designated units, urgent extensions


@pytest.mark.parametrize("policy", ["quxian", "pingli", "dalian"])
def test_unit_designated_after_a_return_may_not_return_it_again(db, clock, policy):
    # 渠府办〔2023〕66号 第十条 "通过上述方式确定的主办单位和协办单位……不得退回"; 平政办发〔2018〕111号 第九条;
    # 大政发〔2015〕30号 第十五条 "指定的承办单位不得推诿"
    with db.begin() as s:
        t = dispatched_ticket(s, policy=policy)
        assert not designated_final(t)
        request_return(s, t, CG, reason="属于住建部门物业监管职责", suggestion="转住建局")
        decide_return(s, t, CENTER, approve=True, new_lead="zhujian", note="协调指定住建局办理")
        assert designated_final(t)
        zj = staff("zhujian", "s7")
        events = len(history(s, t))
        with pytest.raises(WorkflowError, match="不得再退回"):
            request_return(s, t, zj, reason="也不是我们的职责")
        assert t.status == "dispatched" and len(history(s, t)) == events
        sign(s, t, zj)  # the designated unit handles it
        with pytest.raises(WorkflowError, match="不得再退回"):
            request_return(s, t, zj, reason="还是不归我们管")


def test_without_designated_final_a_redispatched_unit_may_still_return(db, clock):
    # 宿政办发〔2020〕55号 sets no such rule: the second unit may ask to return too
    with db.begin() as s:
        t = dispatched_ticket(s, policy="suqian")
        request_return(s, t, CG, reason="属于住建部门职责")
        decide_return(s, t, CENTER, approve=True, new_lead="zhujian")
        assert not designated_final(t)
        request_return(s, t, staff("zhujian", "s7"), reason="属于城管部门职责")
        assert t.status == "return_requested" and t.return_count == 1


def test_no_extension_for_urgent_tickets_pingli(db, clock):
    # 平政办发〔2018〕111号 第十三条: "除突发类事项外" a unit may ask for an extension
    with db.begin() as s:
        t = dispatched_ticket(s, text="整个小区停水一天了", type="help", policy="pingli",
                              urgent_level="urgent")
        assert t.urgent
        sign(s, t, CG)
        with pytest.raises(WorkflowError, match="突发"):
            request_extension(s, t, CG, reason="需要更换主管道", new_due=t.finish_due + timedelta(days=1))
        assert t.status == "signed" and t.extension_count == 0
        ordinary = dispatched_ticket(s, text="小区路灯坏了", type="help", policy="pingli")
        sign(s, ordinary, CG)
        request_extension(s, ordinary, CG, reason="需要更换线路", new_due=ordinary.finish_due + timedelta(days=1))
        assert ordinary.status == "extension_requested"


def test_urgent_tickets_may_be_extended_where_the_policy_allows_it(db, clock):
    # 渠府办〔2023〕66号 第十一条（三） does not exclude special matters from extension
    with db.begin() as s:
        t = dispatched_ticket(s, text="整个小区停水一天了", type="help", lead="chengguan",
                              urgent_level="special")
        sign(s, t, CG)
        request_extension(s, t, CG, reason="需要更换主管道", new_due=t.finish_due + timedelta(days=1))
        assert t.status == "extension_requested"


def test_center_adds_co_handling_units_to_a_dispatched_ticket(db, clock):
    with db.begin() as s:
        t = dispatched_ticket(s)
        sign(s, t, CG)
        due = t.finish_due
        with pytest.raises(PermissionDenied):
            add_co_units(s, t, CG, units=["shengtai"])
        assert add_co_units(s, t, CENTER, units=["shengtai", "chengguan", "shengtai"]) == ["shengtai"]
        assert t.co_units == ["shengtai"] and t.lead_unit == "chengguan" and t.finish_due == due
        with pytest.raises(WorkflowError, match="无需重复添加"):
            add_co_units(s, t, CENTER, units=["shengtai"])
        with pytest.raises(WorkflowError, match="没有代码为"):
            add_co_units(s, t, CENTER, units=["nosuchunit"])
        sg = staff("shengtai", "s9")
        sign(s, t, sg)
        submit_contribution(s, t, sg, text="已检测油烟，超标，已下达整改通知")
        ev = history(s, t)[-3]
        assert (ev.action, ev.payload["units"], ev.to_status) == ("add_co", ["shengtai"], "signed")
        submit_reply(s, t, CG, **GOOD_REPLY)
        with pytest.raises(IllegalTransition):
            add_co_units(s, t, CENTER, units=["gongan"])
