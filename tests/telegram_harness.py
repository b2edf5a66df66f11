"""Runs the real python-telegram-bot application against the fake Bot API server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bot.fake_bot_api import FakeBotAPI, Sent
from bot.services import Services
from bot.telegram_app import build_application

TOKEN = "123456:TEST-TOKEN"


def current_view(sent: list[Sent], chat_id: int | str) -> list[Sent]:
    """What a chat shows now: each message in its latest version (edits applied), least recently changed
    first (so the last one is the message that changed last)."""
    latest: dict[int, Sent] = {}
    for s in sent:
        if s.chat_id != str(chat_id) or s.message_id is None:
            continue
        latest.pop(s.message_id, None)
        latest[s.message_id] = s
    return list(latest.values())


def find_button(
    sent: list[Sent], chat_id: int | str, label: str, containing: str | None = None
) -> tuple[Sent, str] | None:
    """The newest message on screen in ``chat_id`` that carries a button labelled ``label``."""
    for s in reversed(current_view(sent, chat_id)):
        if containing and containing not in s.text:
            continue
        for text, data in s.buttons():
            if text == label:
                return s, data
    return None


class Harness:
    """The bot application on the fake server. Pass ``api`` to reuse a running fake server (a restart of the
    bot: the server, and what it recorded, outlive the application)."""

    def __init__(self, services: Services, api: FakeBotAPI | None = None) -> None:
        self.services = services
        self.own_api = api is None
        self.api = api or FakeBotAPI().start()
        self.app, self.bot = build_application(services, TOKEN, base_url=self.api.base_url, outbox_interval=0.2)

    async def __aenter__(self) -> Harness:
        await self.app.initialize()
        await self.app.start()
        await self.app.updater.start_polling(poll_interval=0.0, timeout=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.app.updater.stop()
        await self.app.stop()
        await self.app.shutdown()
        if self.own_api:
            self.api.stop()

    def mark(self) -> int:
        """Position in the sent log; wait for messages after it."""
        return len(self.api.sent)

    async def expect(self, chat_id: int | str, fragment: str, *, after: int = 0, timeout: float = 20.0) -> Sent:
        return await asyncio.to_thread(self.api.wait_text, chat_id, fragment, after=after, timeout=timeout)

    async def wait(self, predicate: Callable[[list[Sent]], object], timeout: float = 20.0) -> object:
        return await asyncio.to_thread(self.api.wait_for, predicate, timeout)

    async def say(self, chat_id: int, text: str, expect: str, **kw) -> Sent:
        mark = self.mark()
        self.api.message(chat_id, text, **kw)
        return await self.expect(chat_id, expect, after=mark)

    async def press(self, chat_id: int, data: str, expect: str, **kw) -> Sent:
        mark = self.mark()
        self.api.press(chat_id, data, **kw)
        return await self.expect(chat_id, expect, after=mark)

    async def button(
        self, chat_id: int | str, label: str, *, containing: str | None = None, timeout: float = 20.0
    ) -> tuple[Sent, str]:
        """Wait until a message on screen in ``chat_id`` carries a button labelled ``label``."""
        found = await self.wait(lambda sent: find_button(sent, chat_id, label, containing), timeout)
        return found  # type: ignore[return-value]

    async def tap(
        self,
        chat_id: int,
        label: str,
        expect: str,
        *,
        user_id: int,
        containing: str | None = None,
        expect_in: int | None = None,
    ) -> Sent:
        """Press the button labelled ``label`` on the newest message in ``chat_id`` that has it, as
        ``user_id``; wait for ``expect`` in ``expect_in`` (default: the same chat)."""
        card, data = await self.button(chat_id, label, containing=containing)
        mark = self.mark()
        self.api.press(chat_id, data, user_id=user_id, message_id=card.message_id or 1)
        return await self.expect(expect_in if expect_in is not None else chat_id, expect, after=mark)

    async def group_say(self, chat_id: int, user_id: int, text: str, expect: str) -> Sent:
        """A group member writes in the group; wait for the bot's answer there."""
        return await self.say(chat_id, text, expect, user_id=user_id)


def run(coro) -> None:
    asyncio.run(coro)
