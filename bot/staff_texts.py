"""What the bot says in the unit and center group chats, and the small parsers for what staff type there.

Plain functions only (no database): the date a unit asks an extension to, the labelled lines of a reply
(办理结果 / 依据 / 经办人 / 联系电话), and the Chinese names of roles and audit events.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta

from models.policy import Duration
from models.workcalendar import WorkCalendar

ROLE_ZH = {"handler": "经办人", "leader": "单位负责人", "operator": "中心值班员", "supervisor": "中心负责人"}
UNIT_ROLES = ("handler", "leader")
CENTER_ROLES = ("operator", "supervisor")
ROLE_RANK = {"handler": 1, "leader": 2, "operator": 1, "supervisor": 2}

EVENT_ZH = {
    "receive": "收到诉求",
    "triage": "智能分类",
    "retype": "中心修改类型",
    "reject": "不予受理",
    "redirect": "转紧急热线",
    "answer": "知识库答复",
    "reopen": "转为工单",
    "add_info": "诉求人补充信息",
    "repeat": "标注重复诉求",
    "dispatch": "转办",
    "sign": "主办单位签收",
    "co_sign": "协办单位签收",
    "request_return": "申请退回",
    "return_approved": "同意退回",
    "return_refused": "不同意退回",
    "request_extension": "申请延期",
    "extension_approved": "同意延期",
    "extension_refused": "不同意延期",
    "co_reply": "协办单位提交意见",
    "add_co": "中心添加协办单位",
    "submit_reply": "提交办结答复",
    "reply_approved": "答复审核通过",
    "reply_refused": "答复退回重办",
    "rate": "诉求人评价",
    "survey_expired": "回访期满未评价",
    "appeal": "申请甄别",
    "appeal_decided": "甄别审核",
    "supervise": "督办",
    "urge": "催办",
    "overdue": "超期",
}

# --------------------------------------------------------------------------- binding

NOT_BOUND = (
    "本群尚未绑定承办单位或热线中心。管理员可在服务器上运行 `hotline bind unit 单位代码` 或 "
    "`hotline bind center` 获取一次性绑定码，再在本群发送 /bind 绑定码。"
)
BIND_PRIVATE = "绑定须在单位或热线中心的工作群里进行：请把机器人拉进工作群，在群里发送 /bind 绑定码。"
PRIVATE_GROUP_ONLY = "这是工作群里使用的功能，请在单位或热线中心的工作群中操作。"
ASK_CODE = "请在命令后附上绑定码，例如：/{command} AB12CD34"
CODE_UNKNOWN = "绑定码不正确，请核对后重试（绑定码由管理员运行 hotline bind 生成）。"
CODE_USED = "这个绑定码已经使用过了，绑定码只能使用一次，请向管理员重新获取。"
CODE_EXPIRED = "这个绑定码已过期，请向管理员重新获取。"
NOT_STAFF = (
    "抱歉，您还不是{unit}登记的工作人员，不能办理此操作。"
    "请本群负责人发送 /invite 获取邀请码，您再发送 /join 邀请码 登记后即可办理。"
)
INVITE_ROLE_TOO_HIGH = "您是{role}，只能邀请同级或更低角色的人员。"
INVITE_BAD_ROLE = "角色只能是：{roles}。"

# --------------------------------------------------------------------------- refusals

STALE = "这个按钮对应的步骤已经过去了（工单 {number} 当前状态：{status}），无需再操作。"
STALE_GENERIC = "这个按钮已经失效了，请发送 /ticket 工单号 查看最新情况。"
NOT_YOUR_TICKET = "工单 {number} 不是交给{unit}办理的，不能在本群操作。"
LEAD_ONLY = "此操作须由主办单位办理，协办单位请点“提交协办意见”将办理意见提交主办单位。"
CO_ONLY = "贵单位是主办单位，请直接点“提交办结”。"
UNIT_BUTTON_IN_CENTER = "这是承办单位的按钮，请在承办单位的工作群中操作。"
CENTER_BUTTON_IN_UNIT = "这是热线中心的审核按钮，承办单位群不能操作。"
UNIT_COMMAND_IN_CENTER = "/{command} 是承办单位群的命令，热线中心群不能使用。发送 /help 查看本群可用的命令。"
CENTER_COMMAND_IN_UNIT = "/{command} 是热线中心的命令，承办单位群不能使用。发送 /help 查看本群可用的命令。"
UNKNOWN_COMMAND = "这个命令我不认识。发送 /help 查看本群可用的命令。"
TICKET_NOT_FOUND = "没有找到编号为 {number} 的工单，请核对后再试。"
ASK_NUMBER = "请在命令后附上工单号，例如：/{command} 20261123-000001"
NOTHING_TO_CANCEL = "当前没有进行中的操作。"
CANCELLED = "已取消。"
RETRY_HINT = "\n请重新输入，或发送 /cancel 取消。"
TEXT_ONLY = "请用文字回复，或发送 /cancel 取消。"

UNIT_HELP = (
    "本群可用的命令：\n"
    "· 工单卡片上的按钮：签收、申请退回、申请延期、提交办结、提交协办意见、详情、查看联系方式\n"
    "· /pending 本单位未办结的工单（按时限排序）\n"
    "· /ticket 工单号 查看工单\n"
    "· /appeal 工单号 对不满意评价申请甄别\n"
    "· /kb list｜/kb add｜/kb edit 编号｜/kb retire 编号｜/kb publish 编号 维护本单位知识库\n"
    "· /invite [handler|leader] 为新同事生成邀请码，/join 邀请码 登记为本单位工作人员\n"
    "· /cancel 取消正在进行的操作"
)
CENTER_HELP = (
    "本群可用的命令：\n"
    "· 待办卡片上的按钮：确认派单、改类型、改派、不予受理、审核退回/延期/办结/甄别\n"
    "· /queue 待中心处理的事项\n"
    "· /ticket 工单号 查看工单\n"
    "· /supervise 工单号 [督办意见] 督办\n"
    "· /stats 今日统计\n"
    "· /invite [operator|supervisor] 生成邀请码，/join 邀请码 登记为中心工作人员\n"
    "· /cancel 取消正在进行的操作"
)

# --------------------------------------------------------------------------- unit prompts

ASK_RETURN_REASON = "请 {who} 输入退回理由和依据（例如不属于本单位职责的法规依据）："
ASK_RETURN_SUGGESTION = "请输入转送建议（建议由哪个单位办理）；没有请回复“无”："
RETURN_SENT = "已提交工单 {number} 的退回申请，等待热线中心审核。"
ASK_EXT_REASON = "请 {who} 输入延期理由："
ASK_EXT_DATE = (
    "请输入延期后的办结时间，例如“2026-12-03”“12月3日”或“3个工作日”（在现时限 {due} 基础上顺延）。{cap}"
)
EXT_DATE_UNCLEAR = "没看懂这个日期。请按“2026-12-03”“12月3日”或“3个工作日”的格式输入，或发送 /cancel 取消。"
EXT_SENT = "已提交工单 {number} 的延期申请（申请延至 {due}），等待热线中心审核。"
REPLY_TEMPLATE = (
    "请 {who} 提交办结答复，可以一项一项回复，也可以一条消息按下面的格式写全：\n"
    "办理结果：……\n依据：……\n经办人：……\n联系电话：……"
)
REPLY_ASK = {
    "result": "请输入办理结果（具体写明做了什么、结果如何）：",
    "basis": "请输入办理依据（法律法规或政策文件）：",
    "handler": "请输入经办人姓名：",
    "phone": "请输入经办人联系电话：",
}
REPLY_SENT = "工单 {number} 的办结答复已提交，等待热线中心审核。"
ASK_CO_TEXT = "请 {who} 输入本单位的协办意见（将提交主办单位{lead}）："
CO_SENT = "协办意见已提交主办单位{lead}。"
ASK_APPEAL_REASON = "请 {who} 输入申请甄别的理由，并说明可提供的佐证材料："
APPEAL_SENT = "已提交工单 {number} 的甄别申请，等待热线中心审核。"
SIGNED = "✅ 工单 {number} 已由{unit}签收（签收人：{who}）。"
CONTACT_SENT_GROUP = (
    "诉求人联系方式已私信发送给 {who}，查看已记录。（如未收到，请先私聊本机器人发送 /start 后再点一次。）"
)
CONTACT_PRIVATE = "工单 {number} 诉求人联系方式（仅供办理和回访使用，请勿外传；本次查看已记录）：\n姓名：{name}\n电话：{phone}"
CONTACT_NONE = "工单 {number} 的诉求人没有留下联系方式（查看已记录）。"

# --------------------------------------------------------------------------- center prompts

ASK_REFUSE_REASON = {
    "return": "请 {who} 输入不同意退回的理由（将告知承办单位）：",
    "extension": "请 {who} 输入不同意延期的理由（将告知承办单位）：",
    "reply": "请 {who} 输入退回答复的理由，说明需要补充或重办的内容（将告知承办单位）：",
    "appeal": "请 {who} 输入甄别不成立的理由（将告知承办单位）：",
}
PICK_UNIT = "请选择工单 {number} 的承办单位（第 {page}/{pages} 页）："
PICK_CO_UNIT = "请选择要添加到工单 {number} 的协办单位（第 {page}/{pages} 页）："
PICK_TYPE = "请选择工单 {number} 的诉求类型："
PICK_REJECT = "请选择工单 {number} 不予受理的情形（依据 {document}）："

# --------------------------------------------------------------------------- citizen progress

CITIZEN_DISPATCHED = "您的工单 {number} 已转交{unit}办理，将在 {due} 前答复您。"
CITIZEN_REDISPATCHED = "您的工单 {number} 已改由{unit}办理，将在 {due} 前答复您。"
CITIZEN_SIGNED = "您的工单 {number} 已由{unit}签收，正在办理。"
CITIZEN_EXTENDED = (
    "您的工单 {number} 因{reason}，经审核同意延期办理，新的答复时限为 {due}。给您带来不便，敬请谅解。"
)

# --------------------------------------------------------------------------- unit notices

UNIT_RETURN_APPROVED = "工单 {number} 的退回申请已同意{where}。"
UNIT_RETURN_REFUSED = "工单 {number} 的退回申请未获同意：{note}\n请继续办理。"
UNIT_EXT_APPROVED = "工单 {number} 的延期申请已同意，新的办结时限为 {due}。"
UNIT_EXT_REFUSED = "工单 {number} 的延期申请未获同意：{note}\n办结时限仍为 {due}。"
UNIT_REPLY_APPROVED = "工单 {number} 的办结答复已审核通过，已发送诉求人并开展回访。"
UNIT_REPLY_REFUSED = "工单 {number} 的办结答复被退回：{note}\n请补充或重新办理后再次提交。"
UNIT_APPEAL_DECIDED = "工单 {number} 的甄别申请{result}。{note}"
UNIT_SUPERVISED = "⚠️ 热线中心督办：工单 {number}{note}\n请加快办理，按时答复。"
UNIT_CO_REPLY = "协办单位{unit}对工单 {number} 的办理意见：\n{text}"
UNIT_CO_ADDED = "热线中心为工单 {number} 添加了协办单位：{units}。协办意见将提交贵单位，由贵单位汇总后统一答复诉求人。"
CO_ADDED_CARD = "热线中心指定贵单位为协办单位（主办单位：{lead}），请签收并将办理意见提交主办单位"
UNIT_RATED = "工单 {number} 诉求人评价：{value}{comment}"


def who(display_name: str, user_id: str) -> str:
    return display_name or f"用户{user_id}"


# --------------------------------------------------------------------------- parsing

_CN_DIGITS = {
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
    "十": 10,
}
_FULL_DATE = re.compile(r"(\d{4})\s*[-/.年]\s*(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*[日号]?")
_MONTH_DAY = re.compile(r"(?<!\d)(\d{1,2})\s*月\s*(\d{1,2})\s*[日号]?")
_SHORT_DATE = re.compile(r"^\s*(\d{1,2})[-/.](\d{1,2})\s*$")
_CLOCK = re.compile(r"(\d{1,2})\s*[:：点时]\s*(\d{2})?")
_RELATIVE = re.compile(r"([0-9]+|[一二两三四五六七八九十])\s*个?\s*(工作日|天|日|小时)")


def _number(token: str) -> int:
    return int(token) if token.isdigit() else _CN_DIGITS[token]


def parse_new_due(text: str, current_due: datetime, today: date, cal: WorkCalendar) -> datetime | None:
    """The deadline a unit asks for: an absolute date ("2026-12-03", "12月3日", "12-3") keeping the current
    deadline's time of day unless a time is given, or a span added to the current deadline ("3个工作日",
    "5天", "24小时"). None when the text says neither."""
    text = (text or "").strip()
    day: date | None = None
    rest = text
    m = _FULL_DATE.search(text)
    if m:
        day = _safe_date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        rest = text[m.end() :]
    else:
        m = _MONTH_DAY.search(text) or _SHORT_DATE.match(text)
        if m:
            month, dom = int(m.group(1)), int(m.group(2))
            day = _safe_date(today.year, month, dom)
            if day is not None and day < today:
                day = _safe_date(today.year + 1, month, dom)
            rest = text[m.end() :]
    if day is not None:
        at = current_due.timetz()
        clock = _CLOCK.search(rest)
        if clock and 0 <= int(clock.group(1)) <= 23:
            at = time(int(clock.group(1)), int(clock.group(2) or 0), tzinfo=current_due.tzinfo)
        return datetime.combine(day, at.replace(tzinfo=None), tzinfo=current_due.tzinfo)
    m = _RELATIVE.search(text)
    if m:
        amount = _number(m.group(1))
        unit = m.group(2)
        if unit == "工作日":
            return cal.add(current_due, Duration(float(amount), "wd"))
        if unit == "小时":
            return current_due + timedelta(hours=amount)
        return current_due + timedelta(days=amount)
    return None


def _safe_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


REPLY_LABELS: dict[str, tuple[str, ...]] = {
    "result": ("办理结果", "处理结果", "办理情况", "结果"),
    "basis": ("法律法规或政策依据", "法律依据", "政策依据", "办理依据", "依据"),
    "handler": ("经办人", "承办人", "办理人"),
    "phone": ("联系电话", "联系方式", "电话", "手机"),
    "terminal": ("终结办理", "终结"),
}
_LABEL_LINE = re.compile(
    r"^\s*[·•\-*]?\s*("
    + "|".join(sorted((lbl for lbls in REPLY_LABELS.values() for lbl in lbls), key=len, reverse=True))
    + r")\s*[:：]\s*(.*)$"
)
_LABEL_TO_FIELD = {lbl: field for field, lbls in REPLY_LABELS.items() for lbl in lbls}


def parse_labelled(text: str) -> dict[str, str]:
    """Lines like "办理结果：……" as {field: value}; unlabelled lines continue the previous field."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in (text or "").splitlines():
        m = _LABEL_LINE.match(line)
        if m:
            current = _LABEL_TO_FIELD[m.group(1)]
            out[current] = m.group(2).strip()
        elif current is not None and line.strip():
            out[current] = (out[current] + "\n" + line.strip()).strip()
    return out


