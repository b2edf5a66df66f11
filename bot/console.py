"""The console channel: the citizen's conversation in a terminal, buttons shown as numbered choices.

It drives exactly the same ``handle_citizen`` as Telegram. Typed input:
``1``/``2``… press a button of the last message, ``/status …`` and other commands work as in the
chat, ``位置 30.65,107.02`` shares a location, ``电话 王先生 13812345678`` shares a contact, anything
else is a message. Progress notifications for this citizen (from the outbox) are printed as they come.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from sqlalchemy import select

from bot.citizen import handle_citizen
from bot.messages import Button, Incoming, Reply
from bot.services import Services
from models.clock import now
from models.tables import OutboxMessage

_LOC = re.compile(r"^位置\s*(-?\d+(?:\.\d+)?)\s*[,，]\s*(-?\d+(?:\.\d+)?)$")
_CONTACT = re.compile(r"^电话\s+(.*?)\s*(1[3-9]\d{9}|0\d{2,3}-?\d{7,8})$")


class ConsoleChannel:
    def __init__(
        self, services: Services, out: Callable[[str], None] = print, user: str = "console-user"
    ) -> None:
        self.services = services
        self.out = out
        self.user = user
        self.buttons: list[Button] = []

    def _incoming(self, **kw) -> Incoming:
        return Incoming(
            channel="console", chat_id=self.user, user_id=self.user, display_name="控制台用户", **kw
        )

    def parse(self, line: str) -> Incoming:
        text = line.strip()
        if text.isdigit() and self.buttons:
            idx = int(text) - 1
            if 0 <= idx < len(self.buttons):
                return self._incoming(callback=self.buttons[idx].data)
        if text.startswith("/"):
            head, _, args = text[1:].partition(" ")
            return self._incoming(command=head.lower(), args=args.strip(), text=text)
        if m := _LOC.match(text):
            return self._incoming(latitude=float(m.group(1)), longitude=float(m.group(2)))
        if m := _CONTACT.match(text):
            return self._incoming(
                contact_name=m.group(1) or None, contact_phone=m.group(2), contact_user_id=self.user
            )
        return self._incoming(text=line)

    def show(self, reply: Reply) -> None:
        self.out("")
        self.out("热线：" + reply.text.replace("\n", "\n      "))
        flat = [b for row in reply.buttons for b in row]
        if flat:
            self.buttons = flat
            self.out("      " + "  ".join(f"[{i}] {b.label}" for i, b in enumerate(flat, 1)))
        if reply.ask_location:
            self.out("      （可输入“位置 纬度,经度”发送位置，或直接输入地址）")
        if reply.ask_contact:
            self.out("      （可输入“电话 姓名 手机号”分享联系方式）")

    def deliver_notifications(self) -> None:
        """Print what the outbox holds for this citizen (progress, replies, surveys) and mark it sent."""
        with self.services.sessions.begin() as s:
            rows = s.scalars(
                select(OutboxMessage)
                .where(
                    OutboxMessage.channel == "console",
                    OutboxMessage.chat_id == self.user,
                    OutboxMessage.status == "pending",
                )
                .order_by(OutboxMessage.id)
            ).all()
            for row in rows:
                self.show(Reply.from_markup(row.text, row.markup))
                row.status, row.sent_at, row.attempts = "sent", now(), row.attempts + 1

    def send(self, line: str) -> list[Reply]:
        replies = handle_citizen(self.services, self.parse(line))
        for r in replies:
            self.show(r)
        self.deliver_notifications()
        return replies

    def run(self, lines: Iterable[str], echo: bool = False) -> None:
        for line in lines:
            if line.strip() in ("exit", "quit", "退出"):
                break
            if echo:
                self.out(f"\n我：{line.rstrip()}")
            self.send(line)


def interactive(services: Services) -> None:  # pragma: no cover - needs a terminal
    ch = ConsoleChannel(services)
    ch.send("/start")
    print("\n（输入问题并回车；数字选择按钮；exit 退出）")
    while True:
        try:
            line = input("\n我：")
        except EOFError:
            break
        if line.strip() in ("exit", "quit", "退出"):
            break
        ch.send(line)
