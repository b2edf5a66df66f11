"""The five policy presets encode their regulations: every number, with the article it comes from.

The expected values below are read from the seed documents in shared/seeds/, not from the YAML files;
each row names the article whose text it encodes. A row's article must also appear in the preset's
``cite`` for that number, so a citizen or an auditor can check the rule against the regulation.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from models.policy import REJECT_REASONS, REQUEST_TYPES, Duration, Policy, load_policy, preset_names
from models.settings import Settings

PRESETS = ("dalian", "pingli", "quxian", "suqian", "suzhou")

DOCUMENTS = {
    "pingli": "平政办发〔2018〕111号",
    "suqian": "宿政办发〔2020〕55号",
    "quxian": "渠府办〔2023〕66号",
    "dalian": "大政发〔2015〕30号",
    "suzhou": "宿州市12345政府热线服务平台工作规范",  # the document has no number; its title stands in
}

# The repeat-complaint definition all presets share: 宿政办发〔2020〕55号 第十九条.
SUQIAN_REPEAT = "宿政办发〔2020〕55号 第十九条"
# Silent documents borrow 渠县's time for the same step.
QUXIAN_DISPATCH = "渠府办〔2023〕66号 第十一条（一）"
QUXIAN_SIGN = "渠府办〔2023〕66号 第十一条（二）"

# path -> (expected value, text the cite of that number must contain)
EXPECTED: dict[str, dict[str, tuple[Any, str]]] = {
    "pingli": {
        "clock_start": ("immediate", "第十二条"),  # 自收到工单之日起
        "dispatch.limit": ("1wd", QUXIAN_DISPATCH),  # silent: borrowed
        "sign.limit": ("24h", "第十条（一）"),  # 24小时内接收
        "returns.window.limit": ("2wd", "第十条（二）"),  # 2日（指工作日）内申请退回
        "returns.late": ("refuse", "第十条（二）"),
        "returns.designated_final": (True, "第九条"),  # 确定的承办单位不得退回
        "limits.consultation.limit": ("2wd", "第十二条（一）"),
        "limits.help.limit": ("5wd", "第十二条（二）"),
        "limits.suggestion.limit": ("5wd", "第十二条（二）"),
        "limits.complaint.limit": ("5wd", "第十二条（二）"),
        "limits.report.limit": ("5wd", "第十二条（二）"),
        "urgent.urgent.respond": ("2h", "第二十二条"),  # 2小时内处理
        "urgent.urgent.finish": ("2wd", "第二十二条"),  # 2日内办结 (日 = 工作日, 第十条（二）下同)
        "extension.max_count": (2, "第十三条"),  # 延期以2次为限
        "extension.same_as_limit": (True, "第十三条"),  # 每次延期的时限和办理期限相同
        "extension.not_for_urgent": (True, "第十三条"),  # 除突发类事项外
        "redo.max_count": (1, "第十八条"),  # 重办次数为1次
        "redo.limit": ("5wd", "第十八条"),  # 重办期限为5日
        "redo.second_unsatisfied": ("manual_revisit", "第二十条"),
        "appeal.allowed": (True, "第三十一条"),
        "appeal.window": ("2wd", "渠府办〔2023〕66号 第十二条（一）"),  # silent: borrowed
        "survey.window": ("3d", "未规定"),
        "repeat.after_close": ("30d", SUQIAN_REPEAT),
        "repeat.unresolved_after": ("6d", SUQIAN_REPEAT),
        "warning.yellow_fraction": (0.75, "第二十六条"),
        "warning.yellow_before": ("1wd", "第二十六条"),
        "real_name_required": (["complaint", "help"], "第七条（十）"),
    },
    "suqian": {
        "clock_start": ("immediate", "第十一条"),  # 24小时工作制（含节假日）
        "dispatch.limit": ("1h", "未规定"),
        "sign.limit": ("1h", "第十条（三）"),  # 1小时内关注签收
        "returns.window.limit": ("12h", "第十条（四）"),  # 12小时之内申请退回
        "returns.late": ("refuse", "第十条（四）"),
        "limits.consultation.limit": ("4h", "第十条（三）"),  # 能够直接答复的4小时内
        "limits.help.limit": ("12h", "第十条（三）"),  # 原则上12小时内办结
        "limits.suggestion.limit": ("12h", "第十条（三）"),
        "limits.complaint.limit": ("12h", "第十条（三）"),
        "limits.report.limit": ("12h", "第十条（三）"),
        "direct_answer.limit": ("4h", "第十条（三）"),
        "urgent.urgent.respond": ("1h", "第十一条"),
        "urgent.urgent.finish": ("12h", "第十一条"),
        "extension.max_each": ("6d", "第十条（三）"),  # 延长日期最长不超过6天
        "extension.max_total": ("6d", "第十条（三）"),
        "redo.max_count": (1, "第十条（五）"),  # 首次人工回访不满意的核实整改
        "redo.manual_revisit_first": (True, "第十条（五）"),  # 短信回访不满意的进行人工回访
        "appeal.allowed": (False, "未规定"),
        "repeat.after_close": ("30d", "第十九条"),  # 办结回复后一月内
        "repeat.unresolved_after": ("6d", "第十九条"),  # 超过6天仍未解决且再次反映
        "warning.yellow_fraction": (0.75, "第十八条"),
        "warning.yellow_before": (None, "第十八条"),
        "real_name_required": (list(REQUEST_TYPES), "第十条（一）"),  # 登记实名信息
    },
    "quxian": {
        "clock_start": ("immediate", "第十一条（二）"),
        "dispatch.limit": ("1wd", "第十一条（一）"),  # 1个工作日内进行转办
        "sign.limit": ("1wd", "第十一条（二）"),  # 1个工作日内签收
        "returns.window.limit": ("1wd", "第十一条（二）"),  # 1个工作日内退回
        "returns.late": ("overdue", "第十一条（二）"),  # 超期退回视为超期办理件
        "returns.designated_final": (True, "第十条"),
        "limits.consultation.limit": ("2wd", "第十一条（二）"),
        "limits.help.limit": ("3wd", "第十一条（二）"),
        "limits.suggestion.limit": ("3wd", "第十一条（二）"),
        "limits.complaint.limit": ("5wd", "第十一条（二）"),
        "limits.report.limit": ("5wd", "第十一条（二）"),
        "urgent.special.respond": ("3h", "第十一条（四）"),
        "urgent.special.finish": ("2wd", "第十一条（四）"),
        "urgent.special_urgent.respond": ("2h", "第十一条（四）"),
        "urgent.special_urgent.finish": ("1wd", "第十一条（四）"),
        "extension.max_each": ("3wd", "第十一条（三）"),  # 一般不超过3个工作日
        "extension.max_each_complex": ("7wd", "第十一条（三）"),  # 特别重大、复杂的不超过7个工作日
        "extension.not_for": (["consultation"], "第十一条（三）"),  # 咨询类原则上不予延期
        "redo.max_count": (0, "第十二条（一）"),
        "redo.second_unsatisfied": ("archive", "第十二条（一）"),
        "appeal.allowed": (True, "第十二条（一）"),
        "appeal.window": ("2wd", "第十二条（一）"),  # 收到不满意评价后2个工作日
        "appeal.review": ("1wd", "第十二条（一）"),  # 1个工作日内完成初审
        "appeal.evidence": ("24h", "第十二条（一）"),  # 24小时内提交佐证资料
        "repeat.after_close": ("30d", SUQIAN_REPEAT),
        "repeat.unresolved_after": ("6d", SUQIAN_REPEAT),
        "warning.yellow_fraction": (0.75, "第十六条"),
        "warning.yellow_before": ("1wd", "第十六条"),
        "warning.escalation": (
            ["第一次超期：县行政审批局约谈", "第二次超期：县纪委监委约谈"],
            "第十九条（一）",
        ),
        "real_name_required": ([], ""),
    },
    "dalian": {
        "clock_start": ("next_day", "第十八条"),  # 派发电子工单次日零时起
        "dispatch.limit": ("1wd", QUXIAN_DISPATCH),
        "sign.limit": ("1wd", QUXIAN_SIGN),
        "returns.window.limit": ("2wd", "第十五条"),  # 2个工作日内退回
        "returns.window_site_check.limit": ("3wd", "第十五条"),  # 需现场核查的为3个工作日
        "returns.designated_final": (True, "第十五条"),
        "limits.consultation.limit": ("1wd", "第十六条"),  # 1个工作日内联系市民并作解答回复
        "limits.help.limit": ("20wd", "第十八条"),  # “2·20”
        "limits.suggestion.limit": ("20wd", "第十八条"),
        "limits.complaint.limit": ("20wd", "第十八条"),
        "limits.report.limit": ("20wd", "第十八条"),
        "review.limit": ("2wd", "第二十一条"),  # 2个工作日内复核所办结工单
        "urgent.urgent.respond": ("2h", "第十九条"),  # 2小时内到现场处理
        "urgent.urgent.finish": ("2wd", "第十九条"),  # 2个工作日内回复市民
        "extension.max_count": (2, "第二十条"),
        "extension.same_as_limit": (True, "第二十条"),  # 仍应遵循“2·20”规定
        "extension.request_before_expiry": ("2wd", "第二十条"),
        "extension.needs_leader_from": (2, "第二十条"),  # 再次延期须本级承办单位领导同意
        "redo.max_count": (1, "第二十二条"),
        "redo.second_unsatisfied": ("supervise", "第二十二条"),
        "redo.manual_revisit_first": (True, "第二十一条"),
        "appeal.allowed": (False, "未规定"),
        "repeat.after_close": ("30d", SUQIAN_REPEAT),
        "repeat.unresolved_after": ("6d", SUQIAN_REPEAT),
        "warning.yellow_fraction": (0.75, "第十四条"),
        "real_name_required": ([], ""),
    },
    "suzhou": {
        "clock_start": ("immediate", "未规定"),
        "dispatch.limit": ("1wd", QUXIAN_DISPATCH),
        "sign.limit": ("1wd", QUXIAN_SIGN),
        "contact.help.limit": ("1wd", "五（二）2"),  # 自签收后1个工作日内主动联系
        "returns.window.limit": ("1wd", "五（六）"),  # 接收后的1个工作日内申请退回
        "returns.late": ("refuse", "五（六）"),  # 视同已接受转办工单
        "limits.consultation.limit": ("2wd", "五（二）1"),
        "limits.help.limit": ("5wd", "五（二）2"),
        "limits.suggestion.limit": ("5wd", "五（二）3"),
        "limits.complaint.limit": ("15wd", "五（二）4"),
        "limits.report.limit": ("15wd", "五（二）4"),  # 举报 not listed: as 投诉
        "urgent.urgent.respond": ("1h", "五（二）5"),  # 马上处置
        "urgent.urgent.finish": ("1d", "五（二）5"),  # 当天答复
        "extension.same_as_limit": (True, "五（二）"),  # 延长时限不得超过原办理时限
        "extension.request_before_expiry": ("1wd", "五（二）"),  # 届满前1个工作日
        "extension.needs_leader_from": (1, "五（二）"),  # 经单位负责同志同意
        "redo.second_unsatisfied": ("supervise", "四（五）"),
        "appeal.allowed": (False, "未规定"),
        "repeat.after_close": ("30d", SUQIAN_REPEAT),
        "repeat.unresolved_after": ("6d", SUQIAN_REPEAT),
        "warning.yellow_fraction": (0.75, "四（五）"),  # 红黄牌警示提醒制度
        "warning.yellow_before": ("1wd", "四（五）"),
        "real_name_required": ([], ""),
    },
}

# The kinds of matter each document lists as not accepted (emergency lines excluded: triage handles them).
EXCLUSIONS = {
    "pingli": {  # 第七条（一）至（十）
        "out_of_jurisdiction": "第七条（一）",
        "party_committee": "第七条（三）",
        "npc_cppcc": "第七条（三）",
        "court_procuratorate": "第七条（三）",
        "military": "第七条（三）",
        "litigation": "第七条（四）",
        "arbitration": "第七条（四）",
        "reconsideration": "第七条（四）",
        "petition": "第七条（四）",
        "secrets": "第七条（五）",
        "privacy": "第七条（五）",
        "discipline": "第七条（六）",
        "handled": "第七条（七）",
        "illegal_request": "第七条（八）",
        "public_order": "第七条（八）",
        "abuse": "第七条（八）",
        "no_content": "第七条（八）",
        "incomplete": "第七条（九）",
        "no_real_name": "第七条（十）",
    },
    "suqian": {  # 第七条（一）至（四）
        "out_of_jurisdiction": "第七条（一）",
        "petition": "第七条（二）",
        "arbitration": "第七条（二）",
        "reconsideration": "第七条（二）",
        "litigation": "第七条（二）",
        "secrets": "第七条（三）",
        "privacy": "第七条（三）",
        "public_order": "第七条（四）",
        "no_content": "第七条（四）",
        "no_legal_basis": "第七条（四）",
    },
    "quxian": {  # 第八条（一）至（七）
        "litigation": "第八条（一）",
        "arbitration": "第八条（一）",
        "discipline": "第八条（一）",
        "reconsideration": "第八条（一）",
        "info_disclosure": "第八条（一）",
        "petition": "第八条（一）",
        "secrets": "第八条（二）",
        "privacy": "第八条（二）",
        "public_order": "第八条（二）",
        "handled": "第八条（四）",
        "military": "第八条（五）",
        "abuse": "第八条（六）",
        "no_content": "第八条（六）",
        "illegal_request": "第八条（七）",
    },
    "dalian": {  # 第十二条（一）至（十二）
        "out_of_jurisdiction": "第十二条（一）",
        "party_committee": "第十二条（三）",
        "npc_cppcc": "第十二条（三）",
        "court_procuratorate": "第十二条（三）",
        "military": "第十二条（三）",
        "litigation": "第十二条（四）",
        "arbitration": "第十二条（四）",
        "reconsideration": "第十二条（四）",
        "unverifiable": "第十二条（五）",
        "secrets": "第十二条（六）",
        "privacy": "第十二条（六）",
        "discipline": "第十二条（七）",
        "handled": "第十二条（八）",
        "abuse": "第十二条（九）",
        "no_content": "第十二条（九）",
        "mediated_consumer": "第十二条（十）",
        "over_two_years": "第十二条（十一）",
        "petition": "第十二条（十二）",
    },
    "suzhou": {  # 三（二）1—6
        "no_content": "三（二）1",
        "npc_cppcc": "三（二）2",
        "discipline": "三（二）2",
        "court_procuratorate": "三（二）2",
        "military": "三（二）2",
        "secrets": "三（二）3",
        "privacy": "三（二）3",
        "litigation": "三（二）4",
        "arbitration": "三（二）4",
        "reconsideration": "三（二）4",
        "petition": "三（二）4",
        "private_matter": "三（二）6",
    },
}

# Where the citizen is sent for the matters with a well-known channel.
GO_TO = {"discipline": "12388", "litigation": "人民法院", "arbitration": "仲裁"}

_TOP_LEVEL_CITE = {"clock_start": "clock_start_cite", "real_name_required": "real_name_cite"}


def _value_and_cite(policy: Policy, path: str) -> tuple[Any, str]:
    """The value at a dotted path and the cite of the innermost rule that holds it."""
    if path in _TOP_LEVEL_CITE:
        return getattr(policy, path), getattr(policy, _TOP_LEVEL_CITE[path]) or ""
    obj: Any = policy
    cite = ""
    for part in path.split("."):
        if isinstance(getattr(obj, "cite", None), str):
            cite = obj.cite
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj, cite


def _all_cites(data: Any) -> list[str]:
    if isinstance(data, dict):
        found = [v for k, v in data.items() if k.endswith("cite") and isinstance(v, str)]
        for v in data.values():
            found += _all_cites(v)
        return found
    if isinstance(data, list):
        return [c for item in data for c in _all_cites(item)]
    return []


def test_one_preset_per_regulation():
    assert tuple(preset_names()) == PRESETS
    for name in PRESETS:
        policy = load_policy(name)
        assert policy.name == name
        assert policy.document == DOCUMENTS[name]


def test_quxian_is_loadable_by_name_and_the_default():
    policy = load_policy("quxian")
    assert policy.jurisdiction == "渠县"
    assert Settings.model_fields["policy"].default == "quxian"
    assert policy.limit_for("complaint") == Duration(5, "wd")


@pytest.mark.parametrize(
    "name,path", [(name, path) for name, rows in EXPECTED.items() for path in rows], ids=str
)
def test_every_number_matches_its_article(name, path):
    expected, article = EXPECTED[name][path]
    value, cite = _value_and_cite(load_policy(name), path)
    assert value == expected, f"{name} {path}"
    assert article in cite, f"{name} {path}: cite {cite!r} does not name {article!r}"


@pytest.mark.parametrize("name", PRESETS)
def test_every_cite_names_its_document(name):
    policy = load_policy(name)
    cites = _all_cites(policy.model_dump())
    assert len(cites) >= 17 + len(policy.exclusions)
    for cite in cites:
        assert DOCUMENTS[name] in cite, cite


@pytest.mark.parametrize("name", PRESETS)
def test_every_duration_parses(name):
    p = load_policy(name)
    durations = [p.dispatch.limit, p.sign.limit, p.returns.window.limit, p.survey.window]
    durations += [p.survey.reminder_after, p.repeat.after_close]
    durations += [r.limit for r in p.limits.values()] + [r.limit for r in p.contact.values()]
    for level in p.urgent.values():
        durations += [level.respond, level.finish]
    ext = p.extension
    optional = [ext.max_each, ext.max_total, ext.max_each_complex, ext.request_before_expiry]
    optional += [p.redo.limit, p.appeal.window, p.appeal.review, p.appeal.evidence]
    optional += [p.repeat.unresolved_after, p.warning.yellow_before]
    durations += [d for d in optional if d is not None]
    for d in durations:
        Duration.parse(d)


@pytest.mark.parametrize("name", PRESETS)
def test_urgent_tracks_are_faster_than_the_normal_limits(name):
    p = load_policy(name)
    assert p.urgent
    levels = ("special", "special_urgent") if name == "quxian" else ("urgent",)
    assert tuple(p.urgent) == levels
    for level in p.urgent.values():
        assert Duration.parse(level.respond).unit in ("h", "m")


@pytest.mark.parametrize("name", PRESETS)
def test_exclusions_are_the_documents_list(name):
    policy = load_policy(name)
    got = {ex.key: ex for ex in policy.exclusions}
    assert len(got) == len(policy.exclusions), "duplicate exclusion key"
    assert set(got) == set(EXCLUSIONS[name])
    for key, article in EXCLUSIONS[name].items():
        ex = got[key]
        assert ex.reason in REJECT_REASONS
        assert article in ex.cite, f"{key}: {ex.cite}"
        # the citizen is told the basis: the regulation by title and the article
        assert f"《{policy.title}》" in ex.wording, key
        assert re.search(r"第[一二三四五六七八九十]+条|三（二）", ex.wording), key
        assert len(ex.wording) <= 120 and ex.wording.endswith(("。", "！")), key
        assert ex.go_to.strip(), key
        if key in GO_TO:
            assert GO_TO[key] in ex.go_to, key


@pytest.mark.parametrize("name", PRESETS)
def test_emergencies_are_not_exclusions(name):
    policy = load_policy(name)
    for ex in policy.exclusions:
        assert not re.search(r"\b(110|119|120|122)\b", ex.key + ex.reason)
    assert policy.exclusion("litigation").reason == "litigation"
    assert policy.exclusion("no_content").reason == "no_content"
    # 宿政办发〔2020〕55号 第七条 does not list disciplinary matters; the other four do
    discipline = policy.exclusion("discipline")
    assert (discipline is None) == (name == "suqian")


def test_jurisdiction_specific_exclusions():
    # 大政发〔2015〕30号 第十二条（十）、（十一）: mediated consumer disputes and matters over two years old
    dalian = load_policy("dalian")
    assert dalian.exclusion("over_two_years") is not None
    assert "12315" in dalian.exclusion("mediated_consumer").go_to
    # 渠府办〔2023〕66号 第八条（一）、（五）: information disclosure and military matters
    quxian = load_policy("quxian")
    assert quxian.exclusion("military").reason == "other_organs"
    assert quxian.exclusion("info_disclosure") is not None
    for other in ("pingli", "suqian", "suzhou"):
        assert load_policy(other).exclusion("over_two_years") is None


@pytest.mark.parametrize("name", PRESETS)
def test_silences_are_declared_in_notes(name):
    policy = load_policy(name)
    assert len(policy.notes) >= 5
    borrowed = [c for c in _all_cites(policy.model_dump()) if "未规定" in c]
    assert borrowed, "every seed is silent on something (at least the survey window)"
    assert any("未规定" in n for n in policy.notes)
