"""The ticket lifecycle: states, actions and which action may run in which state (DESIGN.md)."""

from __future__ import annotations

STATUS_ZH = {
    "received": "已接收",
    "triaged": "待派单",
    "rejected": "不予受理",
    "redirected": "已转紧急热线",
    "answered": "已由知识库答复",
    "dispatched": "已转办待签收",
    "signed": "办理中",
    "return_requested": "退回审核中",
    "extension_requested": "延期审核中",
    "reply_submitted": "办结审核中",
    "replied": "已答复待回访",
    "redo": "重办中",
    "archived": "已归档",
}

ACTION_ZH = {
    "triage": "分类",
    "reject": "不予受理",
    "redirect": "转紧急热线",
    "answer": "知识库答复",
    "dispatch": "转办",
    "sign": "签收",
    "request_return": "申请退回",
    "decide_return": "审核退回",
    "request_extension": "申请延期",
    "decide_extension": "审核延期",
    "submit_reply": "提交办结",
    "review_reply": "审核办结",
    "rate": "评价",
    "appeal": "申请甄别",
    "decide_appeal": "审核甄别",
    "supervise": "督办",
    "urge": "催办",
    "archive": "归档",
    "reopen": "转为工单",
    "add_info": "追加信息",
    "add_co": "添加协办单位",
}

OPEN_STATES = frozenset(
    {
        "received",
        "triaged",
        "dispatched",
        "signed",
        "return_requested",
        "extension_requested",
        "reply_submitted",
        "replied",
        "redo",
    }
)
# states in which the unit is working on the ticket (the finish clock runs)
HANDLING_STATES = frozenset({"signed", "redo", "extension_requested", "reply_submitted"})

ALLOWED: dict[str, frozenset[str]] = {
    "triage": frozenset({"received"}),
    "reject": frozenset({"received", "triaged"}),
    "redirect": frozenset({"received", "triaged"}),
    "answer": frozenset({"received", "triaged"}),
    "reopen": frozenset({"answered"}),
    "dispatch": frozenset({"received", "triaged"}),
    "sign": frozenset({"dispatched"}),
    "request_return": frozenset({"dispatched", "signed"}),
    "decide_return": frozenset({"return_requested"}),
    "request_extension": frozenset({"signed", "redo"}),
    "decide_extension": frozenset({"extension_requested"}),
    "submit_reply": frozenset({"signed", "redo"}),
    "review_reply": frozenset({"reply_submitted"}),
    "rate": frozenset({"replied"}),
    "supervise": OPEN_STATES,
    "urge": frozenset({"dispatched", "signed", "redo", "extension_requested", "return_requested"}),
    "archive": frozenset({"replied"}),
    "add_info": OPEN_STATES,
    # the center adds co-handling units while the lead unit works on it (or asks to return it)
    "add_co": frozenset({"dispatched", "signed", "redo", "extension_requested", "return_requested"}),
}
