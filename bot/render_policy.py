"""A policy preset as Chinese text, for `hotline policy show` and the center's /policy command."""

from __future__ import annotations

from models.policy import Duration, Policy
from models.workflow import TYPE_ZH


def _d(text: str | None) -> str:
    return Duration.parse(text).zh() if text else "—"


def render_policy(p: Policy) -> str:
    lines = [f"{p.jurisdiction}：{p.title}（{p.document}）", ""]
    lines.append(
        f"时限起算：{'转办次日0时' if p.clock_start == 'next_day' else '转办时'}　依据：{p.clock_start_cite}"
    )
    lines.append(f"签收时限：{p.sign.duration.zh()}　依据：{p.sign.cite}")
    lines.append(f"退回时限：{p.returns.window.duration.zh()}　依据：{p.returns.window.cite}")
    for t, rule in p.limits.items():
        lines.append(f"{TYPE_ZH[t]}类办理时限：{rule.duration.zh()}　依据：{rule.cite}")
    for key, u in p.urgent.items():
        lines.append(f"{u.name_zh}（{key}）：{_d(u.respond)}内响应，{_d(u.finish)}内办结　依据：{u.cite}")
    e = p.extension
    lines.append(
        f"延期：最多{e.max_count}次，每次不超过{_d(e.max_each) if e.max_each else '原时限'}"
        + (f"，累计不超过{_d(e.max_total)}" if e.max_total else "")
        + (f"；{'、'.join(TYPE_ZH[t] for t in e.not_for)}类不予延期" if e.not_for else "")
        + f"　依据：{e.cite}"
    )
    lines.append(f"重办：不满意重办{p.redo.max_count}次　依据：{p.redo.cite}")
    if p.appeal.allowed:
        lines.append(f"甄别：不满意评价后{_d(p.appeal.window)}内申请　依据：{p.appeal.cite}")
    lines.append(f"回访：{_d(p.survey.window)}内未评价按未评价归档　依据：{p.survey.cite}")
    lines.append("")
    lines.append("不予受理情形：")
    for ex in p.exclusions:
        lines.append(f"  · {ex.key}：{ex.wording} 去向：{ex.go_to}（{ex.cite}）")
    return "\n".join(lines)
