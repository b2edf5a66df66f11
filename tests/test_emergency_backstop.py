"""The embedding backstop behind emergency screening (triage/emergency_backstop.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.policy import load_policy
from triage.emergency_backstop import (
    LINES,
    PROTOTYPES_PATH,
    backstop,
    backstop_text,
    evaluate_emergencies,
    guard,
    load_prototypes,
)
from triage.screening import Emergency, detect_emergency, screen

QUXIAN = load_policy("quxian")


def _pipeline_screen(text: str) -> Emergency | None:
    """What the citizen gets: a rule emergency, else the backstop on a message screening accepted."""
    s = screen(text, QUXIAN)
    if s.verdict == "emergency":
        return s.emergency
    if s.verdict != "accept":
        return None
    return backstop_text(text)


# ------------------------------------------------------------------------------ without the model


def test_prototypes_cover_every_line_and_have_hard_negatives():
    data = load_prototypes(PROTOTYPES_PATH)
    for line in LINES:
        assert len(data["lines"][line]) >= 40, line
    assert len(data["negatives"]) >= 150
    th = data["thresholds"]
    assert 0.8 < th["min_similarity"] < 1.0 and th["min_margin"] >= 0 and th["k"] >= 1


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("上个月小区着过火，现在消防通道还堵着", "past"),
        ("火已经灭了，想问损失找谁赔", "resolved"),
        ("这个路口经常有人打架", "habitual"),
        ("万一电梯困人了该打什么电话", "hypothetical"),
        ("社区明天组织消防演练", "education"),
        ("救护车收费标准是多少", "admin"),
    ],
)
def test_guards_reuse_the_screening_time_rules(text, why):
    assert guard(text) == why


def test_guards_let_a_live_emergency_through():
    assert guard("电梯停半道了，我们娘俩关在里面，喊了半天没人") is None
    assert guard("我老爸刚才突然倒了，喊他也叫不醒了") is None  # "醒了" after a negation is not "recovered"
    assert guard("家里着了，我和我妈跑出来了，我爸还在里面") is None  # fleeing is not being rescued


def test_no_messages_no_work():
    assert backstop([], np.zeros((0, 384), dtype=np.float32)) == []


# ------------------------------------------------------------------------------ with the e5 model


@pytest.mark.slow
def test_an_unseen_lift_entrapment_paraphrase_is_redirected_to_96333():
    text = "电梯停半道了，我们娘俩关在里面，喊了半天没人"
    assert detect_emergency(text) is None  # the rules miss this wording
    hit = _pipeline_screen(text)
    assert isinstance(hit, Emergency)
    assert hit.line == "96333" and hit.label_zh and hit.matched.startswith("≈")


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "上个月小区着过火，现在消防通道还堵着",
        "电梯上周关过人，物业到现在没人管",
        "燃气费怎么这么贵",
        "电梯里的灯坏了好几天，晚上坐着害怕",
        "如果电梯困人了应该打什么电话",
        "上周叫的救护车四十分钟才到，我要投诉",
    ],
)
def test_past_events_questions_and_complaints_are_not_emergencies(text):
    assert _pipeline_screen(text) is None


@pytest.mark.slow
def test_backstop_uses_the_embedding_it_is_given():
    """The pipeline passes the matrix it already computed; a message far from every prototype is left alone."""
    from triage.embedding import get_encoder

    texts = ["电梯停半道了，我们娘俩关在里面，喊了半天没人", "我想咨询一下公积金贷款额度"]
    emb = get_encoder().encode(texts, prefix="query: ")
    hits = backstop(texts, emb)
    assert hits[0] is not None and hits[0].line == "96333"
    assert hits[1] is None
    assert backstop(texts[:1], emb[1:2]) == [None]  # the decision comes from the vector, not from the text


@pytest.mark.slow
def test_evaluate_emergencies_reports_rules_backstop_and_both(tmp_path):
    items = [
        {"text": "电梯停半道了，我们娘俩关在里面，喊了半天没人", "expect": "emergency", "line": "96333"},
        {"text": "楼下着火了，烟好大", "expect": "emergency", "line": "119"},
        {"text": "上个月小区着过火，现在消防通道还堵着", "expect": "accept", "line": None},
    ]
    path = tmp_path / "em.jsonl"
    path.write_text("\n".join(json.dumps(i, ensure_ascii=False) for i in items), encoding="utf-8")
    report = evaluate_emergencies(path, policy=QUXIAN)
    assert report["emergencies"] == 2 and report["non_emergencies"] == 1
    assert report["rules"]["emergency_recall"] == 0.5
    assert report["combined"]["emergency_recall"] == 1.0
    assert report["combined"]["false_alarm_rate"] == 0.0
    assert report["combined"]["per_line_recall"]["96333"] == {"recall": 1.0, "n": 1}
    assert report["errors"] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("一辆渣土车把骑三轮的大爷卷到车底下了", "122"),  # 卷到车底: a crash without 撞
        ("两辆货车把中间的面包车挤扁了，里面还有人", "122"),
        ("电动车和小轿车剐了一下，骑车的人躺地上起不来", "122"),
        ("桥面裂了一道缝，车还在上面过", "110"),  # a vehicle but no crash: the next line, not 122
    ],
)
def test_the_backstop_names_122_only_for_a_vehicle_in_a_crash(text, expected):
    from triage.emergency_backstop import _plausible_line

    scores = np.array([0.80, 0.70, 0.75, 0.90, 0.60])  # 122 scores best, 110 next
    assert LINES[_plausible_line(text, scores)] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("电梯停在两层中间了，门打不开，里面有个老人", "96333"),
        ("商场扶梯把小孩的手夹进去了", "96333"),
        ("电梯里有人贴小广告，撕都撕不掉", "119"),  # a lift, nobody held in it: the next line, not 96333
    ],
)
def test_the_backstop_names_96333_only_for_someone_held_in_a_lift(text, expected):
    from triage.emergency_backstop import _plausible_line

    scores = np.array([0.70, 0.80, 0.75, 0.60, 0.90])  # 96333 scores best, 119 next
    assert LINES[_plausible_line(text, scores)] == expected