# IncompleteReply names the missing items in Chinese; map them back to the fields to ask again
MISSING_TO_FIELD = {
    "经办人": "handler",
    "联系电话": "phone",
    "有效的联系电话": "phone",
    "办理结果": "result",
    "法律法规或政策依据": "basis",
}


def missing_fields(missing: list[str]) -> list[str]:
    fields = []
    for item in missing:
        field = MISSING_TO_FIELD.get(item)
        if field is None and item.startswith("具体的办理结果"):
            field = "result"
        if field and field not in fields:
            fields.append(field)
    return fields


KB_LABELS = {"questions": ("问题", "问法"), "answer": ("答复", "回答", "答案"), "basis": ("依据",)}
_KB_LINE = re.compile(r"^\s*(问题|问法|答复|回答|答案|依据)\s*[:：]\s*(.*)$")


def parse_kb_fields(text: str) -> dict[str, str]:
    """ "问题：…/答复：…/依据：…" lines for a knowledge-base edit; unlabelled text is the new answer."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in (text or "").splitlines():
        m = _KB_LINE.match(line)
        if m:
            current = next(f for f, lbls in KB_LABELS.items() if m.group(1) in lbls)
            out[current] = m.group(2).strip()
        elif current is not None and line.strip():
            out[current] = (out[current] + "\n" + line.strip()).strip()
    if not out and (text or "").strip():
        out["answer"] = text.strip()
    return out


def is_none_answer(text: str) -> bool:
    return text.strip().strip("。.！!") in ("无", "没有", "暂无", "跳过", "不填", "-", "/")
