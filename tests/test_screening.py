"""Screening before classification: emergencies, exclusions (不予受理), urgent incidents."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime

import pytest

from models.clock import CHINA_TZ
from models.policy import Policy, load_policy, preset_names
from triage.screening import (
    EVAL_PATH,
    all_keys_policy,
    detect_emergency,
    detect_exclusion,
    detect_urgent,
    evaluate_screening,
    load_eval,
    policy_urgent_level,
    screen,
)


def _preset(name: str) -> Policy:
    if name not in preset_names():
        pytest.skip(f"preset {name} not available")
    return load_policy(name)


@pytest.fixture(scope="module")
def policy() -> Policy:
    """渠县 preset plus a generic exclusion for every key the rules know: measures the rules alone."""
    return all_keys_policy(_preset("quxian"))


def _without(policy: Policy, key: str) -> Policy:
    kept = [ex for ex in policy.exclusions if ex.key != key and ex.reason != key]
    return policy.model_copy(update={"exclusions": kept})


# ------------------------------------------------------------------------------------- emergencies

EMERGENCIES = [
    ("119", "我们楼下着火了，烟好大，快来人啊"),
    ("119", "厨房煤气味很重，是不是燃气泄漏了"),
    ("119", "隔壁仓库刚刚爆炸了"),
    ("119", "有人掉河里了，在大桥下面"),
    ("119", "房子塌了，下面还压着人"),
    ("120", "路边有个老人晕倒了，叫不醒"),
    ("120", "我妈抽搐口吐白沫"),
    ("120", "他没有呼吸了"),
    ("120", "孩子喝了农药"),
    ("120", "有人割腕了流了好多血"),
    ("110", "有人在小区门口打架，还拿着刀"),
    ("110", "我老公又在打我"),
    ("110", "我家孩子在超市走丢了，找不到了"),
    ("110", "楼顶上站着个人，说要跳楼"),
    ("110", "有人抢了我的包往巷子里跑了"),
    ("122", "出车祸了，有人受伤流血"),
    ("122", "我骑摩托被撞了，腿动不了"),
    ("96333", "电梯困人了，我们三个人关在里面"),
    ("96333", "我被困电梯里了，按警铃没人理"),
]


@pytest.mark.parametrize(("line", "text"), EMERGENCIES)
def test_emergency_is_sent_to_its_line(line, text, policy):
    found = detect_emergency(text)
    assert found is not None and found.line == line
    assert found.label_zh and found.matched
    result = screen(text, policy)
    assert result.verdict == "emergency" and result.emergency == found


# the negatives named by the issue, and a few more of the same kinds
NOT_EMERGENCIES = [
    "上周着过火，消防通道还堵着",
    "去年电梯关过人，希望更换电梯",
    "之前发生过车祸，建议装红绿灯",
    "消防栓坏了",
    "烟花爆竹噪音",
    "抽烟",
    "火锅店油烟扰民",
    "燃气费怎么交",
    "电梯经常坏",
    "120急救车收费太贵",
    "怎么办理110报警回执",
    "电梯年检标志过期了",
    "楼道里堆满杂物，万一着火了跑不掉",
    "燃气灶打不着火",
    "车祸理赔保险公司不赔",
    "昨天有人在小区打架，今天物业说监控坏了",
    "出车祸了，就是刮蹭了一下，人都没事",
    "刚才电梯困人，我们已经被救出来了",
    "我的手机中毒了",
    "商场跳楼价大甩卖",
]


@pytest.mark.parametrize("text", NOT_EMERGENCIES)
def test_past_hazard_fee_and_question_are_not_emergencies(text):
    assert detect_emergency(text) is None


def test_a_fire_now_is_found_after_an_old_one():
    assert detect_emergency("去年着过火，现在又着火了！").line == "119"


def test_emergency_is_a_frozen_value():
    found = detect_emergency("着火了")
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.line = "110"  # type: ignore[misc]


def test_an_emergency_wins_over_an_exclusion(policy):
    result = screen("法院已经判了，他现在拿着刀在我家门口", policy)
    assert result.verdict == "emergency" and result.emergency.line == "110"


# ------------------------------------------------------------------------------------- exclusions

REJECTIONS = [
    ("litigation", "法院已经判了，对方就是不还钱，你们管不管"),
    ("arbitration", "劳动仲裁已经裁决了，公司还是不给钱，你们帮我要"),
    ("reconsideration", "行政复议决定书下来了，我不认可，你们重新调查"),
    ("petition", "这个事我已经去信访局反映过了，信访答复我不满意"),
    ("info_disclosure", "我申请政府信息公开，要求公开村里征地补偿款的发放明细"),
    ("discipline", "举报我们村支书贪污扶贫款"),
    ("npc_cppcc", "我们这的人大代表选举不公平，有人拉票"),
    ("party_committee", "入党申请书交上去两年了一直没消息"),
    ("court_procuratorate", "我要投诉一个法官判案不公"),
    ("military", "附近部队每天早上打靶，太吵了"),
    ("out_of_jurisdiction", "我在北京朝阳区的一家餐馆吃饭被宰了"),
    ("privacy", "帮我查一下张某某的身份证号和家庭住址"),
    ("secrets", "我想知道县政府内部会议的机密文件内容"),
    ("illegal_request", "哪里可以办假证，急用"),
    ("public_order", "想找人代孕，你们知道哪里有吗"),
    ("no_content", "在吗"),
    ("no_content", "？？？"),
    ("no_content", "😂😂😂"),
    ("no_content", "asdfgh"),
    ("abuse", "傻逼客服"),
    ("handled", "这个诉求已经出了终结办理意见书，我再反映一次"),
    ("over_two_years", "这是个历史遗留问题，十几年前村里占了我家的地一直没补偿"),
    ("mediated_consumer", "买的冰箱有质量问题，消协已经调解过了，我还是不满意"),
]


@pytest.mark.parametrize(("key", "text"), REJECTIONS)
def test_rejection_names_the_key_and_the_policy_wording(key, text, policy):
    result = screen(text, policy)
    assert result.verdict == "reject" and result.exclusion_key == key
    assert result.exclusion == policy.exclusion(key)
    assert detect_exclusion(text, policy) == result.exclusion


@pytest.mark.parametrize(
    "text",
    [
        "欠薪想申请劳动仲裁怎么办",  # how to apply: a consultation the hotline answers
        "行政复议怎么申请，需要什么材料",
        "政府信息公开怎么申请",
        "我要举报有人在小区里打麻将赌博",  # a report about others, not an illegal request
        "退役军人的优待证怎么办",  # veterans are a government service, not the army
        "我在北京路上开的店，门口井盖丢了",  # a street name, not Beijing
        "我在上海交了五年社保，现在回老家能转过来吗",
        "小区垃圾三天没人收，你们都是废物",  # rude, but a real complaint
        "停水了",
    ],
)
def test_consultations_reports_and_rude_complaints_are_accepted(text, policy):
    assert screen(text, policy).verdict == "accept"


def test_a_key_the_policy_does_not_exclude_is_accepted(policy):
    text = "举报我们村支书贪污扶贫款"
    assert screen(text, policy).verdict == "reject"
    assert screen(text, _without(policy, "discipline")).verdict == "accept"


def test_presets_differ_in_what_they_exclude():
    suqian, quxian, dalian, pingli = (_preset(n) for n in ("suqian", "quxian", "dalian", "pingli"))
    # 宿迁 第七条 does not list discipline; 渠县 第八条 does not list places outside the county
    assert detect_exclusion("举报镇上干部收受贿赂", suqian) is None
    assert detect_exclusion("我在北京朝阳区的一家餐馆吃饭被宰了", quxian) is None
    assert detect_exclusion("我在北京朝阳区的一家餐馆吃饭被宰了", suqian).key == "out_of_jurisdiction"
    # only 大连 第十二条（十一） rejects matters older than two years
    old = "这是个历史遗留问题，十几年前占了我家的地一直没补偿"
    assert detect_exclusion(old, dalian).key == "over_two_years"
    assert detect_exclusion(old, pingli) is None
    # the wording comes from the active policy
    assert "宿迁" in detect_exclusion("法院已经判了，对方就是不还钱", suqian).wording


def test_abuse_falls_back_to_the_policys_insult_clause():
    # 宿迁 第七条（四）恶意侮辱、诽谤 is encoded as public_order in that preset
    ex = detect_exclusion("你们都是一群废物，吃干饭的", _preset("suqian"))
    assert ex is not None and ex.key == "public_order"


def test_an_old_year_is_measured_from_today(clock, policy):
    text = "2019年单位集资建房的钱到现在没退"
    clock.set(datetime(2020, 6, 1, 9, 0, tzinfo=CHINA_TZ))
    assert screen(text, policy).verdict == "accept"
    clock.set(datetime(2026, 6, 1, 9, 0, tzinfo=CHINA_TZ))
    assert screen(text, policy).exclusion_key == "over_two_years"


# ------------------------------------------------------------------------------------- urgent

URGENT = [
    ("special", "整个小区停电了，从早上到现在都没来电"),
    ("special", "我们村已经停水三天了"),
    ("special", "河里好多死鱼，上游化工厂在偷排"),
    ("special_urgent", "路面塌陷了一个大坑"),
    ("special_urgent", "建设路上井盖丢了，晚上很危险"),
    ("special_urgent", "大风把树吹倒了，压在路中间"),
    ("special_urgent", "后山有石头往下滚，担心山体滑坡"),
    ("special_urgent", "暴雨下得太大，小区门口积水到膝盖了"),
    ("special_urgent", "燃气管道被腐蚀破损了，快来看看"),
]


@pytest.mark.parametrize(("level", "text"), URGENT)
def test_urgent_incidents_are_accepted_and_flagged(level, text, policy):
    assert detect_urgent(text) == level
    result = screen(text, policy)
    assert result.verdict == "accept" and result.urgent_level == level


@pytest.mark.parametrize("text", ["我家停电了", "上个月停过一次电", "停电通知在哪里看", "马路上井盖一直响"])
def test_household_past_or_planned_outages_are_not_urgent(text):
    assert detect_urgent(text) is None


def test_urgent_level_maps_onto_the_policys_levels():
    assert policy_urgent_level(_preset("quxian"), "special_urgent") == "special_urgent"
    assert policy_urgent_level(_preset("pingli"), "special") == "urgent"  # 平利 has one 突发 level
    assert policy_urgent_level(_preset("pingli"), None) is None


# ------------------------------------------------------------------------------------- evaluation


def test_shipped_eval_set_meets_the_issue_targets(policy):
    report = evaluate_screening(EVAL_PATH, policy)
    assert report["n"] >= 400
    assert report["emergency_recall"] == 1.0
    assert report["false_alarm_rate"] < 0.02
    assert report["reject_recall"] >= 0.95 and report["reject_precision"] >= 0.95


def test_eval_set_covers_every_line_and_key():
    items = load_eval()
    assert {i["line"] for i in items if i["expect"] == "emergency"} == {"110", "119", "120", "122", "96333"}
    assert sum(i["expect"] == "emergency" for i in items) >= 150
    assert sum(i["expect"] == "reject" for i in items) >= 80
    assert sum(bool(i["urgent"]) for i in items) >= 40
    keys = {i["key"] for i in items if i["expect"] == "reject"}
    assert {"litigation", "arbitration", "discipline", "out_of_jurisdiction", "no_content", "abuse"} <= keys


def test_evaluation_follows_the_policy(policy):
    # rejections the policy does not make count as accepted, not as misses
    report = evaluate_screening(EVAL_PATH, _without(policy, "military"))
    assert report["keys_not_excluded_by_policy"]["military"] > 0
    assert "military" not in report["reject_per_key"]


def test_screening_is_fast(policy):
    texts = [i["text"] for i in load_eval()]
    screen(texts[0], policy)
    start = time.perf_counter()
    for text in texts:
        screen(text, policy)
    per_message = (time.perf_counter() - start) / len(texts)
    assert per_message < 0.003  # about 0.4 ms on one core; generous for a shared machine
