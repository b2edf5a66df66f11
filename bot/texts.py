"""What the bot says to citizens: short, plain Chinese, in one place."""

from __future__ import annotations

from models.policy import Policy

EMERGENCY_LINES = {
    "110": "报警（治安、刑事案件、人身安全受到威胁、走失）",
    "119": "火警（火灾、燃气泄漏、浓烟、爆炸）",
    "120": "医疗急救（昏迷、抽搐、大出血、呼吸困难）",
    "122": "交通事故（有人受伤的车祸）",
    "96333": "电梯困人",
}

MAX_TEXT = 5000


def welcome(policy: Policy) -> str:
    return (
        f"您好，这里是{policy.jurisdiction}12345政务服务便民热线。\n"
        "可以向我们咨询政策办事，反映求助、投诉、举报和意见建议，我们会转给有关部门限时办理并回复您。\n\n"
        "⚠️ 紧急情况请直接拨打：110 报警｜119 火警｜120 急救｜122 交通事故｜96333 电梯困人。\n"
        "不受理：须通过诉讼、仲裁、行政复议、纪检监察、信访等程序解决的事项，涉及国家秘密、他人隐私的事项等。\n\n"
        "隐私说明：您的姓名和电话只用于办理和回访，仅承办人员经授权可查看，并留有查看记录。\n\n"
        "请直接输入您要反映或咨询的问题，也可点下面的按钮。"
    )


def emergency(line: str, label: str = "") -> str:
    what = label or EMERGENCY_LINES.get(line, "")
    return (
        f"🚨 请立即拨打 {line}！\n"
        f"您描述的情况属于{what}，12345热线不能代替紧急热线，请马上拨打 {line} 求助。\n"
        "确认安全后，如还有需要政府部门处理的后续问题，可以再告诉我们。"
    )


def rejected(wording: str, go_to: str, basis: str) -> str:
    return f"{wording}\n\n建议您：{go_to}。\n依据：{basis}"


HELP = (
    "可以这样使用：\n"
    "· 直接输入问题：我们会先查知识库答复，需要部门办理的会生成工单\n"
    "· /status 工单号：查询办理进度\n"
    "· /mine：查看我的诉求\n"
    "· /cancel：取消当前操作"
)
EMPTY = "没有收到文字内容。请用文字描述您要反映或咨询的问题，例如“幸福路路灯不亮已经一周了”。"
NO_TEXT_CONTENT = "没看懂您的意思 🙂 请用文字简单描述您要反映或咨询的问题，例如时间、地点和经过。"
TOO_LONG = (
    "内容超过{limit}字，请精简后再发送，或分几条发送（先发主要问题，再用“追加”补充）。"
    "您的原文仍在聊天记录里，可以复制修改。"
)
UNSUPPORTED = {
    "sticker": "收到您的表情😊。请用文字描述您要反映的问题，我们才能为您办理。",
    "voice": "暂时还不能识别语音，请改用文字描述，谢谢理解。",
    "audio": "暂时还不能识别音频，请改用文字描述，谢谢理解。",
    "video": "暂时不支持视频，请用文字描述问题，可以附照片。",
    "video_note": "暂时不支持视频，请用文字描述问题，可以附照片。",
    "animation": "请用文字描述您要反映的问题，我们才能为您办理。",
    "document": "暂时不支持文件，请用文字描述问题，可以附照片。",
    "unknown": "暂时不支持这种消息，请用文字描述您要反映的问题。",
}
STALE_BUTTON = "这个按钮已经过期了。请重新输入您的问题，或发送 /start 回到首页。"
CANCELLED = "已取消当前操作。需要时直接输入问题即可。"
NOTHING_TO_CANCEL = "当前没有进行中的操作。需要时直接输入问题即可。"
ASK_PLACE = "请告诉我们事发地点：点下方“发送位置”，或直接输入地址（如“幸福路与建设路交叉口”）。"
ASK_TIME = "事情是什么时候发生的？可以点按钮，也可以直接输入（如“昨晚10点”）。"
ASK_CONTACT = (
    "根据{basis}，投诉、举报须实名。请点下方“分享手机号”，或直接输入“姓名 电话”。"
    "您的信息只对经授权的承办人员可见。"
)
TEXT_ADDED = (
    "已把您刚发的这条消息补充到下面待确认的诉求中。如果这是另一件事，请先确认提交或取消这一条，再单独发送。"
)
SUMMARY_CHANGED = "这条诉求的内容在您按按钮前有了更新，请核对下面的最新内容后再确认。"
PHOTO_ONLY = "收到图片。请再用文字简单说明要反映的问题（地点、经过），图片会附在工单里。"
PHOTO_ADDED = "图片已附上（共{n}张）。"
REVIEW_QUEUED = "您的诉求已登记，工单号 {number}。需要人工确认分类和承办单位，我们会尽快处理并通知您。"
ASK_NUMBER = "请发送工单号，例如 /status 20261122-000123。"
NOT_FOUND_OR_NOT_YOURS = "没有找到编号为 {number} 的工单，或该工单不是您提交的。请核对工单号。"
NO_TICKETS = "您还没有提交过诉求。直接输入问题即可开始。"
ASK_ADD_INFO = "请输入要补充的内容（工单 {number}）："
ADD_INFO_DONE = "已补充到工单 {number}，承办单位可以看到。"
ASK_UNSATISFIED = "很抱歉没有让您满意。请说说不满意的原因，我们会请承办单位重新办理："
ASK_UNSATISFIED_NO_REDO = "很抱歉没有让您满意。请说说不满意的原因，热线中心会记录并据此考核承办单位："
THANKS_RATING = "感谢您的评价！工单 {number} 已办结归档。"
RATING_REDO = "已记录您的意见，工单 {number} 将退回承办单位重新办理，预计 {due} 前答复。"
RATING_ARCHIVED = "已记录您的不满意评价和意见，工单 {number} 已归档，热线中心将据此考核承办单位。"
RATING_FINAL = "已记录您的意见，工单 {number} 将由热线中心人工回访跟进。"
KB_SOLVED = "很高兴帮到您！如还有其他问题，直接输入即可。"
FLOOD = "您发送得太快了，请稍等几秒再发。刚才超出频率的消息没有处理，请稍后重新发送。"
BUSY = "系统繁忙，您的消息已收到，请稍后查看回复；如情况紧急，请拨打相应紧急电话。"
# issue 8: sent at once when a message will wait for the triage model and a step worker (a peak of messages)
QUEUED = "您的消息已收到。当前来信较多，正在依次为您处理，请稍候，无需重复发送。如情况紧急，请直接拨打110、119、120。"

JOIN_OFFER = (
    "已有市民反映了看起来相同的问题：\n工单 {number}（{place}，{status}）\n“{text}”\n"
    "您可以加入这张工单一起跟进，办理结果会同时告诉您；如果不是同一件事，请选择“仍然新建工单”。"
)
JOINED = "✅ 已将您加入工单 {number}（当前状态：{status}）。办理结果出来后会同时通知您，可随时发送 /status {number} 查询。"
JOIN_CLOSED = "那张工单刚刚已经办结，我们为您新建工单。"
