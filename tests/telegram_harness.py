"""Runs the real python-telegram-bot application against the fake Bot API server on 127.0.0.1."""

from __future__ import annotations

import asyncio

from bot.fake_bot_api import FakeBotAPI, Sent
from bot.services import Services
from bot.telegram_app import build_application

TOKEN = "123456:TEST-TOKEN"


class Harness:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.api = FakeBotAPI().start()
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
        self.api.stop()

    def mark(self) -> int:
        """Position in the sent log; wait for messages after it."""
        return len(self.api.sent)

    async def expect(self, chat_id: int | str, fragment: str, *, after: int = 0, timeout: float = 20.0) -> Sent:
        return await asyncio.to_thread(self.api.wait_text, chat_id, fragment, after=after, timeout=timeout)

    async def say(self, chat_id: int, text: str, expect: str, **kw) -> Sent:
        mark = self.mark()
        self.api.message(chat_id, text, **kw)
        return await self.expect(chat_id, expect, after=mark)

    async def press(self, chat_id: int, data: str, expect: str, **kw) -> Sent:
        mark = self.mark()
        self.api.press(chat_id, data, **kw)
        return await self.expect(chat_id, expect, after=mark)


def run(coro) -> None:
    asyncio.run(coro)
