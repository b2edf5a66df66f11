"""Triage end to end with the shipped artifacts: the contract JSON, routing, save/load, the CLI stream."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from models.policy import load_policy
from triage.commands import evaluate_file, triage_stream
from triage.pipeline import ARTIFACTS, MODEL_FILE, Triager

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triager():
    return Triager.load(policy=load_policy("quxian"))


def test_contract_fields_for_each_verdict(triager):
    fire = triager.triage("楼下厨房着火了，烟很大，快来人").to_dict()
    assert fire["verdict"] == "emergency" and fire["redirect"] == "119" and fire["units"] == []
    sued = triager.triage("法院已经判决了，我不服，你们12345帮我改判").to_dict()
    assert sued["verdict"] == "reject" and sued["reason"] == "litigation" and "第八条" in sued["basis"]
    ok = triager.triage("幸福路的路灯坏了一个星期了，晚上黑漆漆的，希望尽快修一下").to_dict()
    assert ok["verdict"] == "accept" and ok["type"] in ("help", "complaint", "consultation", "report",
                                                         "suggestion")
    assert 0.0 <= ok["confidence"] <= 1.0 and isinstance(ok["urgent"], bool)
    assert len(ok["units"]) >= 3 and "redirect" not in ok and "reason" not in ok
    json.dumps(ok)  # plain JSON types only


@pytest.mark.parametrize(
    ("text", "unit", "top"),
    [
        ("幸福路的路灯坏了一个星期了，晚上黑漆漆的，希望尽快修一下", "chengguan", 3),
        ("我想提取住房公积金还房贷，需要带什么材料", "gongjijin", 1),
        ("医保异地就医怎么报销，要先备案吗", "yibao", 1),
        ("孩子明年上小学，学区是怎么划分的", "jiaoyu", 1),
    ],
)
def test_obvious_messages_route_to_the_right_unit(triager, text, unit, top):
    assert unit in triager.triage(text).units[:top]


def test_clear_consultation_and_urgent_outage(triager):
    r = triager.triage("我想提取住房公积金还房贷，需要带什么材料")
    assert r.type == "consultation" and not r.needs_review
    outage = triager.triage("我们村自来水停了两天了，全村一百多户都没水用")
    assert outage.verdict == "accept" and outage.urgent and outage.units[0] in ("gongshui", "shuili")


def test_save_load_round_trip_gives_identical_results(tmp_path, triager):
    shutil.copy(ARTIFACTS / MODEL_FILE, tmp_path / MODEL_FILE)
    again = Triager.load(tmp_path, policy=load_policy("quxian"))
    texts = ["小区旁边工地半夜施工噪音太吵了", "建议在人民公园门口增设公交站台", "举报某饭店使用过期食材"]
    assert [r.to_dict() for r in again.triage_many(texts)] == [r.to_dict() for r in triager.triage_many(texts)]


def test_stream_reads_plain_and_json_lines(triager):
    out = io.StringIO()
    n = triage_stream(triager, io.StringIO('路灯坏了好几天\n\n{"text": "楼下着火了"}\n'), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == 2 and rows[1]["redirect"] == "119" and rows[0]["verdict"] == "accept"


def test_eval_file_reports_per_class_scores(tmp_path, triager):
    path = tmp_path / "eval.jsonl"
    rows = [
        {"text": "我想提取住房公积金还房贷，需要带什么材料", "type": "consultation", "units": ["gongjijin"]},
        {"text": "楼下着火了，浓烟滚滚", "verdict": "emergency"},
        {"text": "建议在人民公园门口增设公交站台", "type": "suggestion", "units": ["jiaotong"]},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    report = evaluate_file(triager, path)
    assert report["emergency_recall"] == 1.0 and "consultation" in report["types"]
    assert 0.0 <= report["routing_top3"] <= 1.0
