"""`hotline demo`: a scripted conversation across three chats — a citizen, a unit's group and the
center's group — on a private SQLite database, printed as a transcript.

It uses the real triage model and knowledge base, the same conversation functions as Telegram, and
the outbox as the postman between chats.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from bot.binding import create_bind_code
from bot.citizen import handle_citizen
from bot.messages import Incoming, Reply
from bot.services import Services, build_services
from bot.staff import handle_group
from models.bootstrap import init_database
from models.clock import now
from models.db import make_engine, make_session_factory
from models.tables import OutboxMessage, Ticket

CITIZEN = "10001"
UNIT_CHAT, UNIT_USER = "-2001", "3001"
CENTER_CHAT, CENTER_USER = "-9001", "3901"
NAMES = {CITIZEN: "市民", UNIT_CHAT: "城管局群", CENTER_CHAT: "热线中心群"}


class Transcript:
    def __init__(self, services: Services, out: Callable[[str], None]) -> None:
        self.services = services
        self.out = out
        self.last: dict[str, Reply] = {}

    def show(self, chat: str, reply: Reply) -> None:
        self.last[chat] = reply
        who = NAMES.get(chat, chat)
        self.out(f"  ← [{who}] " + reply.text.replace("\n", "\n      "))
        labels = [b.label for row in reply.buttons for b in row]
        if labels:
            self.out("      " + " ".join(f"[{label}]" for label in labels))

    def post(self) -> None:
        """Deliver what the outbox holds (the Telegram sender's job in production)."""
        with self.services.sessions.begin() as s:
            rows = s.scalars(select(OutboxMessage).where(OutboxMessage.status == "pending")
                             .order_by(OutboxMessage.id)).all()
            for row in rows:
                row.status, row.sent_at = "sent", now()
                self.show(row.chat_id, Reply.from_markup(row.text, row.markup))

    def citizen(self, text: str | None = None, **kw) -> None:
        label = text if text is not None else kw.get("callback") or kw.get("command") or ""
        self.out(f"\n→ [市民] {label}")
        msg = Incoming(channel="console", chat_id=CITIZEN, user_id=CITIZEN, text=text, **kw)
        for r in handle_citizen(self.services, msg):
            self.show(CITIZEN, r)
        self.post()

    def group(self, chat: str, user: str, text: str | None = None, **kw) -> None:
        label = text if text is not None else kw.get("callback") or ("/" + kw.get("command", ""))
        self.out(f"\n→ [{NAMES[chat]}] {label}")
        msg = Incoming(channel="telegram", chat_id=chat, user_id=user, chat_type="group", text=text, **kw)
        for r in handle_group(self.services, msg):
            self.show(chat, r)
        self.post()

    def button(self, chat: str, prefix: str) -> str:
        reply = self.last[chat]
        for row in reply.buttons:
            for b in row:
                if b.label.startswith(prefix) or b.data.startswith(prefix):
                    return b.data
        raise LookupError(f"no button {prefix!r} in the last message to {chat}")


def run_chat_demo(services: Services | None = None, out: Callable[[str], None] = print) -> list[str]:
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        out(text)

    tmp = tempfile.TemporaryDirectory(prefix="hotline-demo-")
    try:
        engine = make_engine(f"sqlite:///{Path(tmp.name) / 'demo.db'}")
        init_database(engine)
        factory = make_session_factory(engine)
        if services is None:
            services = build_services(factory)
        else:
            services = build_services(factory, services.policy_name)
        t = Transcript(services, say)
        say("=== 12345 热线演示：市民、承办单位、热线中心三方对话 ===")
        with factory.begin() as s:
            unit_code = create_bind_code(s, "chengguan", "handler")
            center_code = create_bind_code(s, "center", "operator")
        t.group(UNIT_CHAT, UNIT_USER, command="bind", args=unit_code, text=f"/bind {unit_code}")
        t.group(CENTER_CHAT, CENTER_USER, command="bind", args=center_code, text=f"/bind {center_code}")
        t.citizen(command="start", text="/start")
        t.citizen("救命，楼下饭店厨房着火了，烟好大")
        t.citizen("外地人在这边打工，居住证怎么办理？")
        t.citizen(callback=t.button(CITIZEN, "kb:yes"))
        t.citizen("幸福里小区3栋楼下的烧烤摊天天晚上占道经营到凌晨两点，油烟和噪音太大了，老人孩子都睡不好")
        for _ in range(3):  # answer what the bot asks for, then confirm
            data = t.button(CITIZEN, "")
            if data.startswith("d:ok"):
                break
            t.citizen(callback=data)
        t.citizen(callback=t.button(CITIZEN, "d:ok"))
        with factory() as s:
            ticket = s.scalars(select(Ticket).order_by(Ticket.id.desc())).first()
        if ticket is None or ticket.status == "triaged":
            if ticket is not None:
                # the operator reads the card and sends it to the unit whose duty it is
                t.group(CENTER_CHAT, CENTER_USER, callback=f"c:disp:{ticket.id}:chengguan")
        with factory() as s:
            ticket = s.scalars(select(Ticket).order_by(Ticket.id.desc())).first()
        if ticket is None or ticket.lead_unit != "chengguan":
            say("\n（演示结束：工单未派往城管局，后续步骤请在真实群里体验。）")
            return lines
        t.group(UNIT_CHAT, UNIT_USER, callback=f"u:sign:{ticket.id}")
        t.group(UNIT_CHAT, UNIT_USER, callback=f"u:reply:{ticket.id}")
        t.group(UNIT_CHAT, UNIT_USER, text=(
            "办理结果：经现场核查，该烧烤摊占道经营属实，已责令其退回店内经营并于22时前停止营业，纳入夜间巡查。\n"
            "依据：《城市市容和环境卫生管理条例》第十四条\n经办人：李科员\n联系电话：0818-1234567"))
        t.group(CENTER_CHAT, CENTER_USER, callback=f"c:repok:{ticket.id}")
        t.citizen(callback=f"rate:{ticket.number}:satisfied")
        t.citizen(command="status", args=ticket.number, text=f"/status {ticket.number}")
        engine.dispose()
    finally:
        tmp.cleanup()
    return lines
