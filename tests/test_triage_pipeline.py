"""Triage end to end with the shipped artifact: the contract JSON, routing, save/load, a catalog unit the model
never saw, the ambiguity rule, the CLI stream and `hotline eval FILE`."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from models.catalog import read_catalog
from models.policy import load_policy
from triage.commands import triage_stream
from triage.evaluation import evaluate_file
from triage.pipeline import ARTIFACTS, MODEL_FILE, Triager

pytestmark = pytest.mark.slow

TYPES = {"consultation", "help", "complaint", "report", "suggestion"}


@pytest.fixture(scope="module")
def triager():
    return Triager.load(policy=load_policy("quxian"))


def test_contract_fields_for_each_verdict(triager):
    fire = triager.triage("楼下厨房着火了，烟很大，快来人").to_dict()
    assert fire["verdict"] == "emergency" and fire["redirect"] == "119" and fire["units"] == []
    assert "reason" not in fire
    sued = triager.triage("法院已经判决了，我不服，你们12345帮我改判").to_dict()
    assert sued["verdict"] == "reject" and sued["reason"] == "litigation" and "redirect" not in sued
    assert sued["wording"] and sued["go_to"] and sued["key"]
    ok = triager.triage("幸福路的路灯坏了一个星期了，晚上黑漆漆的，希望尽快修一下").to_dict()
    assert ok["verdict"] == "accept" and ok["type"] in TYPES
    assert isinstance(ok["confidence"], float) and 0.0 <= ok["confidence"] <= 1.0
    assert isinstance(ok["urgent"], bool) and isinstance(ok["needs_review"], bool)
    codes = {u["code"] for u in read_catalog()}
    assert len(ok["units"]) == 5 and set(ok["units"]) <= codes and len(set(ok["units"])) == 5
    assert "center" not in ok["units"]
    assert set(ok.get("co_units", [])) <= set(ok["units"][1:3])
    assert "redirect" not in ok and "reason" not in ok
    json.dumps(fire), json.dumps(sued), json.dumps(ok)  # plain JSON types only


@pytest.mark.parametrize(
    ("text", "unit", "top"),
    [
        ("幸福路的路灯不亮了，晚上黑漆漆的，希望尽快修一下", "chengguan", 3),
        ("我想办理公积金提取还房贷，需要带什么材料", "gongjijin", 1),
        ("在外地住院花了三万多，医保报销要准备哪些单据", "yibao", 1),
        ("孩子明年上小学，学区是怎么划分的", "jiaoyu", 1),
        ("公司拖欠我们三个月工资，老板电话也不接了", "renshe", 1),
    ],
)
def test_obvious_messages_route_to_the_right_unit(triager, text, unit, top):
    assert unit in triager.triage(text).units[:top]


def test_a_unit_without_training_rows_can_rank_first(tmp_path):
    """A deployment adds a unit the model has never seen; a message paraphrasing its duties goes to it."""
    extra = {
        "code": "renfang",
        "name": "人民防空办公室",
        "level": 2,
        "parent": "center",
        "duties": "负责人民防空工程的建设、维护和使用管理，查处擅自占用、改造、出租人防工程和防空地下室；"
        "负责防空警报器的设置、维护和每年防空警报试鸣；组织人民防空宣传教育和疏散演练。",
    }
    catalog = [*read_catalog(), extra]
    t = Triager.load(policy=load_policy("quxian"), catalog=catalog)
    assert "renfang" not in t.model.router.classes_  # no training rows at all
    r = t.triage("我们小区地下的防空地下室被物业擅自改造出租当仓库了，人防工程这样乱用有人管吗")
    assert r.units[0] == "renfang"
    # and the new unit does not capture messages that are about something else
    assert "renfang" not in t.triage("我想办理公积金提取还房贷，需要带什么材料").units[:1]


def test_clear_message_is_not_flagged_and_ambiguous_one_is(triager):
    clear = triager.triage("请问公积金提取需要带哪些材料？在哪个窗口办理？")
    assert clear.type == "consultation" and not clear.needs_review
    vague = triager.triage("那个事情")
    assert vague.needs_review


def test_save_load_round_trip_gives_identical_results(tmp_path, triager):
    shutil.copy(ARTIFACTS / MODEL_FILE, tmp_path / MODEL_FILE)
    again = Triager.load(tmp_path, policy=load_policy("quxian"))
    texts = ["小区旁边工地半夜施工噪音太吵了", "建议在人民公园门口增设公交站台", "举报某饭店使用过期食材"]
    assert [r.to_dict() for r in again.triage_many(texts)] == [r.to_dict() for r in triager.triage_many(texts)]
    assert [r.to_dict() for r in triager.triage_many(texts)] == [triager.triage(t).to_dict() for t in texts]


def test_a_model_trained_on_other_embeddings_is_flagged_when_loaded(tmp_path, triager, caplog):
    from triage.embedding import EncoderOptions
    from triage.training import load_model, save_model

    assert triager.model.info["embedding_max_seq_length"] == EncoderOptions().max_seq_length  # shipped: in step
    model = load_model()
    model.info["embedding_max_seq_length"] = 128
    save_model(model, tmp_path)
    with caplog.at_level("WARNING", logger="triage.training"):
        load_model(tmp_path)
    assert "run hotline train" in caplog.text


def test_type_pipeline_works_on_raw_text(triager):
    pipe = triager.model.type_pipeline()
    proba = pipe.predict_proba(["请问居住证怎么办理", "举报有人在河里电鱼"])
    assert proba.shape == (2, 5) and abs(proba.sum(axis=1) - 1).max() < 1e-6
    assert list(pipe.predict(["请问居住证怎么办理"])) == ["consultation"]


def test_stream_reads_plain_and_json_lines(triager):
    out = io.StringIO()
    n = triage_stream(triager, io.StringIO('路灯坏了好几天\n\n{"text": "楼下着火了"}\n'), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == 2 and rows[1]["redirect"] == "119" and rows[0]["verdict"] == "accept"


def test_eval_file_reports_per_class_scores(tmp_path, triager):
    path = tmp_path / "eval.jsonl"
    rows = [
        {"text": "我想提取住房公积金还房贷，需要带什么材料", "type": "consultation", "units": ["gongjijin"]},
        {"text": "楼下着火了，浓烟滚滚", "verdict": "emergency", "redirect": "119"},
        {"text": "建议在人民公园门口增设公交站台", "type": "suggestion", "units": ["jiaotong"]},
        {"text": "幸福路的路灯坏了一个星期了", "verdict": "accept"},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    report = evaluate_file(path, triager)
    assert report["emergency_recall"] == 1.0 and report["emergency_false_alarm"] == 0.0
    assert set(report["types"]) == TYPES and report["types"]["consultation"]["recall"] == 1.0
    assert len(report["confusion"]["matrix"]) == 5
    assert report["routing_top1"] == 1.0 and report["routing_n"] == 2
